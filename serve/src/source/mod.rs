//! Where adapters that are not in the adapters directory come from: object storage
//! (`s3://bucket/prefix`, adapter `name` at `prefix/name/` or `prefix/name.gguf`) or the
//! Hugging Face hub (`hf://owner`, adapter `name` in the repository `owner/name`). A request
//! naming an adapter the server does not know is resolved from these sources, in order, by
//! [`resolver::Resolver`]: downloaded into the adapters directory, validated, then served —
//! as LoRAX resolves adapters from S3 and the hub, and vLLM's LoRA resolver plugins do.
//!
//! Only the files graft reads are fetched (`adapter_config.json` and
//! `adapter_model.safetensors`, or the one GGUF-LoRA file), not the rest of a training
//! directory (optimizer states, `.bin` copies).

pub mod hub;
pub mod resolver;
pub mod s3;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use graft_core::adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};

/// Where unknown adapters are looked up (`--adapter-source`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// `s3://bucket/prefix`: adapter `name` is `prefix/name/` (PEFT) or `prefix/name.gguf`.
    S3 { bucket: String, prefix: String },
    /// `hf://owner`: adapter `name` is the hub repository `owner/name`.
    Hub { owner: String },
}

impl FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c));
            if !bucket_ok {
                return Err(format!(
                    "'{s}': '{bucket}' is not an S3 bucket name (3-63 lowercase letters, digits, \
                     '.', '-')"
                ));
            }
            return Ok(SourceSpec::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_matches('/').into(),
            });
        }
        if let Some(owner) = s.strip_prefix("hf://") {
            let owner = owner.trim_end_matches('/');
            let ok = !owner.is_empty()
                && owner.len() <= 96
                && owner
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(format!(
                    "'{s}': '{owner}' is not a hub user or organisation name"
                ));
            }
            return Ok(SourceSpec::Hub {
                owner: owner.into(),
            });
        }
        Err(format!(
            "'{s}' is not an adapter source: expected s3://bucket/prefix or hf://owner"
        ))
    }
}

impl std::fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceSpec::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            SourceSpec::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            SourceSpec::Hub { owner } => write!(f, "hf://{owner}"),
        }
    }
}

graft_core::serde_as_str!(SourceSpec);

/// Why an adapter could not be had from a source. `url` is where it was looked for, never
/// a signed address.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{url} does not exist")]
    NotFound { url: String },
    #[error("{url}: the source answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: the download ended after {got} of {expected} bytes")]
    Truncated {
        url: String,
        got: u64,
        expected: u64,
    },
    #[error("{url} has {CONFIG_FILE} but no {WEIGHTS_FILE}")]
    Incomplete { url: String },
    #[error("{}: {source}", path.display())]
    Local {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("adapter source: {0}")]
    Config(String),
}

/// What a fetch left in its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `adapter_config.json` and `adapter_model.safetensors`.
    Peft,
    /// `<name>.gguf`.
    Gguf,
}

/// A configured source, ready to fetch.
pub enum Source {
    S3(s3::S3Source),
    Hub(hub::HubSource),
}

impl Source {
    /// Connects `spec` with the settings of the environment (AWS's variables, `HF_*`) and
    /// `s3_endpoint` (an S3-compatible server instead of AWS).
    ///
    /// # Errors
    /// A malformed endpoint.
    pub fn new(spec: &SourceSpec, s3_endpoint: Option<&str>) -> Result<Self, SourceError> {
        Ok(match spec {
            SourceSpec::S3 { bucket, prefix } => {
                Source::S3(s3::S3Source::new(bucket, prefix, s3_endpoint)?)
            }
            SourceSpec::Hub { owner } => Source::Hub(hub::HubSource::new(owner)),
        })
    }

    /// Where `name` is looked for, for messages.
    pub fn location(&self, name: &str) -> String {
        match self {
            Source::S3(s) => s.location(name),
            Source::Hub(h) => h.location(name),
        }
    }

    /// Downloads the files of adapter `name` into the empty directory `into`.
    ///
    /// # Errors
    /// [`SourceError::NotFound`] when the source has no such adapter; any other variant when
    /// it has one that could not be had.
    pub fn fetch(&self, name: &str, into: &Path) -> Result<Layout, SourceError> {
        match self {
            Source::S3(s) => s.fetch(name, into),
            Source::Hub(h) => h.fetch(name, into),
        }
    }
}

/// Copies `body` into a new file `to` and syncs it; `expected`: the length the source
/// announced, checked.
fn write_body(
    mut body: impl Read,
    to: &Path,
    expected: Option<u64>,
    url: &str,
) -> Result<(), SourceError> {
    let write_err = |source| SourceError::Local {
        path: to.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::create_new(to).map_err(write_err)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(SourceError::Transport {
                    url: url.into(),
                    message: format!("the download failed after {got} bytes: {e}"),
                })
            }
        };
        file.write_all(&buf[..n]).map_err(write_err)?;
        got += n as u64;
    }
    if let Some(expected) = expected.filter(|&e| e != got) {
        return Err(SourceError::Truncated {
            url: url.into(),
            got,
            expected,
        });
    }
    file.sync_all().map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for s in ["s3://adapters/prod/v1", "s3://my.bucket-1", "hf://acme-ai"] {
            assert_eq!(s.parse::<SourceSpec>().expect(s).to_string(), s);
        }
        assert_eq!(
            "s3://b-1/p/".parse::<SourceSpec>(),
            Ok(SourceSpec::S3 {
                bucket: "b-1".into(),
                prefix: "p".into()
            })
        );
        for bad in [
            "s3://",
            "s3://UPPER/x",
            "hf://",
            "hf://a/b",
            "gs://x/y",
            "/local",
        ] {
            let e = bad.parse::<SourceSpec>().expect_err(bad);
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn a_body_shorter_than_announced_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let to = dir.path().join("f");
        let e = write_body(&b"abc"[..], &to, Some(5), "s3://b/k").expect_err("short");
        assert!(
            matches!(
                e,
                SourceError::Truncated {
                    got: 3,
                    expected: 5,
                    ..
                }
            ),
            "{e}"
        );
        write_body(&b"abcde"[..], &dir.path().join("g"), Some(5), "s3://b/k").expect("whole");
        assert_eq!(std::fs::read(dir.path().join("g")).expect("read"), b"abcde");
    }
}
