//! Runs reported to a real MLflow tracking server (`mlflow server` from PyPI, installed by
//! scripts/prepare-test-models.sh into its own venv, started here on loopback): a sweep is a
//! parent run with a child per combination, each with the resolved config as params, every
//! logged metric, tags and artifacts; a tracker that is down when training starts gets
//! everything once it is back; one that never answers does not stop training; a run
//! interrupted and resumed stays one MLflow run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{graft_train, stderr, write_config};

struct Mlflow {
    child: Child,
    url: String,
}

impl Drop for Mlflow {
    fn drop(&mut self) {
        // `mlflow server` runs uvicorn/gunicorn workers in its process group.
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn start_mlflow(dir: &Path) -> Mlflow {
    let bin = graft_core::cache::cache_dir().join("venv-mlflow/bin/mlflow");
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/prepare-test-models.sh",
        bin.display()
    );
    let port = free_port();
    let mut cmd = Command::new(&bin);
    cmd.args([
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--workers",
        "1",
    ])
    .arg("--backend-store-uri")
    .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
    .arg("--artifacts-destination")
    .arg(dir.join("artifacts"))
    .env("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    .current_dir(dir)
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(dir.join("mlflow.log")).expect("log"));
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let server = Mlflow {
        child: cmd.spawn().expect("spawn mlflow server"),
        url: format!("http://127.0.0.1:{port}"),
    };
    let t0 = Instant::now();
    while ureq::get(&format!("{}/health", server.url)).call().is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "mlflow server did not start: {}",
            std::fs::read_to_string(dir.join("mlflow.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    server
}

fn api(server: &str, path: &str, query: &[(&str, &str)]) -> Value {
    let mut req = ureq::get(&format!("{server}/api/2.0/mlflow/{path}"));
    for (k, v) in query {
        req = req.query(k, v);
    }
    let text = req
        .call()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .into_string()
        .expect("body");
    serde_json::from_str(&text).expect("json")
}

fn search_runs(server: &str, experiment: &str) -> Vec<Value> {
    let id = api(
        server,
        "experiments/get-by-name",
        &[("experiment_name", experiment)],
    )["experiment"]["experiment_id"]
        .as_str()
        .expect("experiment id")
        .to_string();
    let text = ureq::post(&format!("{server}/api/2.0/mlflow/runs/search"))
        .set("Content-Type", "application/json")
        .send_string(&json!({"experiment_ids": [id], "max_results": 100}).to_string())
        .expect("runs/search")
        .into_string()
        .expect("body");
    let v: Value = serde_json::from_str(&text).expect("json");
    v["runs"].as_array().cloned().unwrap_or_default()
}

fn tag<'a>(run: &'a Value, key: &str) -> Option<&'a str> {
    run["data"]["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)?["value"]
        .as_str()
}

fn param<'a>(run: &'a Value, key: &str) -> Option<&'a str> {
    run["data"]["params"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)?["value"]
        .as_str()
}

/// The (step, value) history of `key` in MLflow, by step.
fn history(server: &str, run_id: &str, key: &str) -> Vec<(u64, f64)> {
    let v = api(
        server,
        "metrics/get-history",
        &[("run_id", run_id), ("metric_key", key)],
    );
    let mut h: Vec<(u64, f64)> = v["metrics"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            (
                m["step"]
                    .as_u64()
                    .or_else(|| m["step"].as_str()?.parse().ok())
                    .expect("step"),
                m["value"].as_f64().expect("value"),
            )
        })
        .collect();
    h.sort_by_key(|p| p.0);
    h
}

/// The (step, value) points of `key` in a run's metrics.jsonl.
fn local(run: &Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|r| Some((r["step"].as_u64()?, r.get(key)?.as_f64()?)))
        .collect()
}

fn config_with_tracking(
    dir: &Path,
    url: &str,
    experiment: &str,
    train: &str,
) -> std::path::PathBuf {
    let path = write_config(dir, train);
    let text = std::fs::read_to_string(&path).expect("config")
        + &format!(
            "\n[tracking]\nmlflow = \"{url}\"\nexperiment = \"{experiment}\"\nwait_secs = 60\n"
        );
    std::fs::write(&path, text).expect("write");
    path
}

