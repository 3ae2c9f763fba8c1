//! The adapters a server knows, by name, and which of them are in memory.
//!
//! Loading a name that exists replaces it with a new version; requests hold an `Arc` of the
//! version they started with, so a replacement, an unload or an eviction never disturbs them.
//! Adapter memory is budgeted in bytes: when a load goes over the budget, the least recently
//! used adapters that are not pinned leave memory (they stay known, with their version, and
//! are read again from disk when a request names them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use graft_core::adapters::lora::Adapter;
use graft_core::adapters::peft::AdapterError;
use graft_core::backend::GraftBackend;
use graft_core::model::Model;
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
    /// Registry clock at the last request (for LRU eviction).
    last_used: AtomicU64,
}

/// What `/v1/adapters` and `/v1/models` say about an adapter.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterInfo {
    pub rank: usize,
    pub target_modules: Vec<String>,
    pub modules: usize,
    pub bytes: usize,
}

/// What the registry says about one adapter it knows.
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    pub name: String,
    pub version: u64,
    pub source: PathBuf,
    /// `peft` or `gguf`, while in memory.
    pub format: Option<&'static str>,
    /// Shape facts, once a version has loaded.
    pub info: Option<AdapterInfo>,
    /// Requests served under this name, every version.
    pub requests: u64,
    pub in_memory: bool,
}

impl<B: GraftBackend> AdapterEntry<B> {
    /// This version as a catalog entry (requests of this version only).
    pub fn entry(&self) -> CatalogEntry {
        CatalogEntry {
            name: self.name.clone(),
            version: self.version,
            source: self.source.clone(),
            format: Some(self.format),
            info: Some(self.info.clone()),
            requests: self.requests.load(Ordering::Relaxed),
            in_memory: true,
        }
    }
}

/// An adapter the server knows, loaded or not.
#[derive(Clone)]
struct Known {
    source: PathBuf,
    version: u64,
    info: Option<AdapterInfo>,
    requests: u64,
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

/// Where an adapter is now.
pub enum Lookup<B: GraftBackend> {
    Loaded(Arc<AdapterEntry<B>>),
    /// Known but evicted: reload with [`Registry::reload`].
    OnDisk,
    Unknown,
}

pub struct Registry<B: GraftBackend> {
    loaded: RwLock<BTreeMap<String, Arc<AdapterEntry<B>>>>,
    known: RwLock<BTreeMap<String, Known>>,
    next_version: AtomicU64,
    clock: AtomicU64,
    base_name: String,
    /// Adapter paths must resolve inside one of these (empty: any path).
    roots: Vec<PathBuf>,
    /// Bytes of adapters kept in memory (None: unlimited).
    budget: Option<usize>,
    pinned: Vec<String>,
    pub evictions: AtomicU64,
    pub reloads: AtomicU64,
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
    pub fn new(
        base_name: String,
        roots: Vec<PathBuf>,
        budget: Option<usize>,
        pinned: Vec<String>,
    ) -> Self {
        let roots = roots
            .into_iter()
            .map(|r| r.canonicalize().unwrap_or(r))
            .collect();
        Registry {
            loaded: RwLock::new(BTreeMap::new()),
            known: RwLock::new(BTreeMap::new()),
            next_version: AtomicU64::new(1),
            clock: AtomicU64::new(0),
            base_name,
            roots,
            budget,
            pinned,
            evictions: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
        }
    }

    /// Where the adapter called `name` is; a loaded one counts as used now.
    pub fn lookup(&self, name: &str) -> Lookup<B> {
        if let Some(e) = self.loaded.read().expect("registry lock").get(name) {
            e.last_used.store(
                self.clock.fetch_add(1, Ordering::Relaxed),
                Ordering::Relaxed,
            );
            return Lookup::Loaded(e.clone());
        }
        if self.known.read().expect("registry lock").contains_key(name) {
            Lookup::OnDisk
        } else {
            Lookup::Unknown
        }
    }

