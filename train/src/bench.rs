//! `graft-train bench`: a short training run that measures itself. It runs the real trainer
//! (same code path as `graft-train <config>`) for a few steps and prints tokens/s, seconds per
//! step split into forward, backward and optimizer, and peak resident memory, with the settings
//! used. It measures; it never asserts.
//!
//! So that another trainer can run the identical workload (`scripts/bench/compare.py` runs PEFT
//! on it), the run directory also gets `bench-inputs.json` (every step's micro-batches as token
//! ids and loss masks) and `init-adapter/` (the initial adapter as a PEFT directory).

use std::path::Path;

use anyhow::{Context, Result};
use graft_core::backend::GraftBackend;
use graft_core::burn::tensor::backend::AutodiffBackend;
use graft_datasets::prepare::Sample;
use serde_json::{json, Value};

use crate::config::TrainConfig;
use crate::run::TrainerState;
use crate::trainer::{Schedule, Trainer};

/// Writes the workload of the run's `steps` steps and its initial adapter into the run.
pub fn write_inputs<B: AutodiffBackend + GraftBackend, T: Sample>(
    trainer: &Trainer<'_, B, T>,
    run_dir: &Path,
    steps: usize,
) -> Result<()> {
    let mut state = TrainerState::default();
    let mut schedule = Schedule::new(trainer, &state);
    let steps: Vec<Value> = (0..steps)
        .map(|_| {
            let micro_batches: Vec<Value> = schedule
                .next_step(&mut state)
                .iter()
                .map(|mb| {
                    let examples: Vec<Value> = mb
                        .iter()
                        .flat_map(|&i| trainer.data.train[i].sequences())
                        .map(|e| json!({"ids": e.ids, "trained": e.trained}))
                        .collect();
                    Value::Array(examples)
                })
                .collect();
            Value::Array(micro_batches)
        })
        .collect();
    let cfg = trainer.cfg;
    let inputs = json!({
        "settings": settings(cfg),
        "steps": steps,
    });
    let path = run_dir.join("bench-inputs.json");
    graft_core::atomic::write_atomic(&path, inputs.to_string().as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    let init = run_dir.join("init-adapter");
    trainer
        .save_adapter(&init, &trainer.initial_params())
        .with_context(|| format!("writing {}", init.display()))?;
    Ok(())
}

/// The settings a comparison must reproduce.
fn settings(cfg: &TrainConfig) -> Value {
    json!({
        "base": cfg.model.base,
        "quantization": cfg.model.quantization,
        "r": cfg.lora.r,
        "lora_alpha": cfg.lora.lora_alpha,
        "lora_dropout": cfg.lora.lora_dropout,
        "target_modules": cfg.lora.target_modules.iter().map(|t| t.name()).collect::<Vec<_>>(),
        "micro_batch_size": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "max_seq_len": cfg.data.max_seq_len,
        "learning_rate": cfg.train.learning_rate,
        "betas": [cfg.train.betas.0, cfg.train.betas.1],
        "epsilon": cfg.train.epsilon,
        "weight_decay": cfg.train.weight_decay,
        "max_grad_norm": cfg.train.max_grad_norm,
        "lr_scheduler": cfg.train.scheduler,
        "warmup_steps": cfg.train.warmup_steps,
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "cpu_threads": cpu_threads(),
    })
}

fn cpu_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prints the figures of a finished bench run from its `metrics.jsonl` (the first step is
/// warm-up and left out of the medians when there are more) and its `summary`.
pub fn report(cfg: &TrainConfig, run_dir: &Path, summary: &Value) -> Result<()> {
    let path = run_dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let steps: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("forward_secs").is_some())
        .collect();
    let timed: Vec<&Value> = steps.iter().skip(usize::from(steps.len() > 1)).collect();
    let col = |k: &str| -> Vec<f64> { timed.iter().filter_map(|v| v[k].as_f64()).collect() };
    let tps = col("tokens_per_sec");
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.0}–{hi:.0}")
    };
    println!("settings: {}", settings(cfg));
    println!(
        "steps: {} ({} timed after warm-up), {} tokens/step",
        steps.len(),
        timed.len(),
        timed
            .first()
            .and_then(|v| v["tokens"].as_u64())
            .unwrap_or(0)
    );
    println!(
        "throughput: {:.0} tokens/s median (range {})",
        median(tps.clone()),
        spread(&tps)
    );
    println!(
        "seconds/step (median): {:.3} total = forward {:.3} + backward {:.3} + optimizer {:.3}",
        median(col("step_secs")),
        median(col("forward_secs")),
        median(col("backward_secs")),
        median(col("optimizer_secs"))
    );
    println!(
        "peak RSS: {:.1} MiB",
        graft_core::process::peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / 1048576.0)
    );
    let losses: Vec<String> = steps
        .iter()
        .filter_map(|v| v["loss"].as_f64())
        .map(|l| format!("{l:.5}"))
        .collect();
    println!("loss by step: {}", losses.join(" "));
    let crossings = &summary["adapter_state_transfers"];
    println!(
        "adapter state host<->device: {} tensors uploaded, {} read back, over {} micro-batches \
         ({} tensors in the adapter)",
        crossings["to_device"],
        crossings["to_host"],
        summary["steps"].as_u64().unwrap_or(0) as usize
            * cfg.train.grad_accum
            * summary["ranks"].as_u64().unwrap_or(1) as usize,
        summary["adapter_tensors"]
    );
    println!("run: {}", run_dir.display());
    Ok(())
}
