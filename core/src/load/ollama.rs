//! Models pulled by Ollama, read from its local store (`$OLLAMA_MODELS`, default
//! `~/.ollama/models`), so that `--model ollama:qwen2.5-coder:0.5b` trains on what `ollama pull`
//! fetched. `manifests/<host>/<namespace>/<model>/<tag>` is a Docker-style manifest whose layers
//! name blobs `blobs/sha256-<hex>` by digest: the `application/vnd.ollama.image.model` layer is
//! the GGUF file, `…template` the Go chat template, `…params` a JSON object of run parameters
//! (`stop`, `temperature`, …), `…system` the default system prompt.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::LoadError;

const DEFAULT_HOST: &str = "registry.ollama.ai";
const DEFAULT_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";

/// A model name as Ollama spells it: `[host/][namespace/]model[:tag]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OllamaName {
    pub host: String,
    pub namespace: String,
    pub model: String,
    pub tag: String,
}

impl OllamaName {
    /// Parses a name, filling Ollama's defaults (`registry.ollama.ai`, `library`, `latest`).
    ///
    /// # Errors
    /// An empty part, too many parts, or a character Ollama does not allow in names.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("'{s}' is not an Ollama model name ({why})");
        let (path, tag) = match s.rsplit_once(':') {
            Some((p, t)) if !t.contains('/') => (p, t),
            _ => (s, DEFAULT_TAG),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, model) = match parts[..] {
            [m] => (DEFAULT_HOST, DEFAULT_NAMESPACE, m),
            [n, m] => (DEFAULT_HOST, n, m),
            [h, n, m] => (h, n, m),
            _ => return Err(bad("expected [host/][namespace/]model[:tag]")),
        };
        let valid = |p: &str, extra: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c) || extra.contains(c))
        };
        if !valid(host, ":") || !valid(namespace, "") || !valid(model, "") || !valid(tag, "") {
            return Err(bad("each part is letters, digits, '-', '_' and '.'"));
        }
        Ok(OllamaName {
            host: host.into(),
            namespace: namespace.into(),
            model: model.into(),
            tag: tag.into(),
        })
    }

    /// The short form Ollama prints and `FROM` accepts (`qwen2.5-coder:0.5b`).
    pub fn short(&self) -> String {
        let mut s = String::new();
        if self.host != DEFAULT_HOST {
            s += &format!("{}/", self.host);
        }
        if self.host != DEFAULT_HOST || self.namespace != DEFAULT_NAMESPACE {
            s += &format!("{}/", self.namespace);
        }
        format!("{s}{}:{}", self.model, self.tag)
    }
}

impl fmt::Display for OllamaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// A pulled model: its GGUF blob and what Ollama runs it with.
#[derive(Debug, Clone)]
pub struct OllamaModel {
    pub name: OllamaName,
    pub gguf: PathBuf,
    /// The Go template Ollama renders prompts with.
    pub template: Option<String>,
    /// Run parameters (`stop`: a list of strings, numbers for the sampling settings).
    pub params: serde_json::Map<String, serde_json::Value>,
    pub system: Option<String>,
}

/// Ollama's store: `$OLLAMA_MODELS`, else `~/.ollama/models`.
pub fn store_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OLLAMA_MODELS").filter(|v| !v.is_empty()) {
        return dir.into();
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".ollama/models")
}

#[derive(Deserialize)]
struct Manifest {
    layers: Vec<Layer>,
}

#[derive(Deserialize)]
struct Layer {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
}

