//! Runs reported to the tracker a team already uses (MLflow, through its REST API), beside the
//! run directory that stays the record of truth. Each run becomes an MLflow run: the resolved
//! config as params (flattened keys), every logged metric per step, tags (graft version, the
//! config's git commit), and at the end its adapter, report, config and summary as artifacts; a
//! sweep becomes a parent run with one child per combination. `graft-train resume` continues
//! the same MLflow run (its id is kept in the run directory's `mlflow.json`).
//!
//! The tracker never stops or slows training: calls go through a queue that one background
//! thread drains in order, retrying with backoff while the server is unreachable or failing
//! (a warning when that starts and when it recovers); when training ends, the queue gets
//! `tracking.wait_secs` to drain, and whatever is left is only in the run directory.

pub mod mlflow;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use mlflow::{Client, Metric, MlflowError, RemoteRun};

/// The file in a run directory naming the MLflow run it reports to.
pub const RUN_FILE: &str = "mlflow.json";

/// How a run ends, in MLflow's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Finished,
    Failed,
    Killed,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Self::Finished => "FINISHED",
            Self::Failed => "FAILED",
            Self::Killed => "KILLED",
        }
    }
}

/// What a run is created with.
pub struct RunSpec {
    pub name: String,
    pub parent: Option<Run>,
    pub tags: Vec<(String, String)>,
    pub params: Vec<(String, String)>,
    /// Where to record the MLflow run's id (`<run dir>/mlflow.json`), if the run has a
    /// directory.
    pub run_dir: Option<PathBuf>,
    /// An MLflow run to continue instead of creating one (after a resume).
    pub continue_run: Option<String>,
}

enum Event {
    Create {
        id: u64,
        spec: Box<RunSpec>,
    },
    Metrics {
        id: u64,
        points: Vec<Metric>,
    },
    Artifacts {
        id: u64,
        files: Vec<(PathBuf, String)>,
    },
    End {
        id: u64,
        status: Status,
        at: u64,
    },
    Close,
}

/// The connection to one tracking server: a queue and the thread that drains it.
pub struct Tracker {
    tx: Sender<Event>,
    next: Arc<AtomicU64>,
    done: Receiver<()>,
    wait: Duration,
    uri: String,
}

/// One run on the tracker (cheap to clone; events go to the tracker's queue).
#[derive(Clone)]
pub struct Run {
    id: u64,
    tx: Sender<Event>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Tracker {
    /// Starts the queue for the MLflow server at `uri`, runs going to `experiment`; at
    /// [`Tracker::close`], it waits at most `wait` for what is still queued.
    pub fn mlflow(uri: &str, experiment: &str, wait: Duration) -> Self {
        let (tx, rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let worker = Worker {
            client: Client::new(uri),
            experiment: experiment.to_string(),
            experiment_id: None,
            runs: HashMap::new(),
            queue: VecDeque::new(),
            failing_since: None,
        };
        std::thread::Builder::new()
            .name("mlflow".into())
            .spawn(move || {
                worker.drain(&rx);
                let _ = done_tx.send(());
            })
            .expect("spawning the tracking thread");
        Self {
            tx,
            next: Arc::new(AtomicU64::new(0)),
            done,
            wait,
            uri: uri.to_string(),
        }
    }

    /// The tracking server's address.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Queues the creation of a run; its events follow it in order.
    pub fn start(&self, spec: RunSpec) -> Run {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Event::Create {
            id,
            spec: Box::new(spec),
        });
        Run {
            id,
            tx: self.tx.clone(),
        }
    }

    /// Waits (at most `tracking.wait_secs`) for the queue to drain, then lets the thread go.
    pub fn close(self) {
        let _ = self.tx.send(Event::Close);
        if self.done.recv_timeout(self.wait).is_err() {
            tracing::warn!(
                "MLflow at {}: gave up after {:?} with events not sent (the run directory has everything)",
                self.uri,
                self.wait
            );
        }
    }
}

impl Run {
    /// Queues a metrics record (a `metrics.jsonl` line: its `step` and numeric fields).
    pub fn metrics(&self, record: &Value) {
        let Some(step) = record.get("step").and_then(Value::as_u64) else {
            return;
        };
        let timestamp = now_ms();
        let points: Vec<Metric> = record
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| {
                let value = v.as_f64().filter(|x| x.is_finite())?;
                Some(Metric {
                    key: k.clone(),
                    value,
                    step,
                    timestamp,
                })
            })
            .collect();
        if !points.is_empty() {
            let _ = self.tx.send(Event::Metrics {
                id: self.id,
                points,
            });
        }
    }

    /// Queues files to upload as artifacts: (local file, artifact path).
    pub fn artifacts(&self, files: Vec<(PathBuf, String)>) {
        let _ = self.tx.send(Event::Artifacts { id: self.id, files });
    }

