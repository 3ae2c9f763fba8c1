//! Adapters from S3 or an S3-compatible server (MinIO, Ceph, R2, moto): GET requests
//! presigned with AWS Signature V4 by `rusty-s3` (a sans-IO signer: it builds the URLs, the
//! HTTP client graft already has — ureq — sends them), so the server pulls in no AWS SDK.
//!
//! Settings are AWS's environment variables: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN` (read once at start; unsigned requests without them, for public
//! buckets; IRSA and instance-role tokens are not exchanged), `AWS_REGION` or
//! `AWS_DEFAULT_REGION` (default `us-east-1`), and an endpoint override (`--s3-endpoint`, or
//! `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`) addressed path-style; without one, AWS's
//! regional endpoint, virtual-hosted style. Reading needs `s3:GetObject`; without
//! `s3:ListBucket` as well, S3 answers 403 for a key that does not exist, which is then an
//! error of the source rather than a missing adapter.

use std::path::Path;
use std::time::Duration;

use graft_core::adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};
use rusty_s3::actions::{GetObject, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};

use super::{write_body, Layout, SourceError};

/// How long a presigned URL stays valid (one request is made with it, at once).
const SIGNED_FOR: Duration = Duration::from_secs(300);

pub struct S3Source {
    bucket: Bucket,
    /// Key prefix without slashes at either end ("" for the bucket's root).
    prefix: String,
    credentials: Option<Credentials>,
    agent: ureq::Agent,
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

impl S3Source {
    /// # Errors
    /// An endpoint that is not an http(s) URL with a host.
    pub fn new(bucket: &str, prefix: &str, endpoint: Option<&str>) -> Result<Self, SourceError> {
        let region = env("AWS_REGION")
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        let endpoint = endpoint
            .map(String::from)
            .or_else(|| env("AWS_ENDPOINT_URL_S3"))
            .or_else(|| env("AWS_ENDPOINT_URL"));
        let (url, style) = match &endpoint {
            Some(e) => (e.clone(), UrlStyle::Path),
            None => (
                format!("https://s3.{region}.amazonaws.com"),
                UrlStyle::VirtualHost,
            ),
        };
        let bad = |why: String| SourceError::Config(format!("S3 endpoint '{url}': {why}"));
        let parsed = url.parse().map_err(|e| bad(format!("{e}")))?;
        let bucket = Bucket::new(parsed, style, bucket.to_string(), region)
            .map_err(|e| bad(e.to_string()))?;
        Ok(S3Source {
            bucket,
            prefix: prefix.trim_matches('/').to_string(),
            credentials: Credentials::from_env(),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(10))
                // Between reads: a stalled transfer fails, a slow one goes on.
                .timeout_read(Duration::from_secs(60))
                .build(),
        })
    }

    fn key(&self, name: &str, file: &str) -> String {
        match (self.prefix.is_empty(), file.is_empty()) {
            (true, true) => name.to_string(),
            (true, false) => format!("{name}/{file}"),
            (false, true) => format!("{}/{name}", self.prefix),
            (false, false) => format!("{}/{name}/{file}", self.prefix),
        }
    }

    fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket.name())
    }

    /// Where adapter `name` is looked for.
    pub fn location(&self, name: &str) -> String {
        format!(
            "{}/ or {}.gguf",
            self.url(&self.key(name, "")),
            self.url(&self.key(name, ""))
        )
    }

    /// `prefix/name/adapter_config.json` and `adapter_model.safetensors`, or else
    /// `prefix/name.gguf`, into `into`.
    pub fn fetch(&self, name: &str, into: &Path) -> Result<Layout, SourceError> {
        match self.get(&self.key(name, CONFIG_FILE), &into.join(CONFIG_FILE)) {
            Ok(()) => {
                let weights = self.key(name, WEIGHTS_FILE);
                match self.get(&weights, &into.join(WEIGHTS_FILE)) {
                    Err(SourceError::NotFound { .. }) => Err(SourceError::Incomplete {
                        url: self.url(&self.key(name, "")) + "/",
                    }),
                    other => other.map(|()| Layout::Peft),
                }
            }
            Err(SourceError::NotFound { .. }) => {
                let key = self.key(name, "") + ".gguf";
                self.get(&key, &into.join(format!("{name}.gguf")))
                    .map(|()| Layout::Gguf)
            }
            Err(e) => Err(e),
        }
    }

    /// Downloads object `key` into the new file `to`.
    fn get(&self, key: &str, to: &Path) -> Result<(), SourceError> {
        let url = self.url(key);
        let signed = GetObject::new(&self.bucket, self.credentials.as_ref(), key).sign(SIGNED_FOR);
        let response = match self.agent.get(signed.as_str()).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(404, _)) => return Err(SourceError::NotFound { url }),
            Err(ureq::Error::Status(status, r)) => {
                // S3's error document: <Error><Code>…</Code><Message>…</Message></Error>.
                let body = r.into_string().unwrap_or_default();
                let field = |tag: &str| {
                    let open = format!("<{tag}>");
                    let start = body.find(&open)? + open.len();
                    let end = body[start..].find("</")? + start;
                    Some(body[start..end].to_string())
                };
                let message = match (field("Code"), field("Message")) {
                    (Some(c), Some(m)) => format!("{c}: {m}"),
                    (Some(c), None) => c,
                    _ => body.chars().take(200).collect(),
                };
                return Err(SourceError::Status {
                    url,
                    status,
                    message,
                });
            }
            // The transport error's own text would carry the signed URL: keep its kind.
            Err(ureq::Error::Transport(t)) => {
                return Err(SourceError::Transport {
                    url,
                    message: match t.message() {
                        Some(m) => format!("{}: {m}", t.kind()),
                        None => t.kind().to_string(),
                    },
                })
            }
        };
        let expected = response
            .header("Content-Length")
            .and_then(|v| v.parse().ok());
        write_body(response.into_reader(), to, expected, &url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_join_the_prefix_name_and_file() {
        let s = S3Source::new("b", "/team/adapters/", Some("http://127.0.0.1:9")).expect("ok");
        assert_eq!(
            s.key("x", CONFIG_FILE),
            "team/adapters/x/adapter_config.json"
        );
        assert_eq!(s.key("x", "") + ".gguf", "team/adapters/x.gguf");
        let root = S3Source::new("b", "", Some("http://127.0.0.1:9")).expect("ok");
        assert_eq!(root.key("x", WEIGHTS_FILE), "x/adapter_model.safetensors");
        assert_eq!(root.location("x"), "s3://b/x/ or s3://b/x.gguf");
        let e = S3Source::new("b", "", Some("ftp://h"))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("ftp://h"), "{e}");
    }

    #[test]
    fn an_unreachable_endpoint_is_a_transport_error_naming_the_object_not_the_signature() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Port 9 (discard) on loopback: nothing listens there on a test machine.
        let s = S3Source::new("b", "p", Some("http://127.0.0.1:9")).expect("ok");
        let e = s.fetch("x", dir.path()).expect_err("unreachable");
        let text = e.to_string();
        assert!(matches!(e, SourceError::Transport { .. }), "{text}");
        assert!(text.contains("s3://b/p/x/adapter_config.json"), "{text}");
        assert!(!text.contains("X-Amz-Signature"), "{text}");
    }
}
