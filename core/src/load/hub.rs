//! Hub ids resolved through hf-hub with the HF cache layout
//! (`$HF_HOME/hub/models--owner--name/snapshots/<commit>/…`), honouring `HF_HOME`,
//! `HF_HUB_OFFLINE`, `HF_ENDPOINT` and `HF_TOKEN` as huggingface_hub does.

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;

use super::LoadError;

/// Where and how to reach the hub; read from the environment by [`HubSettings::from_env`].
#[derive(Debug, Clone, Default)]
pub struct HubSettings {
    /// Cache root (`$HF_HOME/hub`); `None` = hf-hub's default (`~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Base URL (`HF_ENDPOINT`), default `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Bearer token (`HF_TOKEN`).
    pub token: Option<String>,
    /// Use only the cache (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubSettings {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        HubSettings {
            cache_dir: var("HF_HOME").map(|h| PathBuf::from(h).join("hub")),
            endpoint: var("HF_ENDPOINT"),
            token: var("HF_TOKEN"),
            offline: var("HF_HUB_OFFLINE")
                .is_some_and(|v| !matches!(v.as_str(), "0" | "false" | "False")),
        }
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

const REQUIRED: [&str; 1] = ["config.json"];
const OPTIONAL: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

/// Makes the files of an HF model available locally and returns its snapshot directory.
///
/// # Errors
/// [`LoadError::Hub`] naming the repository and file that could not be had.
pub fn resolve(
    repo_id: &str,
    revision: Option<&str>,
    s: &HubSettings,
) -> Result<PathBuf, LoadError> {
    let hub_err = |message: String| LoadError::Hub {
        repo: repo_id.to_string(),
        message,
    };
    let get = files(repo_id, revision, s)?;
    let need = |f: &str| -> Result<PathBuf, LoadError> {
        get(f)?.ok_or_else(|| {
            hub_err(if s.offline {
                format!("'{f}' is not in the cache and HF_HUB_OFFLINE is set")
            } else {
                format!(
                    "the repository has no '{f}' (or does not exist, or is not visible with \
                     the token given)"
                )
            })
        })
    };
    let config = need(REQUIRED[0])?;
    for f in OPTIONAL {
        get(f)?;
    }
    if get("model.safetensors")?.is_none() {
        let index = need("model.safetensors.index.json")?;
        let text = std::fs::read_to_string(&index)
            .map_err(|e| hub_err(format!("{}: {e}", index.display())))?;
        let idx: ShardIndex = serde_json::from_str(&text)
            .map_err(|e| hub_err(format!("{}: {e}", index.display())))?;
        let mut shards: Vec<&String> = idx.weight_map.values().collect();
        shards.sort();
        shards.dedup();
        for shard in shards {
            need(shard)?;
        }
    }
    config
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| hub_err("cache path has no parent".into()))
}

/// A file of a hub repository: its local path (downloaded into the cache, or found there when
/// offline) or `None` when the repository has no such file; a repository that does not exist
/// (or is private) has no files.
pub type FileGetter = Box<dyn Fn(&str) -> Result<Option<PathBuf>, LoadError> + Send + Sync>;

/// The files of `repo_id` at `revision` (default `main`), through the cache.
///
/// # Errors
/// [`LoadError::Hub`] when the client cannot be built; the getter's errors name the file.
pub fn files(
    repo_id: &str,
    revision: Option<&str>,
    s: &HubSettings,
) -> Result<FileGetter, LoadError> {
    let id = repo_id.to_string();
    let hub_err = move |message: String| LoadError::Hub {
        repo: id.clone(),
        message,
    };
    let repo = match revision {
        Some(r) => Repo::with_revision(repo_id.to_string(), RepoType::Model, r.to_string()),
        None => Repo::new(repo_id.to_string(), RepoType::Model),
    };
    let cache = match &s.cache_dir {
        Some(dir) => Cache::new(dir.clone()),
        None => Cache::from_env(),
    };
    if s.offline {
        let cached = cache.repo(repo);
        return Ok(Box::new(move |f: &str| Ok(cached.get(f))));
    }
    let mut b = ApiBuilder::from_cache(cache).with_progress(false);
    if let Some(e) = &s.endpoint {
        b = b.with_endpoint(e.trim_end_matches('/').to_string());
    }
    if s.token.is_some() {
        b = b.with_token(s.token.clone());
    }
    let api = b.build().map_err(|e| hub_err(e.to_string()))?.repo(repo);
    Ok(Box::new(move |f: &str| match api.get(f) {
        Ok(p) => Ok(Some(p)),
        // The hub answers 401 for a repository that does not exist (or is not visible
        // with the token given), 404 for a file a repository does not have.
        Err(hf_hub::api::sync::ApiError::RequestError(e))
            if matches!(*e, ureq::Error::Status(401 | 404, _)) =>
        {
            Ok(None)
        }
        Err(e) => Err(hub_err(format!("downloading '{f}': {e}"))),
    }))
}
