//! Adapters from the Hugging Face hub: adapter `name` under `hf://owner` is the repository
//! `owner/name` (its `main` revision), downloaded through hf-hub into the HF cache as the base
//! model is (`HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` honoured), then copied
//! into the adapters directory.

use std::path::Path;

use graft_core::adapters::peft::{CONFIG_FILE, WEIGHTS_FILE};
use graft_core::load::hub::{self, HubSettings};

use super::{write_body, Layout, SourceError};

pub struct HubSource {
    owner: String,
    settings: HubSettings,
}

impl HubSource {
    pub fn new(owner: &str) -> Self {
        HubSource {
            owner: owner.to_string(),
            settings: HubSettings::from_env(),
        }
    }

    /// Where adapter `name` is looked for.
    pub fn location(&self, name: &str) -> String {
        format!("hf://{}/{name}", self.owner)
    }

    /// The repository's `adapter_config.json` and `adapter_model.safetensors` into `into`.
    pub fn fetch(&self, name: &str, into: &Path) -> Result<Layout, SourceError> {
        let url = self.location(name);
        let repo = format!("{}/{name}", self.owner);
        let failed = |e: graft_core::load::LoadError| SourceError::Transport {
            url: url.clone(),
            message: e.to_string(),
        };
        let get = hub::files(&repo, None, &self.settings).map_err(failed)?;
        let Some(config) = get(CONFIG_FILE).map_err(failed)? else {
            return Err(SourceError::NotFound { url });
        };
        let Some(weights) = get(WEIGHTS_FILE).map_err(failed)? else {
            return Err(SourceError::Incomplete { url });
        };
        for (from, file) in [(config, CONFIG_FILE), (weights, WEIGHTS_FILE)] {
            let body = std::fs::File::open(&from).map_err(|source| SourceError::Local {
                path: from.clone(),
                source,
            })?;
            write_body(body, &into.join(file), None, &format!("{url}/{file}"))?;
        }
        Ok(Layout::Peft)
    }
}