    /// Queues the end of the run.
    pub fn end(&self, status: Status) {
        let _ = self.tx.send(Event::End {
            id: self.id,
            status,
            at: now_ms(),
        });
    }
}

/// The tracker run a run directory reported to, from its `mlflow.json`: (server, run id).
pub fn recorded(run_dir: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(run_dir.join(RUN_FILE)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    Some((
        v.get("tracking_uri")?.as_str()?.to_string(),
        v.get("run_id")?.as_str()?.to_string(),
    ))
}

/// The files of a run directory worth keeping on the tracker: the adapter, report, config,
/// summary and metrics table.
pub fn run_artifacts(run_dir: &Path) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    for f in [
        "report.html",
        "config.toml",
        "summary.json",
        "metrics.parquet",
    ] {
        files.push((run_dir.join(f), f.to_string()));
    }
    if let Ok(entries) = std::fs::read_dir(run_dir.join("adapter")) {
        let mut adapter: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        adapter.sort();
        for p in adapter {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push((p, format!("adapter/{name}")));
        }
    }
    files.retain(|(p, _)| p.is_file());
    files
}

struct Worker {
    client: Client,
    experiment: String,
    experiment_id: Option<String>,
    /// Local run id → the MLflow run (None: its creation failed for good; its events are
    /// dropped).
    runs: HashMap<u64, Option<RemoteRun>>,
    queue: VecDeque<Event>,
    failing_since: Option<Instant>,
}

