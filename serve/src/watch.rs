//! Watching the adapters directory: new adapters are loaded, changed ones reloaded as a new
//! version, removed ones unloaded. A file set counts only once it has stayed the same (size
//! and modification time of every file) over two polls, so a partially written adapter is
//! never read. Problems are logged and retried when the files change again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use graft_core::backend::GraftBackend;
use graft_core::model::Model;

use crate::registry::Registry;

/// Size and modification time of the files that make up an adapter.
pub type Signature = Vec<(u64, Option<SystemTime>)>;

/// The signatures of the adapters in `dir` now: what the server loads at start-up, so the
/// watcher does not load them again.
pub fn snapshot(dir: &Path) -> BTreeMap<String, Signature> {
    scan(dir)
        .into_iter()
        .filter_map(|(name, path)| signature(&path).map(|s| (name, s)))
        .collect()
}

fn signature(path: &Path) -> Option<Signature> {
    let files: Vec<PathBuf> = if path.is_dir() {
        [
            graft_core::adapters::peft::CONFIG_FILE,
            graft_core::adapters::peft::WEIGHTS_FILE,
        ]
        .iter()
        .map(|f| path.join(f))
        .collect()
    } else {
        vec![path.to_path_buf()]
    };
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .map(|m| (m.len(), m.modified().ok()))
        })
        .collect()
}

/// Adapters in `dir`: PEFT subdirectories and `.gguf` files, by name.
pub fn scan(dir: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let name = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if (p.is_dir() && p.join(graft_core::adapters::peft::CONFIG_FILE).is_file())
            || p.extension().is_some_and(|x| x == "gguf")
        {
            out.insert(name, p);
        }
    }
    out
}

/// Polls `dir` every `interval`, applying changes to `registry`, until the registry is
/// dropped (the server stopped). `applied` is the [`snapshot`] taken before the start-up
/// load.
pub fn run<B: GraftBackend>(
    registry: Weak<Registry<B>>,
    model: Arc<Model<B>>,
    dir: PathBuf,
    interval: Duration,
    mut applied: BTreeMap<String, Signature>,
) {
    // `applied`: what is loaded from the directory; `candidates`: changes waiting to be stable
    let mut candidates: BTreeMap<String, Signature> = BTreeMap::new();
    loop {
        std::thread::sleep(interval);
        let Some(registry) = registry.upgrade() else {
            return; // the server is gone
        };
        let now = scan(&dir);
        for (name, path) in &now {
            let Some(sig) = signature(path) else { continue };
            if applied.get(name) == Some(&sig) {
                candidates.remove(name);
                continue;
            }
            if candidates.get(name) != Some(&sig) {
                candidates.insert(name.clone(), sig); // seen changing: wait one more poll
                continue;
            }
            candidates.remove(name);
            match registry.load(name, path, &model) {
                Ok(e) => tracing::info!(
                    event = "adapter_loaded",
                    adapter = %name,
                    version = e.version,
                    path = %path.display(),
                    "adapter loaded from the adapters directory"
                ),
                Err(err) => tracing::warn!(
                    event = "adapter_load_failed",
                    adapter = %name,
                    error = %err,
                    "adapter in the adapters directory not loaded"
                ),
            }
            applied.insert(name.clone(), sig);
        }
        let gone: Vec<String> = applied
            .keys()
            .filter(|n| !now.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            applied.remove(&name);
            candidates.remove(&name);
            if registry.unload(&name) {
                tracing::info!(
                    event = "adapter_unloaded",
                    adapter = %name,
                    "adapter removed from the adapters directory"
                );
            }
        }
    }
}
