//! Watching the adapters directory: new adapters are indexed, changed ones indexed again as a
//! new version, removed ones forgotten. An adapter that is not in memory is not read here — it
//! is read on its first request — so a half-written new adapter costs nothing until someone
//! asks for it (and is then refused as broken until its files change again). An adapter in
//! memory whose files change is read here, and replaced only if the new files are a valid
//! adapter: a partial or bad write does not take a good version out of service (running and new
//! requests keep it until the files change again and read well). Should that version leave
//! memory meanwhile (evicted by the budget), the bad files are all there is: it is refused as
//! broken, as any adapter whose files are bad.
//!
//! Changes come from the OS (inotify on Linux, through the `notify` crate): a change is
//! applied once its entry has been quiet for a quarter of the watch interval, so it is seen
//! within one interval of the last write, and the cost does not grow with the number of
//! adapters. Where the OS cannot watch (no inotify, its watch limit reached), the directory
//! is listed every interval and each adapter's signature (sizes and modification times)
//! compared: a few `stat`s per adapter, no file read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use graft_core::backend::GraftBackend;
use graft_core::model::Model;
use notify::{RecursiveMode, Watcher};

use crate::adapter_files::{self, Found, Signature};
use crate::registry::Registry;

/// What the watcher has applied: each adapter's signature when it was last indexed.
pub type Applied = BTreeMap<String, Signature>;

/// What changes are applied to: the server's registry, and its model (adapters in memory are
/// checked against it when their files change). Weak: the watcher ends with the server.
pub struct Served<B: GraftBackend> {
    pub registry: Weak<Registry<B>>,
    pub model: Weak<Model<B>>,
}

/// Watches `dir` and applies its changes to `served` until the registry is dropped (the
/// server stopped). `applied` is what the start-up scan indexed, shared with whatever else
/// puts adapters into `dir` (the resolver of adapter sources), which records there what it
/// installed. `events`: use the OS's file events where it has them (else list the directory
/// every interval).
pub fn run<B: GraftBackend>(
    served: Served<B>,
    dir: PathBuf,
    interval: Duration,
    events: bool,
    applied: Arc<Mutex<Applied>>,
) {
    let lock = || applied.lock().unwrap_or_else(PoisonError::into_inner);
    // Events name absolute paths: compare them with the absolute directory.
    let dir = dir.canonicalize().unwrap_or(dir);
    let (tx, rx) = std::sync::mpsc::channel();
    let watcher = if events {
        notify::recommended_watcher(tx).and_then(|mut w| {
            w.watch(&dir, RecursiveMode::Recursive)?;
            Ok(w)
        })
    } else {
        Err(notify::Error::generic("--watch-poll"))
    };
    let events = match watcher {
        Ok(w) => {
            tracing::info!(
                event = "adapter_watch",
                dir = %dir.display(),
                "watching {} for adapter changes",
                dir.display()
            );
            Some((w, rx))
        }
        Err(e) => {
            tracing::info!(
                event = "adapter_watch_polling",
                dir = %dir.display(),
                reason = %e,
                "listing {} every {} ms for adapter changes ({e})",
                dir.display(),
                interval.as_millis()
            );
            None
        }
    };
    // Whatever changed between the start-up scan and the watch being in place.
    if !rescan(&served, &dir, &mut lock()) {
        return;
    }
    if let Some((_watcher, rx)) = events {
        loop {
            let Some(changed) = next_changes(&rx, &dir, interval) else {
                return; // the watcher is gone
            };
            let alive = match changed {
                Changes::Entries(entries) => {
                    let mut applied = lock();
                    entries
                        .iter()
                        .all(|e| apply(&served, &dir, e, &mut applied))
                }
                Changes::Everything => rescan(&served, &dir, &mut lock()),
                Changes::None => served.registry.strong_count() > 0,
                Changes::OutOfWatches => {
                    tracing::warn!(
                        event = "adapter_watch_polling",
                        dir = %dir.display(),
                        "the OS's file-watch limit is reached; listing {} every {} ms instead",
                        dir.display(),
                        interval.as_millis()
                    );
                    break;
                }
            };
            if !alive {
                return;
            }
        }
    }
    poll(&served, &dir, interval, &applied);
}

/// Lists `dir` every `interval` until the server is gone.
fn poll<B: GraftBackend>(
    served: &Served<B>,
    dir: &Path,
    interval: Duration,
    applied: &Mutex<Applied>,
) {
    // Listings start every interval (a slow listing does not push the next one back).
    let mut next = Instant::now() + interval;
    loop {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next = (next + interval).max(Instant::now());
        let mut applied = applied.lock().unwrap_or_else(PoisonError::into_inner);
        if !rescan(served, dir, &mut applied) {
            return;
        }
    }
}

enum Changes {
    /// These directory entries changed.
    Entries(BTreeSet<PathBuf>),
    /// Events were lost (the OS queue overflowed): compare everything.
    Everything,
    /// Nothing within an interval.
    None,
    /// The OS cannot watch more directories: events would be missed from now on.
    OutOfWatches,
}

