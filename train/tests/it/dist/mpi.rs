//! Data-parallel training over MPI (feature `mpi`; OpenMPI from Debian, installed by
//! scripts/prepare-test-models.sh): two ranks on loopback against one process accumulating
//! twice as many micro-batches, and a rank killed in the middle of a run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{adapter_values, graft_train, stderr, write_config};

/// `mpirun -np 2` on loopback, as root, one thread per rank (2 cores).
fn mpirun(args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "-np",
        "2",
        "--oversubscribe",
        "--mca",
        "btl",
        "self,tcp",
        "--mca",
        "btl_tcp_if_include",
        "lo",
    ])
    .args(["-x", "RAYON_NUM_THREADS=1"])
    .arg(env!("CARGO_BIN_EXE_graft-train"))
    .args(args)
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    c
}

fn run_mpi(args: &[&str]) -> Output {
    mpirun(args)
        .output()
        .expect("spawn mpirun (scripts/prepare-test-models.sh installs OpenMPI)")
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).expect("summary"))
        .expect("json")
}

#[test]
fn two_ranks_equal_one_process_with_twice_the_accumulation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(
        dir.path(),
        "max_steps = 4\nlogging_every = 1\neval_samples = 0\nsave_every = 2\nlearning_rate = 3e-3",
    );
    let p = path.to_str().expect("utf-8");
    let out = run_mpi(&[p, "--set", "output.name=\"ranks2\""]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out1 = graft_train(&[
        p,
        "--set",
        "output.name=\"single\"",
        "--set",
        "train.gradient_accumulation_steps=2",
    ]);
    assert!(out1.status.success(), "{}", stderr(&out1));

    // Only rank 0 wrote: one run directory, no stray ones.
    let runs = dir.path().join("runs");
    let mut names: Vec<String> = std::fs::read_dir(&runs)
        .expect("runs")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["ranks2", "single"]);
    let (dp, one) = (runs.join("ranks2"), runs.join("single"));
    // Both ranks ended with the same adapter, bit for bit (checked in the run, by hash).
    let s = summary(&dp);
    assert_eq!(s["ranks"], 2);
    assert_eq!(s["ranks_identical"], true);
    assert_eq!(summary(&one)["ranks"], 1);
    assert_eq!(
        s["tokens_trained"],
        summary(&one)["tokens_trained"],
        "the same examples"
    );
    let (a, b) = (
        adapter_values(&dp.join("adapter")),
        adapter_values(&one.join("adapter")),
    );
    assert_eq!(a.len(), b.len());
    let mut max = 0f32;
    for (k, va) in &a {
        for (x, y) in va.iter().zip(&b[k]) {
            max = max.max((x - y).abs());
        }
    }
    assert!(max <= 1e-5, "2 ranks vs 1 process: max |Δ| {max}");
    assert!(a.values().flatten().any(|v| *v != 0.0), "trained");
    eprintln!("2 ranks vs one process with twice the accumulation: max |Δ| {max}");
}

/// The pid of rank `rank` of a job running `config` (OpenMPI sets OMPI_COMM_WORLD_RANK).
fn rank_pid(config: &Path, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd);
            if !cmd.starts_with(env!("CARGO_BIN_EXE_graft-train"))
                || !cmd.contains(config.to_str()?)
            {
                return None;
            }
            let env = std::fs::read(e.path().join("environ")).ok()?;
            env.split(|b| *b == 0)
                .any(|v| v == want.as_bytes())
                .then_some(pid)
        })
}

fn checkpoints(run: &Path) -> Vec<PathBuf> {
    graft_train::run::checkpoints(run).expect("checkpoints")
}

#[test]
fn a_rank_killed_mid_run_ends_the_job_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(
        dir.path(),
        "max_steps = 40\neval_samples = 0\nsave_every = 2\nkeep_last_checkpoints = 2",
    );
    let p = path.to_str().expect("utf-8");
    let child = mpirun(&[p, "--set", "output.name=\"killed\""])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mpirun");
    let run = dir.path().join("runs/killed");
    let t0 = Instant::now();
    while checkpoints(&run).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = rank_pid(&path, 1).expect("rank 1 is running");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    let t_kill = Instant::now();
    let out = child.wait_with_output().expect("mpirun");
    let err = stderr(&out);
    assert!(!out.status.success(), "the job must fail: {err}");
    assert!(
        t_kill.elapsed() < Duration::from_secs(60),
        "the job ended {:?} after the kill",
        t_kill.elapsed()
    );
    assert!(
        err.contains("rank 1") && (err.contains("signal 9") || err.contains("Killed")),
        "a clear error: {err}"
    );
    assert!(!run.join("summary.json").exists());
    eprintln!(
        "mpirun after rank 1 was killed ({:.1?}):\n{err}",
        t_kill.elapsed()
    );
    // The newest checkpoint reads back whole, and the run resumes from it in one process.
    let last = checkpoints(&run).pop().expect("a checkpoint");
    let ckpt = graft_train::run::load_checkpoint(&last).expect("the last checkpoint is intact");
    assert!(
        ckpt.state.step >= 2 && ckpt.state.step % 2 == 0,
        "{}",
        ckpt.state.step
    );
    let text = std::fs::read_to_string(run.join("config.toml")).expect("resolved config");
    std::fs::write(
        run.join("config.toml"),
        text.replace(
            "max_steps = 40",
            &format!("max_steps = {}", ckpt.state.step + 2),
        ),
    )
    .expect("shorten");
    let out = graft_train(&["resume", run.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&run);
    assert_eq!(s["steps"].as_u64(), Some(ckpt.state.step as u64 + 2));
    assert_eq!(
        s["ranks"], 1,
        "resumed with a different number of processes"
    );
}

#[test]
fn a_build_with_mpi_run_without_a_launcher_is_one_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), "max_steps = 1\neval_samples = 0");
    let out = graft_train(&[path.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(summary(&crate::single_run(dir.path()))["ranks"], 1);
}