#[test]
fn a_sweep_is_a_parent_run_with_a_child_per_combination() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_mlflow(dir.path());
    let path = config_with_tracking(
        dir.path(),
        &server.url,
        "graft-sweep",
        "max_steps = 3\nlogging_every = 1\neval_every = 3\neval_samples = 0",
    );
    let text = std::fs::read_to_string(&path).expect("config") + "\n[sweep]\n\"lora.r\" = [2, 3]\n";
    std::fs::write(&path, text).expect("write");
    let out = graft_train(&[path.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", stderr(&out));

    let runs = search_runs(&server.url, "graft-sweep");
    assert_eq!(runs.len(), 3, "parent + 2 children: {runs:#?}");
    let parent = runs
        .iter()
        .find(|r| tag(r, "graft.sweep_runs") == Some("2"))
        .expect("the sweep's parent run");
    let parent_id = parent["info"]["run_id"].as_str().expect("id");
    assert_eq!(parent["info"]["status"], "FINISHED");
    let mut local_runs: Vec<_> = std::fs::read_dir(dir.path().join("runs"))
        .expect("runs")
        .map(|e| e.expect("entry").path())
        .collect();
    local_runs.sort();
    for (run_dir, r) in local_runs.iter().zip(["2", "3"]) {
        let record: Value = serde_json::from_str(
            &std::fs::read_to_string(run_dir.join("mlflow.json")).expect("mlflow.json"),
        )
        .expect("json");
        let id = record["run_id"].as_str().expect("run id");
        let child = runs
            .iter()
            .find(|x| x["info"]["run_id"] == id)
            .expect("the child run named in mlflow.json");
        assert_eq!(tag(child, "mlflow.parentRunId"), Some(parent_id));
        assert_eq!(child["info"]["status"], "FINISHED");
        assert_eq!(
            child["info"]["run_name"].as_str(),
            run_dir.file_name().and_then(|n| n.to_str())
        );
        // Params: the resolved config, flattened.
        assert_eq!(param(child, "lora.r"), Some(r));
        assert_eq!(param(child, "train.max_steps"), Some("3"));
        assert!(param(child, "model.base").is_some_and(|b| b.contains("SmolLM2")));
        assert_eq!(tag(child, "graft.version"), Some(env!("CARGO_PKG_VERSION")));
        // Every logged point, equal to metrics.jsonl.
        for key in ["loss", "lr", "tokens_per_sec", "eval_loss"] {
            let want = local(run_dir, key);
            let got = history(&server.url, id, key);
            assert_eq!(got.len(), want.len(), "{key}: {got:?} vs {want:?}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.0, w.0, "{key} step");
                assert!(
                    (g.1 - w.1).abs() <= 1e-9 * w.1.abs().max(1.0),
                    "{key}: {g:?} vs {w:?}"
                );
            }
        }
        assert_eq!(history(&server.url, id, "peak_rss_mib").len(), 1);
        // Artifacts: the adapter (same bytes' length), the report and the config.
        let listed = api(
            &server.url,
            "artifacts/list",
            &[("run_id", id), ("path", "adapter")],
        );
        let files = listed["files"].as_array().expect("adapter files");
        let weights = files
            .iter()
            .find(|f| f["path"] == "adapter/adapter_model.safetensors")
            .expect("adapter weights uploaded");
        let size = std::fs::metadata(run_dir.join("adapter/adapter_model.safetensors"))
            .expect("local adapter")
            .len();
        assert_eq!(
            weights["file_size"]
                .as_u64()
                .or_else(|| weights["file_size"].as_str()?.parse().ok()),
            Some(size)
        );
        let root = api(&server.url, "artifacts/list", &[("run_id", id)]);
        let names: Vec<&str> = root["files"]
            .as_array()
            .expect("files")
            .iter()
            .filter_map(|f| f["path"].as_str())
            .collect();
        for f in [
            "report.html",
            "config.toml",
            "summary.json",
            "metrics.parquet",
            "adapter",
        ] {
            assert!(names.contains(&f), "{f} not in {names:?}");
        }
    }
}

/// A proxy that answers 503 while `down`, then forwards to `upstream`; counts the 503s.
fn flaky_proxy(upstream: String, down: Arc<AtomicBool>, refused: Arc<AtomicUsize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut client) = conn else { continue };
            if down.load(Ordering::SeqCst) {
                let mut buf = [0u8; 4096];
                let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = client.read(&mut buf);
                let _ = client.write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                refused.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let Ok(server) = TcpStream::connect(upstream.trim_start_matches("http://")) else {
                continue;
            };
            let (mut c2, mut s2) = (
                client.try_clone().expect("clone"),
                server.try_clone().expect("clone"),
            );
            let mut server = server;
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut client, &mut server);
                let _ = server.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    url
}