/// Waits up to `interval` for a first event, then gathers events until the entries have been
/// quiet for a quarter interval (at most one interval in all).
fn next_changes(
    rx: &Receiver<notify::Result<notify::Event>>,
    dir: &Path,
    interval: Duration,
) -> Option<Changes> {
    let settle = (interval / 4).max(Duration::from_millis(1));
    let mut entries = BTreeSet::new();
    let mut everything = false;
    let mut first: Option<Instant> = None;
    loop {
        let wait = match first {
            None => interval,
            // Quiet for `settle`, or one interval since the first event: apply what came.
            Some(t0) => match interval.checked_sub(t0.elapsed()) {
                Some(left) if !left.is_zero() => settle.min(left),
                _ => break,
            },
        };
        match rx.recv_timeout(wait) {
            // Reads (the server's own, of adapters it loads) change nothing.
            Ok(Ok(event)) if matches!(event.kind, notify::EventKind::Access(_)) => {}
            Ok(Ok(event)) => {
                first.get_or_insert_with(Instant::now);
                if event.need_rescan() {
                    everything = true;
                }
                entries.extend(event.paths.iter().filter_map(|p| entry_of(dir, p)));
            }
            Ok(Err(e)) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                return Some(Changes::OutOfWatches)
            }
            Ok(Err(e)) => {
                tracing::warn!(event = "adapter_watch_error", error = %e, "{e}");
                first.get_or_insert_with(Instant::now);
                everything = true;
            }
            Err(RecvTimeoutError::Timeout) if first.is_none() => return Some(Changes::None),
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
    Some(if everything {
        Changes::Everything
    } else {
        Changes::Entries(entries)
    })
}

/// The entry of `dir` (`dir/<entry>`) that the changed path `path` lies in.
fn entry_of(dir: &Path, path: &Path) -> Option<PathBuf> {
    match path.strip_prefix(dir).ok()?.components().next()? {
        Component::Normal(first) => Some(dir.join(first)),
        _ => None,
    }
}

/// Applies the state of one directory entry; false once the server is gone.
fn apply<B: GraftBackend>(
    served: &Served<B>,
    dir: &Path,
    entry: &Path,
    applied: &mut Applied,
) -> bool {
    let Some(registry) = served.registry.upgrade() else {
        return false;
    };
    let Some(name) = adapter_files::name_of(entry) else {
        return true;
    };
    match adapter_files::found(entry) {
        Some(found) => index(&registry, served, &name, found, applied),
        // Gone (or no longer an adapter) — unless the name's other form is there (`a/` and
        // `a.gguf` both name `a`).
        None => {
            if applied.contains_key(&name) && !adapter_files::holds(dir, &name) {
                forget(&registry, &name, applied);
            }
        }
    }
    true
}

/// Lists `dir` and applies every difference from `applied`; false once the server is gone.
fn rescan<B: GraftBackend>(served: &Served<B>, dir: &Path, applied: &mut Applied) -> bool {
    let Some(registry) = served.registry.upgrade() else {
        return false;
    };
    let now = adapter_files::scan(dir);
    for (name, found) in now.iter() {
        index(&registry, served, name, found.clone(), applied);
    }
    let gone: Vec<String> = applied
        .keys()
        .filter(|n| !now.contains_key(*n))
        .cloned()
        .collect();
    for name in gone {
        forget(&registry, &name, applied);
    }
    true
}

/// Indexes `found` as `name` if its files differ from what was applied; an adapter in memory
/// is read at once instead, and replaced only if its new files read well.
fn index<B: GraftBackend>(
    registry: &Registry<B>,
    served: &Served<B>,
    name: &str,
    found: Found,
    applied: &mut Applied,
) {
    if applied.get(name) == Some(&found.signature) {
        return;
    }
    let in_memory = registry.catalog_entry(name).filter(|e| e.in_memory);
    if let (Some(old), Some(model)) = (in_memory, served.model.upgrade()) {
        replace(registry, &model, name, old.version, &found);
        applied.insert(name.to_string(), found.signature);
        return;
    }
    match registry.index(name, &found.path, found.symlink) {
        Ok(version) => tracing::info!(
            event = "adapter_indexed",
            adapter = %name,
            version,
            path = %found.path.display(),
            "adapter {name} v{version} indexed from {} (read on first use)",
            found.path.display()
        ),
        Err(err) => tracing::warn!(
            event = "adapter_index_failed",
            adapter = %name,
            error = %err,
            "adapter {name} in the adapters directory not indexed: {err}"
        ),
    }
    applied.insert(name.to_string(), found.signature);
}

/// Reads the changed files of `name` (in memory as `version`) and installs them as a new
/// version; when they do not read as a valid adapter, `version` stays in service.
fn replace<B: GraftBackend>(
    registry: &Registry<B>,
    model: &Arc<Model<B>>,
    name: &str,
    version: u64,
    found: &Found,
) {
    match registry.load(name, &found.path, model) {
        Ok(e) => tracing::info!(
            event = "adapter_replaced",
            adapter = %name,
            version = e.version,
            path = %found.path.display(),
            "adapter {name} v{} read from {} (its files changed while in memory)",
            e.version,
            found.path.display()
        ),
        Err(err) => {
            tracing::warn!(
                event = "adapter_replace_failed",
                adapter = %name,
                version,
                error = %err,
                "adapter {name}: its changed files do not read as an adapter ({err}); v{version} \
                 stays in service until they change again"
            );
            // Files still being written are read again on their next change, unmarked.
            let now = adapter_files::signature(&found.path);
            if err.is_bad_files() && now.as_ref() == Some(&found.signature) {
                registry.mark_bad_files(name, version, err.to_string(), now);
            }
        }
    }
}

fn forget<B: GraftBackend>(registry: &Registry<B>, name: &str, applied: &mut Applied) {
    applied.remove(name);
    if registry.unload(name) {
        tracing::info!(
            event = "adapter_unloaded",
            adapter = %name,
            "adapter {name} removed from the adapters directory"
        );
    }
}
