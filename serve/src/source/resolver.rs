//! Resolving, on its first request, an adapter the server does not know: from the configured
//! sources in order, downloaded into a hidden temporary directory inside the adapters
//! directory, read and validated against the model, then renamed into place and served. A
//! download that fails or an adapter that does not read leaves nothing behind; the watcher,
//! which shares what has been applied, does not read the new adapter a second time.
//! Concurrent requests for one missing adapter wait for one download; requests for other
//! adapters are not held up by it (it runs off the async runtime, outside the registry's locks).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use graft_core::backend::GraftBackend;
use graft_core::model::Model;

use super::{Layout, Source, SourceError};
use crate::adapter_files;
use crate::registry::{AdapterEntry, Lookup, Registry, RegistryError};
use crate::watch::Applied;

/// Downloads in progress are directories named so inside the adapters directory (hidden: the
/// watcher and the index skip names starting with a dot).
const TEMP_PREFIX: &str = ".fetch-";

/// Why a missing adapter could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The source has the adapter but it could not be downloaded.
    #[error("adapter '{name}': {source}")]
    Fetch { name: String, source: SourceError },
    /// What was downloaded is not a valid adapter for the model.
    #[error("adapter '{name}' from {location} is refused: {source}")]
    Invalid {
        name: String,
        location: String,
        source: RegistryError,
    },
    /// The adapters directory could not be written.
    #[error("adapter '{name}': {}: {source}", path.display())]
    Local {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Figures for `/metrics`.
#[derive(Default)]
pub struct FetchCounts {
    /// Adapters downloaded, validated and served.
    pub fetched: AtomicU64,
    /// Names no source has.
    pub missing: AtomicU64,
    /// Downloads that failed or gave an invalid adapter.
    pub failed: AtomicU64,
}

pub struct Resolver {
    sources: Vec<Source>,
    /// The adapters directory (absolute).
    dir: PathBuf,
    /// What the watcher has applied.
    applied: Arc<Mutex<Applied>>,
    /// One gate per name being resolved.
    inflight: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    next_tmp: AtomicU64,
    pub counts: FetchCounts,
}

/// Removes a temporary directory on every way out.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Resolver {
    /// A resolver downloading into `dir`; temporary directories a killed server left there
    /// are removed.
    pub fn new(sources: Vec<Source>, dir: PathBuf, applied: Arc<Mutex<Applied>>) -> Self {
        let dir = dir.canonicalize().unwrap_or(dir);
        let leftovers: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(TEMP_PREFIX))
            .map(|e| e.path())
            .collect();
        for path in leftovers {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => tracing::info!(
                    event = "adapter_fetch_leftover_removed",
                    path = %path.display(),
                    "removed {}, a download an earlier run did not finish",
                    path.display()
                ),
                Err(e) => tracing::warn!(
                    event = "adapter_fetch_leftover",
                    path = %path.display(),
                    error = %e,
                    "cannot remove {}: {e}",
                    path.display()
                ),
            }
        }
        Resolver {
            sources,
            dir,
            applied,
            inflight: Mutex::new(HashMap::new()),
            next_tmp: AtomicU64::new(0),
            counts: FetchCounts::default(),
        }
    }

    /// Where `name` is looked for, in order, for a 404's message.
    pub fn locations(&self, name: &str) -> String {
        self.sources
            .iter()
            .map(|s| s.location(name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The adapter `name`: from memory or the adapters directory if it got there meanwhile,
    /// else downloaded from the first source that has it. `None` when none has it.
    ///
    /// # Errors
    /// A bad name, a failed download, an adapter that does not read, a directory that
    /// cannot be written.
    pub fn resolve<B: GraftBackend>(
        &self,
        name: &str,
        registry: &Registry<B>,
        model: &Model<B>,
    ) -> Result<Option<Arc<AdapterEntry<B>>>, ResolveError> {
        // Checked before the name reaches a URL or a path: a name that cannot be an adapter's
        // is not looked for.
        if registry.check_name(name).is_err() {
            self.counts.missing.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let gate = self
            .inflight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone();
        let result = {
            let _held = gate.lock().unwrap_or_else(PoisonError::into_inner);
            self.resolve_one(name, registry, model)
        };
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        // Ours and the map's: nobody else waits at this gate.
        if Arc::strong_count(&gate) == 2 {
            inflight.remove(name);
        }
        drop(inflight);
        match &result {
            Ok(Some(_)) => {}
            Ok(None) => {
                self.counts.missing.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    fn resolve_one<B: GraftBackend>(
        &self,
        name: &str,
        registry: &Registry<B>,
        model: &Model<B>,
    ) -> Result<Option<Arc<AdapterEntry<B>>>, ResolveError> {
        // Resolved by the request this one waited for, or indexed meanwhile.
        match registry.lookup(name) {
            Lookup::Loaded(e) => return Ok(Some(e)),
            Lookup::OnDisk => return Ok(Some(registry.reload(name, model)?)),
            Lookup::Unknown => {}
        }
        // Files already in the directory that the watcher has not indexed yet (or is off).
        for entry in [self.dir.join(name), self.dir.join(format!("{name}.gguf"))] {
            if let Some(found) = adapter_files::found(&entry) {
                let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
                registry.index(name, &found.path, found.symlink)?;
                applied.insert(name.to_string(), found.signature);
                drop(applied);
                return Ok(Some(registry.reload(name, model)?));
            }
        }
        let local = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ResolveError::Local {
                name: name.to_string(),
                path,
                source,
            }
        };
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = TempDir(
            self.dir
                .join(format!("{TEMP_PREFIX}{name}-{}-{n}", std::process::id())),
        );
        std::fs::create_dir(&tmp.0).map_err(local(&tmp.0))?;
        let t0 = std::time::Instant::now();
        let mut fetched = None;
        for source in &self.sources {
            match source.fetch(name, &tmp.0) {
                Ok(layout) => {
                    fetched = Some((source, layout));
                    break;
                }
                Err(SourceError::NotFound { .. }) => continue,
                Err(e) => {
                    return Err(ResolveError::Fetch {
                        name: name.into(),
                        source: e,
                    })
                }
            }
        }
        let Some((source, layout)) = fetched else {
            return Ok(None);
        };
        let (from, to) = match layout {
            Layout::Peft => (tmp.0.clone(), self.dir.join(name)),
            Layout::Gguf => {
                let file = format!("{name}.gguf");
                (tmp.0.join(&file), self.dir.join(file))
            }
        };
        let (adapter, format) =
            Registry::read(&from, model).map_err(|e| ResolveError::Invalid {
                name: name.into(),
                location: source.location(name),
                source: e,
            })?;
        let mut applied = self.applied.lock().unwrap_or_else(PoisonError::into_inner);
        if to.exists() {
            // Someone wrote the adapter there while it was downloading: theirs wins.
            drop(applied);
            return Ok(Some(registry.load(name, &to, model)?));
        }
        // One rename within the directory: the watcher never sees a partial adapter.
        std::fs::rename(&from, &to).map_err(local(&to))?;
        graft_core::atomic::sync_parent(&to).map_err(local(&self.dir))?;
        let entry = registry.adopt(name, &to, adapter, format)?;
        if let Some(signature) = adapter_files::signature(&to) {
            applied.insert(name.to_string(), signature);
        }
        drop(applied);
        self.counts.fetched.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            event = "adapter_fetched",
            adapter = %name,
            version = entry.version,
            source = %source.location(name),
            ms = t0.elapsed().as_millis() as u64,
            "adapter {name} v{} downloaded from {} in {:.0} ms into {}",
            entry.version,
            source.location(name),
            t0.elapsed().as_secs_f64() * 1e3,
            to.display()
        );
        Ok(Some(entry))
    }
}