#[test]
fn a_tracker_that_is_down_gets_everything_when_it_is_back_and_one_that_never_answers_stops_nothing()
{
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_mlflow(dir.path());
    let down = Arc::new(AtomicBool::new(true));
    let refused = Arc::new(AtomicUsize::new(0));
    let proxy = flaky_proxy(server.url.clone(), down.clone(), refused.clone());
    let path = config_with_tracking(
        dir.path(),
        &proxy,
        "graft-flaky",
        "max_steps = 6\nlogging_every = 1\neval_samples = 0",
    );
    let child = Command::new(env!("CARGO_BIN_EXE_graft-train"))
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn graft-train");
    // Bring the tracker back once training has logged with it down.
    let runs = dir.path().join("runs");
    let t0 = Instant::now();
    loop {
        let logged = std::fs::read_dir(&runs)
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| std::fs::read_to_string(e.ok()?.path().join("metrics.jsonl")).ok())
            .is_some_and(|m| m.lines().count() >= 2);
        if logged && refused.load(Ordering::SeqCst) >= 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "training did not log"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    down.store(false, Ordering::SeqCst);
    let out = child.wait_with_output().expect("graft-train");
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("training goes on"),
        "the outage is reported: {err}"
    );
    assert!(err.contains("reachable again"), "{err}");
    let run_dir = crate::single_run(dir.path());
    let runs = search_runs(&server.url, "graft-flaky");
    assert_eq!(runs.len(), 1);
    let id = runs[0]["info"]["run_id"].as_str().expect("id");
    assert_eq!(runs[0]["info"]["status"], "FINISHED");
    let want = local(&run_dir, "loss");
    assert_eq!(want.len(), 6);
    assert_eq!(
        history(&server.url, id, "loss").len(),
        6,
        "every step arrived"
    );

    // Nothing listens at all, and the run has 1 s at its end for it: it still trains.
    let dir2 = tempfile::tempdir().expect("temp dir");
    let path = config_with_tracking(
        dir2.path(),
        &format!("http://127.0.0.1:{}", free_port()),
        "x",
        "max_steps = 2\neval_samples = 0",
    );
    let text = std::fs::read_to_string(&path)
        .expect("config")
        .replace("wait_secs = 60", "wait_secs = 1");
    std::fs::write(&path, text).expect("write");
    let t0 = Instant::now();
    let out = graft_train(&[path.to_str().expect("utf-8")]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("training goes on") && err.contains("gave up after"),
        "{err}"
    );
    let run = crate::single_run(dir2.path());
    assert!(
        run.join("adapter/adapter_model.safetensors").is_file()
            && run.join("summary.json").is_file()
    );
    assert!(!run.join("mlflow.json").exists(), "no MLflow run was made");
    eprintln!("run with an unreachable tracker: {:.1?}", t0.elapsed());
}

#[test]
fn an_interrupted_run_resumed_continues_the_same_mlflow_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_mlflow(dir.path());
    let path = config_with_tracking(
        dir.path(),
        &server.url,
        "graft-resume",
        "max_steps = 6\nsave_every = 2\nkeep_last_checkpoints = 5\nlogging_every = 1\neval_samples = 0",
    );
    let (run, exit) =
        crate::resume::interrupt_after_step_2(dir.path(), &path, "-INT", |r: &Path| {
            r.join("mlflow.json").is_file()
        });
    assert!(exit.success());
    assert!(!run.join("adapter").exists(), "the run was interrupted");
    let (_, first_id) = graft_train::tracking::recorded(&run).expect("mlflow.json");
    let runs = search_runs(&server.url, "graft-resume");
    assert_eq!(runs.len(), 1);
    assert_eq!(
        runs[0]["info"]["status"], "KILLED",
        "interrupted: {runs:#?}"
    );
    let before = history(&server.url, &first_id, "loss").len();
    assert!(
        (2..6).contains(&before),
        "{before} steps before the interruption"
    );

    let out = graft_train(&["resume", run.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (_, id) = graft_train::tracking::recorded(&run).expect("mlflow.json");
    assert_eq!(id, first_id, "mlflow.json still names the first run");
    let runs = search_runs(&server.url, "graft-resume");
    assert_eq!(runs.len(), 1, "no second MLflow run: {runs:#?}");
    assert_eq!(runs[0]["info"]["run_id"].as_str(), Some(id.as_str()));
    assert_eq!(runs[0]["info"]["status"], "FINISHED");
    // Each step once, equal to metrics.jsonl, the steps before and after the resume together.
    let want = local(&run, "loss");
    let got = history(&server.url, &id, "loss");
    assert_eq!(want.len(), 6);
    assert_eq!(
        got.iter().map(|p| p.0).collect::<Vec<_>>(),
        want.iter().map(|p| p.0).collect::<Vec<_>>()
    );
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g.1 - w.1).abs() <= 1e-9 * w.1.abs().max(1.0),
            "{g:?} vs {w:?}"
        );
    }
    let root = api(&server.url, "artifacts/list", &[("run_id", id.as_str())]);
    assert!(
        root["files"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["path"] == "adapter")),
        "the final adapter reached the resumed run: {root}"
    );
}

#[test]
fn a_tracker_address_that_is_not_http_is_refused_by_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = config_with_tracking(dir.path(), "databricks", "x", "max_steps = 1");
    let out = graft_train(&["data", path.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("tracking.mlflow") && err.contains("\"databricks\""),
        "{err}"
    );
}