    /// Adapters in memory, by name.
    pub fn list(&self) -> Vec<Arc<AdapterEntry<B>>> {
        self.loaded
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    /// Every known adapter, in memory or evicted to disk, by name.
    pub fn catalog(&self) -> Vec<CatalogEntry> {
        let loaded = self.loaded.read().expect("registry lock");
        self.known
            .read()
            .expect("registry lock")
            .iter()
            .map(|(n, k)| match loaded.get(n) {
                Some(e) => CatalogEntry {
                    name: n.clone(),
                    version: e.version,
                    source: e.source.clone(),
                    format: Some(e.format),
                    info: Some(e.info.clone()),
                    requests: k.requests + e.requests.load(Ordering::Relaxed),
                    in_memory: true,
                },
                None => CatalogEntry {
                    name: n.clone(),
                    version: k.version,
                    source: k.source.clone(),
                    format: None,
                    info: k.info.clone(),
                    requests: k.requests,
                    in_memory: false,
                },
            })
            .collect()
    }

    /// Bytes of adapters in memory.
    pub fn loaded_bytes(&self) -> usize {
        self.loaded
            .read()
            .expect("registry lock")
            .values()
            .map(|e| e.info.bytes)
            .sum()
    }

    /// Reads and validates the adapter at `path` for `model`, then installs it as `name`
    /// (replacing an older version atomically). Reading happens before any lock is taken.
    ///
    /// # Errors
    /// A bad name, a path outside the roots, a missing or invalid adapter.
    pub fn load(
        &self,
        name: &str,
        path: &Path,
        model: &Model<B>,
    ) -> Result<Arc<AdapterEntry<B>>, RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::BadName(name.into()));
        }
        if name == self.base_name {
            return Err(RegistryError::BaseName(name.into()));
        }
        let version = self.next_version.fetch_add(1, Ordering::SeqCst);
        self.install(name, path, version, model)
    }

    /// Reads an evicted adapter again from its source, with its version.
    ///
    /// # Errors
    /// The adapter is no longer known, or its files changed into something invalid.
    pub fn reload(
        &self,
        name: &str,
        model: &Model<B>,
    ) -> Result<Arc<AdapterEntry<B>>, RegistryError> {
        if let Lookup::Loaded(e) = self.lookup(name) {
            return Ok(e);
        }
        let known = self
            .known
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        let e = self.install(name, &known.source, known.version, model)?;
        self.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(e)
    }

    fn install(
        &self,
        name: &str,
        path: &Path,
        version: u64,
        model: &Model<B>,
    ) -> Result<Arc<AdapterEntry<B>>, RegistryError> {
        let real = path
            .canonicalize()
            .map_err(|_| RegistryError::NotFound(path.display().to_string()))?;
        if !self.roots.is_empty() && !self.roots.iter().any(|r| real.starts_with(r)) {
            return Err(RegistryError::OutsideRoots(path.display().to_string()));
        }
        let (adapter, format) =
            if real.is_dir() && real.join(graft_core::adapters::peft::CONFIG_FILE).is_file() {
                (graft_core::adapters::peft::load(&real, model)?.0, "peft")
            } else if real.is_file() && real.extension().is_some_and(|e| e == "gguf") {
                (graft_core::adapters::gguf_lora::load(&real, model)?, "gguf")
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
            version,
            source: real.clone(),
            format,
            adapter,
            info: info.clone(),
            requests: AtomicU64::new(0),
            last_used: AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed)),
        });
        {
            let mut loaded = self.loaded.write().expect("registry lock");
            let mut known = self.known.write().expect("registry lock");
            let served = loaded
                .get(name)
                .map_or(0, |e| e.requests.load(Ordering::Relaxed));
            let k = known.entry(name.into()).or_insert(Known {
                source: real.clone(),
                version,
                info: None,
                requests: 0,
            });
            k.requests += served;
            k.source = real;
            k.version = version;
            k.info = Some(info);
            loaded.insert(name.into(), entry.clone());
            self.evict_over_budget(&mut loaded, &mut known, name);
        }
        Ok(entry)
    }

    /// Drops least recently used, unpinned adapters (never `keep`) until within the budget.
    fn evict_over_budget(
        &self,
        loaded: &mut BTreeMap<String, Arc<AdapterEntry<B>>>,
        known: &mut BTreeMap<String, Known>,
        keep: &str,
    ) {
        let Some(budget) = self.budget else { return };
        while loaded.values().map(|e| e.info.bytes).sum::<usize>() > budget {
            let victim = loaded
                .values()
                .filter(|e| e.name != keep && !self.pinned.contains(&e.name))
                .min_by_key(|e| e.last_used.load(Ordering::Relaxed))
                .map(|e| e.name.clone());
            let Some(v) = victim else { break };
            if let Some(e) = loaded.remove(&v) {
                if let Some(k) = known.get_mut(&v) {
                    k.requests += e.requests.load(Ordering::Relaxed);
                }
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Forgets `name`; running requests keep their version. Returns whether it was known.
    pub fn unload(&self, name: &str) -> bool {
        let was_loaded = self
            .loaded
            .write()
            .expect("registry lock")
            .remove(name)
            .is_some();
        let was_known = self
            .known
            .write()
            .expect("registry lock")
            .remove(name)
            .is_some();
        was_loaded || was_known
    }
}