impl Worker {
    fn drain(mut self, rx: &Receiver<Event>) {
        let mut backoff = Duration::from_millis(250);
        loop {
            if self.queue.is_empty() {
                match rx.recv() {
                    Ok(e) => self.queue.push_back(e),
                    Err(_) => return,
                }
            }
            while let Ok(e) = rx.try_recv() {
                self.queue.push_back(e);
            }
            let Some(event) = self.queue.pop_front() else {
                continue;
            };
            if matches!(event, Event::Close) {
                return;
            }
            let event = self.merge_metrics(event);
            match self.handle(&event) {
                Ok(()) => {
                    if let Some(t) = self.failing_since.take() {
                        tracing::info!(
                            "MLflow at {}: reachable again after {:.0?}; queued events sent",
                            self.client.uri(),
                            t.elapsed()
                        );
                    }
                    backoff = Duration::from_millis(250);
                }
                Err(e) if e.transient() => {
                    if self.failing_since.is_none() {
                        tracing::warn!("MLflow: {e}; training goes on, logging locally, retrying");
                        self.failing_since = Some(Instant::now());
                    }
                    self.queue.push_front(event);
                    // Keep taking events while waiting, so Close is seen and the queue keeps
                    // its order.
                    match rx.recv_timeout(backoff) {
                        Ok(e) => self.queue.push_back(e),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => std::thread::sleep(backoff),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    tracing::warn!("MLflow refused a call, dropped: {e}");
                    if let Event::Create { id, .. } = event {
                        self.runs.insert(id, None);
                    }
                }
            }
        }
    }

    /// Joins the metric events queued right behind `event` for the same run into one
    /// request (within MLflow's batch limit).
    fn merge_metrics(&mut self, event: Event) -> Event {
        let Event::Metrics { id, mut points } = event else {
            return event;
        };
        while let Some(Event::Metrics {
            id: next,
            points: more,
        }) = self.queue.front()
        {
            if *next != id || points.len() + more.len() > mlflow::MAX_METRICS_PER_BATCH {
                break;
            }
            if let Some(Event::Metrics { points: more, .. }) = self.queue.pop_front() {
                points.extend(more);
            }
        }
        Event::Metrics { id, points }
    }

    fn remote(&self, id: u64) -> Option<&RemoteRun> {
        self.runs.get(&id).and_then(Option::as_ref)
    }

    fn handle(&mut self, event: &Event) -> Result<(), MlflowError> {
        match event {
            Event::Create { id, spec } => {
                let run = self.create(spec)?;
                if let Some(dir) = &spec.run_dir {
                    let record = json!({"tracking_uri": self.client.uri(), "experiment_id": run.experiment_id, "run_id": run.run_id});
                    if let Err(e) = graft_core::atomic::write_atomic(
                        &dir.join(RUN_FILE),
                        record.to_string().as_bytes(),
                    ) {
                        tracing::warn!("{}: {e}", dir.join(RUN_FILE).display());
                    }
                }
                self.runs.insert(*id, Some(run));
                Ok(())
            }
            Event::Metrics { id, points } => match self.remote(*id) {
                Some(run) => self.client.log_batch(&run.run_id, points, &[], &[]),
                None => Ok(()),
            },
            Event::Artifacts { id, files } => {
                let Some(run) = self.remote(*id) else {
                    return Ok(());
                };
                for (file, name) in files {
                    match std::fs::read(file) {
                        Ok(bytes) => self.client.upload(run, name, &bytes)?,
                        Err(e) => tracing::warn!("MLflow artifact {}: {e}", file.display()),
                    }
                }
                Ok(())
            }
            Event::End { id, status, at } => match self.remote(*id) {
                Some(run) => self
                    .client
                    .update_run(&run.run_id, status.name(), Some(*at)),
                None => Ok(()),
            },
            Event::Close => Ok(()),
        }
    }

    fn create(&mut self, spec: &RunSpec) -> Result<RemoteRun, MlflowError> {
        if let Some(run_id) = &spec.continue_run {
            let run = self.client.get_run(run_id)?;
            self.client.update_run(run_id, "RUNNING", None)?;
            return Ok(run);
        }
        let experiment_id = match &self.experiment_id {
            Some(e) => e.clone(),
            None => {
                let e = self.client.experiment_id(&self.experiment)?;
                self.experiment_id = Some(e.clone());
                e
            }
        };
        let mut tags = spec.tags.clone();
        if let Some(parent) = &spec.parent {
            if let Some(p) = self.remote(parent.id) {
                tags.push(("mlflow.parentRunId".into(), p.run_id.clone()));
            }
        }
        let run = self
            .client
            .create_run(&experiment_id, &spec.name, now_ms(), &tags)?;
        for chunk in spec.params.chunks(mlflow::MAX_PARAMS_PER_BATCH) {
            self.client.log_batch(&run.run_id, &[], chunk, &[])?;
        }
        Ok(run)
    }
}

/// The resolved config (`config.toml` text) as MLflow params: dotted keys, values in TOML
/// syntax, cut to MLflow's length limit.
pub fn params_of(config_toml: &str) -> Vec<(String, String)> {
    let Ok(table) = config_toml.parse::<toml::Table>() else {
        return Vec::new();
    };
    crate::report::compare::flatten_config(&table)
        .into_iter()
        .map(|(k, mut v)| {
            if v.len() > mlflow::MAX_PARAM_VALUE {
                let mut cut = mlflow::MAX_PARAM_VALUE - 3;
                while !v.is_char_boundary(cut) {
                    cut -= 1;
                }
                v.truncate(cut);
                v.push('…');
            }
            (k, v)
        })
        .collect()
}

/// Tags every run gets: graft's version, the config file and, when it is in a git work tree,
/// the commit (`mlflow.source.git.commit`, which MLflow's UI links) and whether the file
/// differs from it.
pub fn source_tags(config: &Path) -> Vec<(String, String)> {
    let mut tags = vec![
        (
            "graft.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        (
            "mlflow.source.name".to_string(),
            config.display().to_string(),
        ),
        ("mlflow.source.type".to_string(), "LOCAL".to_string()),
    ];
    if let Ok(user) = std::env::var("USER") {
        tags.push(("mlflow.user".into(), user));
    }
    let dir = config
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    if let Some(commit) = git(&["rev-parse", "HEAD"]) {
        tags.push(("mlflow.source.git.commit".into(), commit));
        if let Some(name) = config.file_name() {
            let status = git(&["status", "--porcelain", "--", &name.to_string_lossy()]);
            tags.push((
                "graft.config_modified".into(),
                status.is_some_and(|s| !s.is_empty()).to_string(),
            ));
        }
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag<'a>(tags: &'a [(String, String)], key: &str) -> Option<&'a str> {
        tags.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_config_in_a_git_work_tree_is_tagged_with_its_commit_and_whether_it_changed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = dir.path().join("run.toml");
        std::fs::write(&cfg, "[train]\n").expect("write");
        // Outside any work tree: no commit.
        let tags = source_tags(&cfg);
        assert_eq!(tag(&tags, "graft.version"), Some(env!("CARGO_PKG_VERSION")));
        assert!(tag(&tags, "mlflow.source.git.commit").is_none(), "{tags:?}");

        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .status()
                .expect("git")
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "-q"]);
        git(&["add", "run.toml"]);
        git(&["commit", "-q", "-m", "config"]);
        let head = std::process::Command::new("git")
            .arg("-C")
            .arg(dir.path())
            .args(["rev-parse", "HEAD"])
            .output()
            .expect("git");
        let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
        let tags = source_tags(&cfg);
        assert_eq!(tag(&tags, "mlflow.source.git.commit"), Some(head.as_str()));
        assert_eq!(tag(&tags, "graft.config_modified"), Some("false"));
        std::fs::write(&cfg, "[train]\nmax_steps = 2\n").expect("write");
        let tags = source_tags(&cfg);
        assert_eq!(tag(&tags, "graft.config_modified"), Some("true"));
    }
}
