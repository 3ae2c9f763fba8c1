//! Watching the adapters directory: new adapters are loaded, changed ones reloaded as a new
//! version, removed ones unloaded. A file set counts only once it has stayed the same (size
//! and modification time of every file) over two polls, so a partially written adapter is
//! never read. Problems are logged and retried when the files change again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use graft_core::backend::GraftBackend;

use crate::api::AppState;

/// Size and modification time of the files that make up an adapter.
type Signature = Vec<(u64, Option<SystemTime>)>;

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

fn log(event: &str, name: &str, detail: &str) {
    let ts = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    eprintln!(
        "{}",
        serde_json::json!({"ts": ts, "level": "info", "event": event, "adapter": name, "detail": detail})
    );
}

/// Polls `dir` every `interval` until the state is dropped elsewhere (runs for the process).
pub fn run<B: GraftBackend>(state: Arc<AppState<B>>, dir: PathBuf, interval: Duration) {
    // What is loaded from the directory, and candidates waiting to be stable.
    let mut applied: BTreeMap<String, Signature> = BTreeMap::new();
    for (name, path) in scan(&dir) {
        if let Some(sig) = signature(&path) {
            applied.insert(name, sig); // loaded at start-up
        }
    }
    let mut candidates: BTreeMap<String, Signature> = BTreeMap::new();
    loop {
        std::thread::sleep(interval);
        if Arc::strong_count(&state) == 1 {
            return; // the server is gone
        }
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
            match state.registry.load(name, path, &state.model) {
                Ok(e) => log(
                    "adapter_loaded",
                    name,
                    &format!("version {} from {}", e.version, path.display()),
                ),
                Err(err) => log("adapter_load_failed", name, &err.to_string()),
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
            if state.registry.unload(&name) {
                log(
                    "adapter_unloaded",
                    &name,
                    "removed from the adapters directory",
                );
            }
        }
    }
}
