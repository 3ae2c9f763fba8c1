//! The adapters a server knows, by name, and which of them are in memory.
//!
//! Loading a name that exists replaces it with a new version; requests hold an `Arc` of the
//! version they started with, so a replacement, an unload or an eviction never disturbs them.
//! Adapter memory is budgeted in bytes: when a load goes over the budget, the least recently
//! used adapters that are not pinned leave memory (they stay known, with their version, and
//! are read again from disk when a request names them).
//!
//! An adapters directory is *indexed*, not loaded: each adapter is known by name and path
//! (a few hundred bytes) and read on its first request, so start-up does not depend on how
//! many adapters there are. An adapter whose files turn out to be invalid is marked broken
//! with the reason, which requests get at once (400) until its files change. Concurrent
//! first requests for one adapter read it once.
//!
//! Locks: `loaded` before `known` wherever both are held; adapters leaving memory are dropped
//! after both are released.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use graft_core::adapters::lora::{Adapter, AdapterDtype};
use graft_core::adapters::peft::AdapterError;
use graft_core::backend::GraftBackend;
use graft_core::model::Model;
use serde::Serialize;

use crate::adapter_files::{self, Signature};

/// Loads of different adapters go in parallel; loads of one adapter (or of two that share a
/// stripe) one at a time.
const LOAD_STRIPES: usize = 64;

/// One loaded version of an adapter.
pub struct AdapterEntry<B: GraftBackend> {
    pub name: String,
    pub version: u64,
    pub source: PathBuf,
    /// `peft` or `gguf`.
    pub format: &'static str,
    pub adapter: Adapter<B>,
    pub info: AdapterInfo,
    /// Requests served under this name, every version (shared with the registry's record).
    pub requests: Arc<AtomicU64>,
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
    /// Why this version could not be read (it is not read again until its files change).
    pub broken: Option<String>,
}

impl<B: GraftBackend> AdapterEntry<B> {
    /// This version as a catalog entry.
    pub fn entry(&self) -> CatalogEntry {
        CatalogEntry {
            name: self.name.clone(),
            version: self.version,
            source: self.source.clone(),
            format: Some(self.format),
            info: Some(self.info.clone()),
            requests: self.requests.load(Ordering::Relaxed),
            in_memory: true,
            broken: None,
        }
    }
}

/// An adapter the server knows, loaded or not.
#[derive(Clone)]
struct Known {
    source: PathBuf,
    version: u64,
    /// Shape facts of the last version read (None: never read).
    info: Option<AdapterInfo>,
    requests: Arc<AtomicU64>,
    broken: Option<Box<Broken>>,
}

/// Why reading an adapter failed, and the signature of its files then.
#[derive(Clone)]
struct Broken {
    message: String,
    signature: Option<Signature>,
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
    #[error("adapter '{name}' is broken (its files have not changed since): {message}")]
    Broken { name: String, message: String },
}

impl RegistryError {
    /// Whether the files themselves are at fault (the adapter is broken until they change),
    /// as opposed to a name, a path or a read that failed for reasons of the server's own.
    pub fn is_bad_files(&self) -> bool {
        match self {
            RegistryError::Adapter(AdapterError::Io { source, .. }) => {
                source.kind() == std::io::ErrorKind::NotFound
            }
            RegistryError::Adapter(_) => true,
            _ => false,
        }
    }
}

/// Where an adapter is now.
pub enum Lookup<B: GraftBackend> {
    Loaded(Arc<AdapterEntry<B>>),
    /// Known but not in memory (indexed, evicted or broken): read with [`Registry::reload`].
    OnDisk,
    Unknown,
}

