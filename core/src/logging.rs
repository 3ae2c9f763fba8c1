//! Where graft's diagnostics go: `tracing` events written to stderr, as JSON lines (one object
//! per event, fields at the top level: what log collectors ingest; the server's request log)
//! or as human-readable lines (the command-line tools). `RUST_LOG` filters them as usual
//! (`RUST_LOG=graft_serve=debug`); the default shows `info` and above.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the event's
    /// fields.
    Json,
    /// `LEVEL message key=value …`, without timestamps (a terminal shows them as they come).
    Human,
}

/// Installs the global subscriber. Calling it again (tests, or a library user that installed
/// its own) leaves the first one in place.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Human => builder
            .without_time()
            .with_target(false)
            .with_ansi(false)
            .try_init(),
    };
}

/// An error and its causes on one line (`outer: cause: root`), leaving out a cause whose text
/// the line already holds (many errors print their source in their own message too).
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("model.gguf: cannot read: {source}")]
    struct Outer {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("loading model 'm'")]
    struct Context {
        #[source]
        inner: Outer,
    }

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let e = Context {
            inner: Outer {
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "No such file"),
            },
        };
        assert_eq!(
            describe(&e),
            "loading model 'm': model.gguf: cannot read: No such file"
        );
    }
}
