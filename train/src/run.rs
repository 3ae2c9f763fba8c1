//! A run directory and everything written into it:
//!
//! ```text
//! runs/<name>/config.toml          the resolved config (absolute paths, every default)
//!            metrics.jsonl         one JSON object per logged step and per evaluation
//!            samples.jsonl         greedy answers to eval prompts at each evaluation
//!            task_eval.jsonl       [eval] task metrics: every scored answer at each evaluation
//!            checkpoints/step-N/   adapter (PEFT files) + trainer_state.json + optimizer.safetensors
//!            adapter/              the final adapter in PEFT format
//!            summary.json          final/best eval loss, tokens, wall time, peak memory
//! ```
//!
//! Every file that matters is written to a temporary name and renamed into place, and a
//! checkpoint directory appears only when complete, so a crash never leaves a half-written one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::optim::AdamW;

pub const CONFIG_FILE: &str = "config.toml";
pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

pub use graft_core::atomic::write_atomic;

/// Appends one JSON line to `path`.
///
/// # Errors
/// Any I/O failure.
pub fn append_jsonl(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    // One write per line: a process killed mid-line leaves at most one torn last line, which
    // [`truncate_after_step`] drops on resume.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{value}\n").as_bytes()))
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Drops the JSON lines of `path` whose `step` is after `step`, and any torn line a crash left
/// (a missing file is fine).
///
/// # Errors
/// Any I/O failure.
pub fn truncate_after_step(path: &Path, step: usize) -> std::io::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            // A line that does not parse was torn by a crash while it was written.
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v.get("step")
                    .and_then(serde_json::Value::as_u64)
                    .is_none_or(|s| s as usize <= step)
            })
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

/// Where training stands: enough to continue exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Total optimizer steps of the run.
    pub total_steps: usize,
    /// Epoch of the next micro-batch (0-based).
    pub epoch: usize,
    /// Index of the next micro-batch within that epoch.
    pub batch_in_epoch: usize,
    /// Trained (loss-carrying) tokens seen so far.
    pub tokens_trained: u64,
    /// Best eval loss so far.
    pub best_eval_loss: Option<f64>,
    /// Seconds of training before this checkpoint (across resumes).
    pub elapsed_secs: f64,
    /// Parameter names, in the order of the optimizer's tensors.
    pub param_names: Vec<String>,
}

/// A saved checkpoint's parts.
pub struct Checkpoint {
    pub state: TrainerState,
    pub optimizer: AdamW,
    /// Flat parameter values, in `state.param_names` order.
    pub params: Vec<Vec<f32>>,
}

/// `checkpoints/step-000123`.
pub fn checkpoint_dir(run: &Path, step: usize) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:06}"))
}

/// Saves optimizer and trainer state into `dir` (which already holds the adapter files
/// written by the caller into the same temporary directory).
///
/// # Errors
/// Any I/O failure.
pub fn save_state(
    dir: &Path,
    state: &TrainerState,
    opt: &AdamW,
    params: &[Vec<f32>],
) -> std::io::Result<()> {
    let mut tensors: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for (i, name) in state.param_names.iter().enumerate() {
        for (kind, values) in [
            ("param", &params[i]),
            ("exp_avg", &opt.m[i]),
            ("exp_avg_sq", &opt.v[i]),
        ] {
            tensors.push((
                format!("{name}.{kind}"),
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                values.len(),
            ));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, b, len)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], b)
                .expect("byte count matches the length by construction");
            (n.clone(), v)
        })
        .collect();
    let meta = serde_json::json!({"step": opt.step, "beta1": opt.beta1, "beta2": opt.beta2, "eps": opt.eps, "weight_decay": opt.weight_decay});
    let bytes = safetensors::serialize(
        views,
        Some([("adamw".to_string(), meta.to_string())].into()),
    )
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    write_atomic(&dir.join(OPTIMIZER_FILE), &bytes)?;
    let json = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    write_atomic(&dir.join(STATE_FILE), &json)
}

/// A checkpoint that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CheckpointError {
    pub path: std::path::PathBuf,
    pub message: String,
}

/// Reads a checkpoint written by [`save_state`].
///
/// # Errors
/// [`CheckpointError`] naming the file and what is wrong.
pub fn load_checkpoint(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    let bad = |path: &Path, message: String| CheckpointError {
        path: path.to_path_buf(),
        message,
    };
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| bad(&state_path, e.to_string()))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| bad(&state_path, e.to_string()))?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&opt_path).map_err(|e| bad(&opt_path, e.to_string()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(&opt_path, e.to_string()))?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(&opt_path, e.to_string()))?;
    let adamw: serde_json::Value = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("adamw"))
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad(&opt_path, "no AdamW metadata".into()))?;
    let num = |k: &str| {
        adamw
            .get(k)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| bad(&opt_path, format!("AdamW metadata lacks {k}")))
    };
    let read = |name: &str| -> Result<Vec<f32>, CheckpointError> {
        let t = st
            .tensor(name)
            .map_err(|e| bad(&opt_path, format!("tensor '{name}': {e}")))?;
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(bad(
                &opt_path,
                format!("tensor '{name}' is {:?}, expected F32", t.dtype()),
            ));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let mut params = Vec::new();
    let mut m = Vec::new();
    let mut v = Vec::new();
    for name in &state.param_names {
        params.push(read(&format!("{name}.param"))?);
        m.push(read(&format!("{name}.exp_avg"))?);
        v.push(read(&format!("{name}.exp_avg_sq"))?);
    }
    let optimizer = AdamW {
        beta1: num("beta1")?,
        beta2: num("beta2")?,
        eps: num("eps")?,
        weight_decay: num("weight_decay")?,
        step: num("step")? as u64,
        m,
        v,
    };
    Ok(Checkpoint {
        state,
        optimizer,
        params,
    })
}

/// The checkpoints of a run, oldest first (none before the first is written).
///
/// # Errors
/// `checkpoints/` exists but cannot be listed (a resume must not mistake that for "no
/// checkpoint yet" and start over).
pub fn checkpoints(run: &Path) -> std::io::Result<Vec<PathBuf>> {
    let dir = run.join("checkpoints");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("listing {}: {e}", dir.display()),
            ))
        }
    };
    let mut out: Vec<PathBuf> = entries
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
                && p.join(STATE_FILE).is_file()
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Removes all but the newest `keep` checkpoints.
///
/// # Errors
/// Any I/O failure.
pub fn prune_checkpoints(run: &Path, keep: usize) -> std::io::Result<()> {
    let all = checkpoints(run)?;
    for old in &all[..all.len().saturating_sub(keep)] {
        std::fs::remove_dir_all(old)?;
    }
    Ok(())
}