/// Which version an install is for.
enum Install {
    /// A new version (an explicit load).
    New,
    /// A read of this known version (first use, after eviction): installed only if the name
    /// is still known at that version.
    Known(u64),
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
    /// How adapters' A and B are kept in memory.
    dtype: AdapterDtype,
    /// One lock per stripe of names, held while an adapter is read on first use.
    loading: [Mutex<()>; LOAD_STRIPES],
    pub evictions: AtomicU64,
    pub reloads: AtomicU64,
    /// Indexed adapters read for the first time.
    pub first_loads: AtomicU64,
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
            dtype: AdapterDtype::F32,
            loading: std::array::from_fn(|_| Mutex::new(())),
            evictions: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            first_loads: AtomicU64::new(0),
        }
    }

    /// Keeps every adapter installed from now on with its A and B stored as `dtype` (their
    /// bytes, and so the memory budget, are counted as stored).
    pub fn with_dtype(mut self, dtype: AdapterDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// Whether `name` is pinned (never evicted).
    pub fn is_pinned(&self, name: &str) -> bool {
        self.pinned.iter().any(|p| p == name)
    }

    /// Adapters known (in memory, on disk or broken).
    pub fn known_count(&self) -> usize {
        self.known.read().expect("registry lock").len()
    }

    /// Knows the adapter at `path` as `name`, as a new version, without reading it: it is read
    /// on its first request. An older version leaves memory (running requests keep it) and a
    /// broken mark is cleared. `symlink`: the entry is a link, whose target must lie inside
    /// the roots (other entries of an adapters directory lie inside it by construction).
    ///
    /// # Errors
    /// A bad name, or a link that leads outside the roots.
    pub fn index(&self, name: &str, path: &Path, symlink: bool) -> Result<u64, RegistryError> {
        self.check_name(name)?;
        if symlink {
            self.inside_roots(path)?;
        }
        let _old; // dropped after the locks
        let mut loaded = self.loaded.write().expect("registry lock");
        let mut known = self.known.write().expect("registry lock");
        let version = self.next_version.fetch_add(1, Ordering::SeqCst);
        _old = loaded.remove(name);
        let k = known.entry(name.into()).or_insert_with(|| Known {
            source: PathBuf::new(),
            version,
            info: None,
            requests: Arc::default(),
            broken: None,
        });
        k.source = path.to_path_buf();
        k.version = version;
        k.info = None;
        k.broken = None;
        Ok(version)
    }

    /// Whether `name` may name an adapter (letters, digits, `-_.`, not the base's name).
    ///
    /// # Errors
    /// Why it may not.
    pub fn check_name(&self, name: &str) -> Result<(), RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::BadName(name.into()));
        }
        if name == self.base_name {
            return Err(RegistryError::BaseName(name.into()));
        }
        Ok(())
    }

    /// The real path of `path`, which must lie inside one of the roots.
    fn inside_roots(&self, path: &Path) -> Result<PathBuf, RegistryError> {
        let real = path
            .canonicalize()
            .map_err(|_| RegistryError::NotFound(path.display().to_string()))?;
        if !self.roots.is_empty() && !self.roots.iter().any(|r| real.starts_with(r)) {
            return Err(RegistryError::OutsideRoots(path.display().to_string()));
        }
        Ok(real)
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
            .map(|(n, k)| Self::card(n, k, loaded.get(n)))
            .collect()
    }

    /// What the catalog says about `name`, if it is known.
    pub fn catalog_entry(&self, name: &str) -> Option<CatalogEntry> {
        let loaded = self.loaded.read().expect("registry lock");
        let known = self.known.read().expect("registry lock");
        known
            .get(name)
            .map(|k| Self::card(name, k, loaded.get(name)))
    }

    fn card(name: &str, k: &Known, loaded: Option<&Arc<AdapterEntry<B>>>) -> CatalogEntry {
        match loaded {
            Some(e) => CatalogEntry {
                name: name.into(),
                version: e.version,
                source: e.source.clone(),
                format: Some(e.format),
                info: Some(e.info.clone()),
                requests: k.requests.load(Ordering::Relaxed),
                in_memory: true,
                // Files that changed into something unreadable while this version serves.
                broken: k.broken.as_ref().map(|b| b.message.clone()),
            },
            None => CatalogEntry {
                name: name.into(),
                version: k.version,
                source: k.source.clone(),
                format: None,
                info: k.info.clone(),
                requests: k.requests.load(Ordering::Relaxed),
                in_memory: false,
                broken: k.broken.as_ref().map(|b| b.message.clone()),
            },
        }
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
    /// (replacing an older version atomically). Reading happens before any lock is taken; the
    /// version is given when it is installed, so versions only grow.
    ///
    /// # Errors
    /// A bad name, a path outside the roots, a missing or invalid adapter.
    pub fn load(
        &self,
        name: &str,
        path: &Path,
        model: &Model<B>,
    ) -> Result<Arc<AdapterEntry<B>>, RegistryError> {
        self.check_name(name)?;
        Ok(self.install(name, path, model, Install::New)?.0)
    }

    /// Reads a known adapter that is not in memory (indexed, or evicted) from its source,
    /// with its version. Concurrent calls for one name read it once; a broken adapter is
    /// refused without reading until its files change.
    ///
    /// # Errors
    /// The adapter is no longer known, or its files are not a valid adapter.
    pub fn reload(
        &self,
        name: &str,
        model: &Model<B>,
    ) -> Result<Arc<AdapterEntry<B>>, RegistryError> {
        let stripe = name.bytes().fold(0usize, |h, b| {
            h.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        let _reading = self.loading[stripe % LOAD_STRIPES]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Lookup::Loaded(e) = self.lookup(name) {
            return Ok(e); // read by the request this one waited for
        }
        let known = self
            .known
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        let before = adapter_files::signature(&known.source);
        if let Some(b) = &known.broken {
            if before == b.signature {
                return Err(RegistryError::Broken {
                    name: name.into(),
                    message: b.message.clone(),
                });
            }
        }
        match self.install(name, &known.source, model, Install::Known(known.version)) {
            Ok((e, installed)) => {
                if installed {
                    let counter = if known.info.is_some() {
                        &self.reloads
                    } else {
                        &self.first_loads
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(e)
            }
            Err(err) => {
                // Broken only if the files did not change while they were read (a file
                // being written is read again next time instead).
                let after = adapter_files::signature(&known.source);
                if err.is_bad_files() && after == before {
                    let broken = Box::new(Broken {
                        message: err.to_string(),
                        signature: after,
                    });
                    let mut all = self.known.write().expect("registry lock");
                    if let Some(k) = all.get_mut(name).filter(|k| k.version == known.version) {
                        k.broken = Some(broken);
                    }
                }
                Err(err)
            }
        }
    }

    /// Records that the files of `name` changed into something that is not a valid adapter
    /// while `version` is in memory (the watcher read them and kept `version` in service): the
    /// card shows why, and should `version` leave memory, the files are refused without
    /// reading until they change (`signature`: theirs when they were read).
    pub fn mark_bad_files(
        &self,
        name: &str,
        version: u64,
        message: String,
        signature: Option<Signature>,
    ) {
        let mut known = self.known.write().expect("registry lock");
        if let Some(k) = known.get_mut(name).filter(|k| k.version == version) {
            k.broken = Some(Box::new(Broken { message, signature }));
        }
    }

    /// Reads the adapter at `path` and installs it as `name`; returns the entry and whether it
    /// was installed (an `Install::Known` read of a version that was removed or re-indexed
    /// meanwhile is not; the caller's request is served from what was read either way).
    fn install(
        &self,
        name: &str,
        path: &Path,
        model: &Model<B>,
        which: Install,
    ) -> Result<(Arc<AdapterEntry<B>>, bool), RegistryError> {
        let real = self.inside_roots(path)?;
        let (adapter, format) = Self::read(&real, model)?;
        Ok(self.put(name, real, adapter, format, which))
    }

    /// Reads and validates the adapter at `path` for `model`: a PEFT directory or a GGUF-LoRA
    /// file. Returns it with its format (`peft` or `gguf`).
    ///
    /// # Errors
    /// Nothing that reads as an adapter at `path`, or one that does not fit `model`.
    pub fn read(
        path: &Path,
        model: &Model<B>,
    ) -> Result<(Adapter<B>, &'static str), RegistryError> {
        if path.is_dir() && path.join(graft_core::adapters::peft::CONFIG_FILE).is_file() {
            Ok((graft_core::adapters::peft::load(path, model)?.0, "peft"))
        } else if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            Ok((graft_core::adapters::gguf_lora::load(path, model)?, "gguf"))
        } else {
            Err(RegistryError::NotFound(path.display().to_string()))
        }
    }

    /// Installs an adapter already read (with [`Registry::read`]) from `path` as a new version
    /// of `name`.
    ///
    /// # Errors
    /// A bad name, or a path outside the roots.
    pub fn adopt(
        &self,
        name: &str,
        path: &Path,
        adapter: Adapter<B>,
        format: &'static str,
    ) -> Result<Arc<AdapterEntry<B>>, RegistryError> {
        self.check_name(name)?;
        let real = self.inside_roots(path)?;
        Ok(self.put(name, real, adapter, format, Install::New).0)
    }

    /// Installs `adapter`, read from `real`, as `name` (see [`Registry::install`]).
    fn put(
        &self,
        name: &str,
        real: PathBuf,
        adapter: Adapter<B>,
        format: &'static str,
        which: Install,
    ) -> (Arc<AdapterEntry<B>>, bool) {
        let adapter = adapter.stored_as(self.dtype);
        let mut targets: Vec<String> = adapter
            .modules()
            .map(|(_, t, _)| t.name().to_string())
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
        let mut leaving = Vec::new(); // dropped after the locks
        let mut loaded = self.loaded.write().expect("registry lock");
        let mut known = self.known.write().expect("registry lock");
        let current = known.get(name);
        let version = match which {
            Install::New => self.next_version.fetch_add(1, Ordering::SeqCst),
            Install::Known(v) => v,
        };
        let installed = match which {
            Install::New => true,
            Install::Known(v) => current.is_some_and(|k| k.version == v),
        };
        let requests = current.map_or_else(Arc::default, |k| k.requests.clone());
        let entry = Arc::new(AdapterEntry {
            name: name.into(),
            version,
            source: real.clone(),
            format,
            adapter,
            info: info.clone(),
            requests: requests.clone(),
            last_used: AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed)),
        });
        if !installed {
            return (entry, false);
        }
        let k = known.entry(name.into()).or_insert_with(|| Known {
            source: real.clone(),
            version,
            info: None,
            requests,
            broken: None,
        });
        k.source = real;
        k.version = version;
        k.info = Some(info);
        k.broken = None;
        leaving.extend(loaded.insert(name.into(), entry.clone()));
        self.evict_over_budget(&mut loaded, name, &mut leaving);
        drop((loaded, known));
        drop(leaving);
        (entry, true)
    }

    /// Moves least recently used, unpinned adapters (never `keep`) out of `loaded` into
    /// `leaving` until within the budget.
    fn evict_over_budget(
        &self,
        loaded: &mut BTreeMap<String, Arc<AdapterEntry<B>>>,
        keep: &str,
        leaving: &mut Vec<Arc<AdapterEntry<B>>>,
    ) {
        let Some(budget) = self.budget else { return };
        while loaded.values().map(|e| e.info.bytes).sum::<usize>() > budget {
            let victim = loaded
                .values()
                .filter(|e| e.name != keep && !self.is_pinned(&e.name))
                .min_by_key(|e| e.last_used.load(Ordering::Relaxed))
                .map(|e| e.name.clone());
            let Some(v) = victim else { break };
            leaving.extend(loaded.remove(&v));
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets `name`; running requests keep their version. Returns whether it was known.
    pub fn unload(&self, name: &str) -> bool {
        let mut loaded = self.loaded.write().expect("registry lock");
        let mut known = self.known.write().expect("registry lock");
        let was_loaded = loaded.remove(name);
        let was_known = known.remove(name).is_some();
        drop((loaded, known));
        was_loaded.is_some() || was_known
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    use super::*;

    /// Counts the bytes this thread has allocated and not freed.
    struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
    }

    // SAFETY: forwards to the system allocator; the counter is a const-initialized
    // thread-local without a destructor, which an allocator may touch.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = LIVE.try_with(|c| c.set(c.get() + layout.size() as isize));
            System.alloc(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            let _ = LIVE.try_with(|c| c.set(c.get() - layout.size() as isize));
            System.dealloc(ptr, layout);
        }
    }

    #[global_allocator]
    static ALLOC: Counting = Counting;

    use graft_core::device::Cpu;

    #[test]
    fn an_indexed_adapter_costs_under_two_kib() {
        let r: Registry<Cpu> = Registry::new("base".into(), Vec::new(), None, Vec::new());
        let n = 10_000;
        let paths: Vec<PathBuf> = (0..n)
            .map(|i| PathBuf::from(format!("/var/lib/graft/adapters/customer-{i:06}")))
            .collect();
        let before = LIVE.with(Cell::get);
        for (i, p) in paths.iter().enumerate() {
            r.index(&format!("customer-{i:06}"), p, false)
                .expect("index");
        }
        let per = (LIVE.with(Cell::get) - before) as f64 / n as f64;
        println!("registry memory per indexed adapter: {per:.0} bytes ({n} adapters)");
        assert!(per <= 2048.0, "{per} bytes per adapter");
        assert_eq!(r.known_count(), n);
        assert!(matches!(r.lookup("customer-000042"), Lookup::OnDisk));
        assert!(matches!(r.lookup("customer-x"), Lookup::Unknown));
        assert!(r.index("../etc", Path::new("/x"), false).is_err());
        assert!(r.index("base", Path::new("/x"), false).is_err());
    }
}
