//! A run interrupted by SIGINT (checkpoint on the way out) or SIGKILL (between checkpoints)
//! and resumed ends with the same adapter as an uninterrupted run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{adapter_values, graft_train, single_run, stderr, write_config};

const STEPS: &str = "max_steps = 6\nsave_every = 2\nkeep_last_checkpoints = 5\neval_samples = 0\n";

fn max_abs_diff(a: &std::path::Path, b: &std::path::Path) -> f32 {
    let (a, b) = (adapter_values(a), adapter_values(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, va)| va.iter().zip(&b[k]).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

fn uninterrupted() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), STEPS);
    let out = graft_train(&[path.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = single_run(dir.path());
    (dir, run)
}

/// Starts a run, waits for its step-2 checkpoint, then sends `signal` to it.
fn interrupted(
    signal: &str,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::process::ExitStatus,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), STEPS);
    let (run, exit) = interrupt_after_step_2(dir.path(), &path, signal, |_| true);
    (dir, run, exit)
}

/// Trains `config` (its runs under `dir/runs`), waits for the step-2 checkpoint and for `ready`
/// of the run directory, then sends `signal`; returns the run directory and the exit status.
pub fn interrupt_after_step_2(
    dir: &std::path::Path,
    config: &std::path::Path,
    signal: &str,
    ready: impl Fn(&std::path::Path) -> bool,
) -> (std::path::PathBuf, std::process::ExitStatus) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_graft-train"))
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn graft-train");
    let start = Instant::now();
    let run = loop {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        if let Ok(mut entries) = std::fs::read_dir(dir.join("runs")) {
            if let Some(Ok(e)) = entries.next() {
                if e.path()
                    .join("checkpoints/step-000002/trainer_state.json")
                    .is_file()
                    && ready(&e.path())
                {
                    break e.path();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    (run, exit)
}

#[test]
fn sigint_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run() {
    let (_a, full) = uninterrupted();
    let (_b, run, exit) = interrupted("-INT");
    assert!(
        exit.success(),
        "SIGINT should end the run cleanly, got {exit:?}"
    );
    assert!(
        !run.join("adapter").exists(),
        "an interrupted run has no final adapter"
    );
    let out = graft_train(&["resume", run.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let d = max_abs_diff(&full.join("adapter"), &run.join("adapter"));
    assert!(d <= 1e-6, "resumed adapter differs by {d}");
    let steps = |r: &std::path::Path| {
        std::fs::read_to_string(r.join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .filter(|l| l.contains("\"loss\""))
            .count()
    };
    assert_eq!(steps(&run), 6, "every step logged exactly once");
}

#[test]
fn sigkill_between_checkpoints_resumes_from_the_last_one_and_matches() {
    let (_a, full) = uninterrupted();
    let (_b, run, exit) = interrupted("-KILL");
    assert!(!exit.success());
    let out = graft_train(&["resume", run.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let d = max_abs_diff(&full.join("adapter"), &run.join("adapter"));
    assert!(d <= 1e-6, "resumed adapter differs by {d}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let steps: Vec<u64> = metrics
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["step"]
                .as_u64()
                .expect("step")
        })
        .collect();
    assert_eq!(
        steps,
        (1..=6).collect::<Vec<_>>(),
        "steps re-run after the checkpoint are logged once"
    );
}

/// The names of a run's checkpoint directories, temporary ones included.
fn checkpoint_entries(run: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .expect("checkpoints dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_full_disk_while_checkpointing_fails_clearly_and_keeps_the_previous_checkpoint() {
    let (_a, full) = uninterrupted();
    let (_b, run, exit) = interrupted("-INT");
    assert!(exit.success(), "{exit:?}");
    let before = checkpoint_entries(&run);
    assert!(!before.is_empty());
    // A 3 MiB file-size limit: the adapter files (~1.9 MB) fit, the optimizer state (~5.8 MB)
    // does not, so the next checkpoint fails part-way (EFBIG, with SIGXFSZ ignored).
    let out = Command::new("bash")
        .args([
            "-c",
            "trap '' XFSZ; ulimit -f 3072; exec \"$0\" resume \"$1\"",
            env!("CARGO_BIN_EXE_graft-train"),
            run.to_str().expect("utf-8 path"),
        ])
        .output()
        .expect("spawn graft-train under a file-size limit");
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "the checkpoint write should fail: {err}"
    );
    assert!(
        err.contains("writing checkpoint") && err.contains("step-") && err.contains("too large"),
        "the error names the checkpoint and the cause: {err}"
    );
    assert_eq!(
        checkpoint_entries(&run),
        before,
        "no partial checkpoint, the earlier ones untouched"
    );
    for c in graft_train::run::checkpoints(&run).expect("listed") {
        graft_train::run::load_checkpoint(&c).expect("every checkpoint still loads");
    }
    // With room again, the run resumes and ends as an uninterrupted one.
    let out = graft_train(&["resume", run.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let d = max_abs_diff(&full.join("adapter"), &run.join("adapter"));
    assert!(d <= 1e-6, "resumed adapter differs by {d}");
}

#[test]
fn a_run_killed_before_its_first_checkpoint_starts_over_and_a_torn_log_line_is_dropped() {
    let (_a, full) = uninterrupted();
    let (_b, run, _) = interrupted("-KILL");
    // As if the kill came before the first checkpoint, mid-way through a metrics line.
    std::fs::remove_dir_all(run.join("checkpoints")).expect("remove checkpoints");
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(run.join("metrics.jsonl"))
        .expect("metrics");
    std::io::Write::write_all(&mut metrics, b"{\"step\": 3, \"lo").expect("torn line");
    drop(metrics);
    let out = graft_train(&["resume", run.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("starting over"), "{}", stderr(&out));
    let d = max_abs_diff(&full.join("adapter"), &run.join("adapter"));
    assert!(d <= 1e-6, "restarted adapter differs by {d}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("every line parses"))
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
    // A run that has ended is not started over, even without checkpoints.
    std::fs::remove_dir_all(full.join("checkpoints")).expect("remove checkpoints");
    let out = graft_train(&["resume", full.to_str().expect("utf-8 path")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("has ended"), "{}", stderr(&out));
}

/// With layer recomputation and LoRA dropout, a run killed between checkpoints and resumed
/// ends with the uninterrupted run's adapter: the masks come from the seed, the step and the
/// micro-batch, not from how many micro-batches this process has run.
#[test]
fn recomputed_dropout_resumes_with_the_same_masks() {
    let config = |dir: &std::path::Path| {
        let path = write_config(dir, &format!("{STEPS}gradient_checkpointing = true\n"));
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(
            &path,
            text.replacen("alpha = 8\n", "alpha = 8\ndropout = 0.2\n", 1),
        )
        .expect("config");
        path
    };
    let full_dir = tempfile::tempdir().expect("temp dir");
    let out = graft_train(&[config(full_dir.path()).to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let full = single_run(full_dir.path());
    let dir = tempfile::tempdir().expect("temp dir");
    let path = config(dir.path());
    let (run, exit) = interrupt_after_step_2(dir.path(), &path, "-KILL", |_| true);
    assert!(!exit.success());
    let out = graft_train(&["resume", run.to_str().expect("utf-8 path")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let d = max_abs_diff(&full.join("adapter"), &run.join("adapter"));
    assert!(d <= 1e-6, "resumed adapter differs by {d}");
}