/// Finds `name` in the store at `store`.
///
/// # Errors
/// No manifest for the name (naming the path looked at), a malformed manifest, a digest that
/// is not `sha256:<64 hex>`, a missing blob or one whose size differs from the manifest's, no
/// model layer.
pub fn resolve(name: &str, store: &Path) -> Result<OllamaModel, LoadError> {
    let parsed = OllamaName::parse(name).map_err(|message| LoadError::Ollama {
        name: name.into(),
        message,
    })?;
    let err = |message: String| LoadError::Ollama {
        name: parsed.short(),
        message,
    };
    let manifest_at = |lower: bool| {
        let case = |p: &str| {
            if lower {
                p.to_lowercase()
            } else {
                p.to_string()
            }
        };
        store
            .join("manifests")
            .join(case(&parsed.host))
            .join(case(&parsed.namespace))
            .join(case(&parsed.model))
            .join(&parsed.tag)
    };
    // Ollama keeps host/namespace/model lower-cased on disk (names are case-insensitive).
    let manifest_path = match manifest_at(false) {
        p if p.is_file() => p,
        _ => manifest_at(true),
    };
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
        err(format!(
            "no manifest at {} ({e}); pull it with `ollama pull {}` or set OLLAMA_MODELS",
            manifest_path.display(),
            parsed.short()
        ))
    })?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
        err(format!(
            "{}: malformed manifest: {e}",
            manifest_path.display()
        ))
    })?;
    let blob = |layer: &Layer| -> Result<PathBuf, LoadError> {
        let hex = layer
            .digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| {
                err(format!(
                    "{}: layer {} has digest '{}', expected sha256:<64 hex digits>",
                    manifest_path.display(),
                    layer.media_type,
                    layer.digest
                ))
            })?;
        let path = store.join("blobs").join(format!("sha256-{hex}"));
        let len = std::fs::metadata(&path)
            .map_err(|e| {
                err(format!(
                    "blob {} of {}: {e}",
                    path.display(),
                    layer.media_type
                ))
            })?
            .len();
        if len != layer.size {
            return Err(err(format!(
                "blob {} has {len} bytes, the manifest says {} (an interrupted pull?)",
                path.display(),
                layer.size
            )));
        }
        Ok(path)
    };
    let text_layer = |kind: &str| -> Result<Option<String>, LoadError> {
        match manifest
            .layers
            .iter()
            .find(|l| l.media_type == format!("application/vnd.ollama.image.{kind}"))
        {
            None => Ok(None),
            Some(l) => {
                let path = blob(l)?;
                std::fs::read_to_string(&path)
                    .map(Some)
                    .map_err(|e| err(format!("{kind} blob {}: {e}", path.display())))
            }
        }
    };
    let model = manifest
        .layers
        .iter()
        .find(|l| l.media_type == "application/vnd.ollama.image.model")
        .ok_or_else(|| {
            err(format!(
                "{}: no application/vnd.ollama.image.model layer",
                manifest_path.display()
            ))
        })?;
    // Layers that change what the model computes: graft would silently run the bare base.
    if let Some(l) = manifest
        .layers
        .iter()
        .find(|l| l.media_type.ends_with(".adapter") || l.media_type.ends_with(".projector"))
    {
        return Err(err(format!(
            "{}: has a {} layer (a model made with ADAPTER or a vision projector); graft \
             reads plain base models: name the base it was made from",
            manifest_path.display(),
            l.media_type
        )));
    }
    let params = match text_layer("params")? {
        None => Default::default(),
        Some(t) => serde_json::from_str(&t).map_err(|e| {
            err(format!(
                "{}: the params layer is not a JSON object: {e}",
                manifest_path.display()
            ))
        })?,
    };
    Ok(OllamaModel {
        gguf: blob(model)?,
        template: text_layer("template")?,
        params,
        system: text_layer("system")?,
        name: parsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `blobs` (media type suffix, content) into a store as Ollama lays it out, with a
    /// manifest for `me/m:v1`, each blob named by `digest_of(its index)`.
    fn store(blobs: &[(&str, &[u8])], digest_of: impl Fn(usize) -> String) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("blobs")).expect("blobs");
        let layers: Vec<serde_json::Value> = blobs
            .iter()
            .enumerate()
            .map(|(i, (kind, bytes))| {
                let digest = digest_of(i);
                if let Some(hex) = digest.strip_prefix("sha256:").filter(|h| !h.contains('/')) {
                    std::fs::write(dir.path().join(format!("blobs/sha256-{hex}")), bytes)
                        .expect("blob");
                }
                serde_json::json!({
                    "mediaType": format!("application/vnd.ollama.image.{kind}"),
                    "digest": digest,
                    "size": bytes.len(),
                })
            })
            .collect();
        let m = dir.path().join("manifests/registry.ollama.ai/me/m");
        std::fs::create_dir_all(&m).expect("manifest dir");
        std::fs::write(
            m.join("v1"),
            serde_json::json!({"schemaVersion": 2, "layers": layers}).to_string(),
        )
        .expect("manifest");
        dir
    }

    fn hex(i: usize) -> String {
        format!("sha256:{i:064x}")
    }

    #[test]
    fn a_store_laid_out_by_ollama_resolves_to_its_layers() {
        let s = store(
            &[
                ("model", b"GGUF...."),
                ("template", b"{{ .Prompt }}"),
                ("params", br#"{"stop": ["<|im_end|>"], "temperature": 0.2}"#),
                ("system", b"Be brief."),
            ],
            hex,
        );
        let m = resolve("me/m:v1", s.path()).expect("resolves");
        assert_eq!(m.gguf, s.path().join(format!("blobs/sha256-{:064x}", 0)));
        assert_eq!(m.template.as_deref(), Some("{{ .Prompt }}"));
        assert_eq!(m.system.as_deref(), Some("Be brief."));
        assert_eq!(m.params["stop"][0], "<|im_end|>");
        assert_eq!(m.name.short(), "me/m:v1");
    }

    #[test]
    fn broken_stores_are_refused_by_name() {
        let s = store(&[("model", b"GGUF")], hex);
        let e = resolve("me/m:v2", s.path())
            .expect_err("no such tag")
            .to_string();
        assert!(
            e.contains("manifests/registry.ollama.ai/me/m/v2") && e.contains("ollama pull me/m:v2"),
            "{e}"
        );
        let s = store(&[("model", b"GGUF")], |_| {
            "sha256:../../../etc/passwd".into()
        });
        let e = resolve("me/m:v1", s.path())
            .expect_err("bad digest")
            .to_string();
        assert!(e.contains("expected sha256:<64 hex digits>"), "{e}");
        let s = store(&[("model", b"GGUF")], hex);
        std::fs::write(s.path().join(format!("blobs/sha256-{:064x}", 0)), b"GG").expect("truncate");
        let e = resolve("me/m:v1", s.path())
            .expect_err("short blob")
            .to_string();
        assert!(e.contains("has 2 bytes, the manifest says 4"), "{e}");
        let s = store(&[("template", b"x")], hex);
        let e = resolve("me/m:v1", s.path())
            .expect_err("no model")
            .to_string();
        assert!(
            e.contains("no application/vnd.ollama.image.model layer"),
            "{e}"
        );
        let s = store(&[("model", b"GGUF"), ("adapter", b"GGUF")], hex);
        let e = resolve("me/m:v1", s.path())
            .expect_err("an adapter layer")
            .to_string();
        assert!(
            e.contains("application/vnd.ollama.image.adapter layer"),
            "{e}"
        );
    }

    #[test]
    fn names_take_ollamas_defaults() {
        let n = OllamaName::parse("qwen2.5-coder:0.5b").expect("valid");
        assert_eq!(
            (
                n.host.as_str(),
                n.namespace.as_str(),
                n.model.as_str(),
                n.tag.as_str()
            ),
            ("registry.ollama.ai", "library", "qwen2.5-coder", "0.5b")
        );
        assert_eq!(n.short(), "qwen2.5-coder:0.5b");
        let n = OllamaName::parse("me/tuned").expect("valid");
        assert_eq!((n.namespace.as_str(), n.tag.as_str()), ("me", "latest"));
        assert_eq!(n.short(), "me/tuned:latest");
        let n = OllamaName::parse("localhost:11434/me/m:v1").expect("valid");
        assert_eq!((n.host.as_str(), n.tag.as_str()), ("localhost:11434", "v1"));
        for bad in ["", "../x", "a/b/c/d", "m:", "m:../../x", "a b"] {
            assert!(OllamaName::parse(bad).is_err(), "{bad:?}");
        }
    }
}
