//! The adapters a server knows, by name. Loading a name that exists replaces it with a new
//! version; requests hold an `Arc` of the version they started with, so a replacement or an
//! unload never disturbs them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use graft_core::backend::GraftBackend;
use graft_core::lora::Adapter;
use graft_core::model::Llama;
use graft_core::peft::AdapterError;
use serde::Serialize;

/// One loaded version of an adapter.
pub struct AdapterEntry<B: GraftBackend> {
    pub name: String,
    pub version: u64,
    pub source: PathBuf,
    /// `peft` or `gguf`.
    pub format: &'static str,
    pub adapter: Adapter<B>,
    pub info: AdapterInfo,
    pub requests: AtomicU64,
}

/// What `/v1/adapters` and `/v1/models` say about an adapter.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterInfo {
    pub rank: usize,
    pub target_modules: Vec<String>,
    pub modules: usize,
    pub bytes: usize,
}

/// Why an adapter name or path was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "adapter name '{0}' is invalid (use letters, digits, '-', '_', '.', up to 128 characters)"
    )]
    BadName(String),
    #[error("adapter name '{0}' is the base model's name")]
    BaseName(String),
    #[error("adapter path {0} is outside the allowed adapter directories")]
    OutsideRoots(String),
    #[error("no adapter at {0}: expected a PEFT directory (adapter_config.json) or a .gguf file")]
    NotFound(String),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
}

pub struct Registry<B: GraftBackend> {
    entries: RwLock<BTreeMap<String, Arc<AdapterEntry<B>>>>,
    next_version: AtomicU64,
    base_name: String,
    /// Adapter paths must resolve inside one of these (empty: any path).
    roots: Vec<PathBuf>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.')
}

impl<B: GraftBackend> Registry<B> {
    pub fn new(base_name: String, roots: Vec<PathBuf>) -> Self {
        let roots = roots
            .into_iter()
            .map(|r| r.canonicalize().unwrap_or(r))
            .collect();
        Registry {
            entries: RwLock::new(BTreeMap::new()),
            next_version: AtomicU64::new(1),
            base_name,
            roots,
        }
    }

    /// The adapter called `name`, if loaded.
    pub fn get(&self, name: &str) -> Option<Arc<AdapterEntry<B>>> {
        self.entries
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    /// Every loaded adapter, by name.
    pub fn list(&self) -> Vec<Arc<AdapterEntry<B>>> {
        self.entries
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Reads and validates the adapter at `path` for `model`, then installs it as `name`
    /// (replacing an older version atomically). Reading happens before the lock is taken.
    ///
    /// # Errors
    /// A bad name, a path outside the roots, a missing or invalid adapter.
    pub fn load(
        &self,
        name: &str,
        path: &Path,
        model: &Llama<B>,
    ) -> Result<Arc<AdapterEntry<B>>, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::BadName(name.into()));
        }
        if name == self.base_name {
            return Err(RegistryError::BaseName(name.into()));
        }
        let real = path
            .canonicalize()
            .map_err(|_| RegistryError::NotFound(path.display().to_string()))?;
        if !self.roots.is_empty() && !self.roots.iter().any(|r| real.starts_with(r)) {
            return Err(RegistryError::OutsideRoots(path.display().to_string()));
        }
        let (adapter, format) =
            if real.is_dir() && real.join(graft_core::peft::CONFIG_FILE).is_file() {
                (graft_core::peft::load(&real, model)?.0, "peft")
            } else if real.is_file() && real.extension().is_some_and(|e| e == "gguf") {
                (graft_core::gguf_lora::load(&real, model)?, "gguf")
            } else {
                return Err(RegistryError::NotFound(path.display().to_string()));
            };
        let mut targets: Vec<String> = adapter
            .modules()
            .map(|(_, t, _)| t.hf_name().to_string())
            .collect();
        targets.sort();
        targets.dedup();
        let info = AdapterInfo {
            rank: adapter
                .modules()
                .map(|(_, _, w)| w.rank())
                .max()
                .unwrap_or(0),
            target_modules: targets,
            modules: adapter.modules().count(),
            bytes: adapter.n_bytes(),
        };
        let entry = Arc::new(AdapterEntry {
            name: name.into(),
            version: self.next_version.fetch_add(1, Ordering::SeqCst),
            source: real,
            format,
            adapter,
            info,
            requests: AtomicU64::new(0),
        });
        self.entries
            .write()
            .expect("registry lock")
            .insert(name.into(), entry.clone());
        Ok(entry)
    }

    /// Removes `name`; running requests keep their version. Returns whether it was loaded.
    pub fn unload(&self, name: &str) -> bool {
        self.entries
            .write()
            .expect("registry lock")
            .remove(name)
            .is_some()
    }
}
