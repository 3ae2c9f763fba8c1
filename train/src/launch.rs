//! Starting training: fresh runs (one per sweep combination), `resume` from a run's newest
//! checkpoint and `bench`; each picks the backend for the config's device, creates or reopens
//! the run directory, trains, and writes the summary and report.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use graft_core::backend::GraftBackend;
use graft_core::burn::backend::Autodiff;
use graft_core::burn::tensor::backend::AutodiffBackend;
use graft_core::device::{run_on, OnDevice};
use serde_json::json;

use graft_datasets::preference::Pair;
use graft_datasets::prepare::Sample;
use graft_datasets::tokenize::Tokenized;

use crate::config::raw::Paths;
use crate::config::{Method, TrainConfig};
use crate::dist::{self, Group};
use crate::setup::{configs, load_model, prepare_data};
use crate::tracking::{self, Status, Tracker};
use crate::{bench, report, run, trainer};

/// `graft-train <config>`: one run per sweep combination, each checked before any starts.
///
/// # Errors
/// An invalid config, a model or data that does not load, a run directory that cannot be
/// written.
pub fn train_cmd(path: &Path, set: &[String]) -> Result<()> {
    let cfgs = configs(path, set)?;
    let group = dist::from_env()?;
    let sweep = cfgs.len() > 1;
    let tracker = tracker(&cfgs[0], None, group.as_ref());
    // A sweep is one parent run on the tracker, with a child per combination.
    let parent = tracker.as_ref().filter(|_| sweep).map(|t| {
        let stem = path
            .file_stem()
            .map_or("sweep".into(), |s| s.to_string_lossy().into_owned());
        let mut tags = tracking::source_tags(path);
        tags.push(("graft.sweep_runs".into(), cfgs.len().to_string()));
        t.start(tracking::RunSpec {
            name: format!("{stem}-sweep-{}", timestamp()),
            parent: None,
            tags,
            params: Vec::new(),
            run_dir: None,
            continue_run: None,
        })
    });
    let mut result = Ok(());
    for (i, cfg) in cfgs.iter().enumerate() {
        if sweep {
            tracing::info!("sweep run {}/{}", i + 1, cfgs.len());
        }
        let ctx = Ctx {
            group: group.as_ref(),
            track: tracker.as_ref().map(|t| (t, parent.clone())),
        };
        result = train_on_device(cfg, Target::New(sweep.then_some(i)), ctx);
        if result.is_err() {
            break;
        }
    }
    if let Some(p) = parent {
        p.end(if result.is_ok() {
            Status::Finished
        } else {
            Status::Failed
        });
    }
    if let Some(t) = tracker {
        t.close();
    }
    result
}

/// The tracker `cfg` reports to (`[tracking]`, or the server a resumed run reported to).
fn tracker(cfg: &TrainConfig, recorded: Option<&str>, group: &dyn Group) -> Option<Tracker> {
    if !group.leads() {
        return None;
    }
    let uri = cfg.tracking.mlflow.as_deref().or(recorded)?;
    tracing::info!(
        "reporting to MLflow at {uri}, experiment {}",
        cfg.tracking.experiment
    );
    Some(Tracker::mlflow(
        uri,
        &cfg.tracking.experiment,
        cfg.tracking.wait,
    ))
}

/// `graft-train bench`: `steps` optimizer steps of one configuration, then the figures.
///
/// # Errors
/// As [`train_cmd`]; also a config that sweeps, or zero steps.
pub fn bench_cmd(path: &Path, set: &[String], steps: usize) -> Result<()> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let mut set = set.to_vec();
    set.push(format!("train.max_steps={steps}"));
    let cfgs = configs(path, &set)?;
    if cfgs.len() != 1 {
        bail!(
            "{}: bench runs one configuration (peak memory is per process); this config sweeps {} — pick one with --set",
            path.display(),
            cfgs.len()
        );
    }
    let group = dist::from_env()?;
    let ctx = Ctx {
        group: group.as_ref(),
        track: None,
    };
    train_on_device(&cfgs[0], Target::Bench, ctx)
}

/// `graft-train resume`: continues a run from its newest checkpoint.
///
/// # Errors
/// No checkpoint, or one that cannot be read; then as [`train_cmd`].
pub fn resume_cmd(run_dir: &Path) -> Result<()> {
    let cfg_path = run_dir.join(run::CONFIG_FILE);
    let cfg = configs(&cfg_path, &[])?
        .into_iter()
        .next()
        .expect("at least one run");
    // A run stopped before its first checkpoint starts over in the same directory.
    let ckpt = match run::checkpoints(run_dir)?.pop() {
        Some(last) => {
            tracing::info!("resuming {} from {}", run_dir.display(), last.display());
            Some(run::load_checkpoint(&last)?)
        }
        None if run_dir.join("summary.json").exists() => bail!(
            "{}: the run has ended (summary.json) and has no checkpoint to resume from",
            run_dir.display()
        ),
        None => {
            tracing::info!("{}: no checkpoint yet; starting over", run_dir.display());
            None
        }
    };
    let group = dist::from_env()?;
    // Steps after the checkpoint will run again: drop what they logged the first time.
    let step = ckpt.as_ref().map_or(0, |c| c.state.step);
    // (Only rank 0 writes the run directory.)
    let logs = if group.leads() {
        &["metrics.jsonl", "samples.jsonl", "task_eval.jsonl"][..]
    } else {
        &[]
    };
    for log in logs {
        run::truncate_after_step(&run_dir.join(log), step)
            .with_context(|| format!("rewriting {}", run_dir.join(log).display()))?;
    }
    // Continue the tracker's run where the first part of this one reported.
    let recorded = tracking::recorded(run_dir).map(|(uri, _)| uri);
    let tracker = tracker(&cfg, recorded.as_deref(), group.as_ref());
    let ctx = Ctx {
        group: group.as_ref(),
        track: tracker.as_ref().map(|t| (t, None)),
    };
    let result = train_on_device(&cfg, Target::Resume(run_dir, ckpt), ctx);
    if let Some(t) = tracker {
        t.close();
    }
    result
}

/// Where a training run goes.
enum Target<'a> {
    /// A fresh run directory (created once model and data are ready), with its sweep index.
    New(Option<usize>),
    /// An existing run continued from its last checkpoint, or from the start when it has none.
    Resume(&'a Path, Option<run::Checkpoint>),
    /// A fresh run that also records its workload and prints bench figures.
    Bench,
}

/// What a run trains with besides its config: the processes training together, and the
/// tracker it reports to with its parent run (a sweep's).
struct Ctx<'a> {
    group: &'a dyn Group,
    track: Option<(&'a Tracker, Option<tracking::Run>)>,
}

fn train_on_device(cfg: &TrainConfig, target: Target<'_>, ctx: Ctx<'_>) -> Result<()> {
    struct Train<'a>(&'a TrainConfig, Target<'a>, Ctx<'a>);
    impl OnDevice for Train<'_> {
        type Output = Result<()>;
        fn run<B: GraftBackend>(self, device: B::Device) -> Result<()> {
            train::<Autodiff<B>>(self.0, self.1, self.2, &device)
        }
    }
    run_on(cfg.model.device, Train(cfg, target, ctx))?
}

fn train<B: AutodiffBackend + GraftBackend>(
    cfg: &TrainConfig,
    target: Target<'_>,
    ctx: Ctx<'_>,
    device: &B::Device,
) -> Result<()> {
    if cfg.train.method == Method::Sft {
        train_on::<B, Tokenized>(cfg, target, ctx, device)
    } else {
        if matches!(target, Target::Bench) {
            bail!(
                "{}: bench measures SFT against PEFT; this config has train.method = \"{}\"",
                cfg.path.display(),
                cfg.train.method.name()
            );
        }
        train_on::<B, Pair>(cfg, target, ctx, device)
    }
}

fn train_on<B: AutodiffBackend + GraftBackend, T: Sample>(
    cfg: &TrainConfig,
    target: Target<'_>,
    ctx: Ctx<'_>,
    device: &B::Device,
) -> Result<()> {
    let loaded = load_model::<B>(cfg, device)?;
    let data = prepare_data::<B, T>(cfg, &loaded)?;
    let bench = matches!(target, Target::Bench);
    let layout = loaded.model.model.config.adapter_targets();
    if !cfg.lora.target_modules.iter().any(|t| layout.contains(t)) {
        let names = |ts: &[graft_core::adapters::lora::TargetModule]| {
            ts.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
        };
        anyhow::bail!(
            "lora.target_modules [{}]: none is a projection of this {} model (its layers have {})",
            names(&cfg.lora.target_modules),
            loaded.model.model.config.family,
            names(&layout)
        );
    }
    let lead = ctx.group.leads();
    let fresh = |sweep_index| -> Result<PathBuf> {
        if !lead {
            // Only rank 0 writes the run directory; the others name none.
            return Ok(cfg
                .output
                .runs_dir
                .join(format!(".rank-{}", ctx.group.rank())));
        }
        let dir = new_run_dir(cfg, sweep_index)?;
        run::write_atomic(&dir.join(run::CONFIG_FILE), resolved(cfg, &dir).as_bytes())
            .with_context(|| format!("writing {}", dir.display()))?;
        Ok(dir)
    };
    let (run_dir, resume) = match target {
        Target::Resume(dir, ckpt) => (dir.to_path_buf(), ckpt),
        Target::New(sweep_index) => (fresh(sweep_index)?, None),
        Target::Bench => (fresh(None)?, None),
    };
    let run_dir = run_dir.as_path();
    let tok = loaded
        .model
        .tokenizer
        .as_ref()
        .expect("checked by load_model");
    let stop = Arc::new(AtomicBool::new(false));
    install_sigint(stop.clone());
    let tracked = ctx
        .track
        .map(|(t, parent)| t.start(run_spec(cfg, run_dir, t.uri(), parent)));
    let mut trainer = trainer::Trainer::new(
        cfg,
        &loaded.model.model,
        tok,
        &data,
        run_dir.to_path_buf(),
        cfg.model.base.clone(),
        &stop,
    );
    // One line per job, not per rank: the others' placeholder directory is never written.
    if lead {
        tracing::info!(
            "run {}: {} {} train / {} eval {}, {} trained tokens, adapter r={} on {} modules ({} parameters), base {} ({:.1} MiB)",
            run_dir.display(),
            cfg.train.method.name(),
            data.train.len(),
            data.eval.len(),
            if T::PAIRED { "pairs" } else { "examples" },
            data.stats.trained_tokens,
            cfg.lora.r,
            trainer.param_names().len() / 2,
            trainer.n_params(),
            loaded.model.name,
            loaded.model.model.base_bytes() as f64 / 1048576.0,
        );
    }
    if bench && lead {
        bench::write_inputs(&trainer, run_dir, cfg.train.max_steps.unwrap_or(0))?;
    }
    trainer.tracking = tracked.clone();
    trainer.group = ctx.group;
    if ctx.group.size() > 1 && lead {
        tracing::info!(
            "data parallel: {} ranks, {} micro-batches of {} per step",
            ctx.group.size(),
            ctx.group.size() * cfg.train.grad_accum,
            cfg.train.micro_batch_size
        );
    }
    let outcome = match trainer.run(resume) {
        Ok(o) => o,
        Err(e) => {
            if let Some(t) = &tracked {
                t.end(Status::Failed);
            }
            return Err(e).with_context(|| format!("writing run {}", run_dir.display()));
        }
    };
    let summary = json!({
        "run": run_dir.file_name().map(|n| n.to_string_lossy().into_owned()),
        "steps": outcome.state.step,
        "total_steps": outcome.state.total_steps,
        "final_loss": outcome.final_loss,
        "final_eval_loss": outcome.final_eval_loss,
        "best_eval_loss": outcome.state.best_eval_loss,
        "tokens_trained": outcome.state.tokens_trained,
        "wall_secs": outcome.state.elapsed_secs,
        "peak_rss_mib": graft_core::process::peak_rss_bytes().map(|b| b as f64 / 1048576.0),
        "base_weights_mib": loaded.model.model.base_bytes() as f64 / 1048576.0,
        "interrupted": outcome.interrupted,
        "adapter": (!outcome.interrupted).then(|| run_dir.join("adapter")),
        "ranks": outcome.ranks,
        "ranks_identical": outcome.ranks_identical,
        "adapter_tensors": trainer.param_names().len(),
        "adapter_state_transfers": outcome.transfers,
    });
    if !outcome.ranks_identical {
        tracing::error!("the {} ranks ended with different adapters", outcome.ranks);
    }
    if !lead {
        return Ok(());
    }
    run::write_atomic(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    report::write_metrics_parquet(run_dir)
        .with_context(|| format!("writing {}/metrics.parquet", run_dir.display()))?;
    report::write_html(run_dir, &summary)
        .with_context(|| format!("writing {}/report.html", run_dir.display()))?;
    if let Some(t) = &tracked {
        let mut last = json!({"step": outcome.state.step});
        for k in ["peak_rss_mib", "wall_secs", "tokens_trained"] {
            last[k] = summary[k].clone();
        }
        t.metrics(&last);
        t.artifacts(tracking::run_artifacts(run_dir));
        t.end(if outcome.interrupted {
            Status::Killed
        } else {
            Status::Finished
        });
    }
    if bench {
        return bench::report(cfg, run_dir, &summary);
    }
    eprintln!("{}", serde_json::to_string_pretty(&summary)?);
    if outcome.interrupted {
        tracing::info!("resume with: graft-train resume {}", run_dir.display());
    }
    if !outcome.ranks_identical {
        bail!(
            "{}: the {} data-parallel ranks ended with different adapters (summary.json has rank 0's)",
            run_dir.display(),
            outcome.ranks
        );
    }
    Ok(())
}

/// What the tracker's run for `run_dir` is made of: its name, params (the resolved config as
/// written in the run directory), tags, and the tracker run to continue after a resume.
fn run_spec(
    cfg: &TrainConfig,
    run_dir: &Path,
    uri: &str,
    parent: Option<tracking::Run>,
) -> tracking::RunSpec {
    let config = std::fs::read_to_string(run_dir.join(run::CONFIG_FILE)).unwrap_or_default();
    let mut tags = tracking::source_tags(&cfg.path);
    tags.push((
        "graft.run_dir".into(),
        std::path::absolute(run_dir)
            .unwrap_or_else(|_| run_dir.to_path_buf())
            .display()
            .to_string(),
    ));
    let continue_run = tracking::recorded(run_dir)
        .filter(|(recorded, _)| recorded == uri)
        .map(|(_, run_id)| run_id);
    tracking::RunSpec {
        name: run_dir
            .file_name()
            .map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned()),
        parent,
        tags,
        params: tracking::params_of(&config),
        run_dir: Some(run_dir.to_path_buf()),
        continue_run,
    }
}

/// Sets `stop` on the first SIGINT; a second SIGINT ends the process as usual.
fn install_sigint(stop: Arc<AtomicBool>) {
    let _ = ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        tracing::warn!(
            "SIGINT: finishing this step and saving a checkpoint (press again to abort)"
        );
    });
}

/// A fresh directory under `runs_dir` named after the config (or `output.name`) and the time.
fn new_run_dir(cfg: &TrainConfig, sweep_index: Option<usize>) -> Result<PathBuf> {
    let stem = cfg
        .path
        .file_stem()
        .map_or("run".into(), |s| s.to_string_lossy().into_owned());
    let mut name = cfg
        .output
        .name
        .clone()
        .unwrap_or_else(|| format!("{stem}-{}", timestamp()));
    if let Some(i) = sweep_index {
        name.push_str(&format!("-sweep{i}"));
    }
    std::fs::create_dir_all(&cfg.output.runs_dir)
        .with_context(|| format!("creating {}", cfg.output.runs_dir.display()))?;
    for n in 0.. {
        let candidate = if n == 0 {
            cfg.output.runs_dir.join(&name)
        } else {
            cfg.output.runs_dir.join(format!("{name}-{n}"))
        };
        match std::fs::create_dir(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => bail!("creating {}: {e}", candidate.display()),
        }
    }
    unreachable!("the loop returns or fails")
}

/// The resolved config with absolute data paths, so `resume` works from the run directory.
fn resolved(cfg: &TrainConfig, run_dir: &Path) -> String {
    let mut c = cfg.clone();
    let abs = |p: &PathBuf| {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.clone())
            .display()
            .to_string()
    };
    c.raw.data.train = Paths::Many(cfg.data.train_files.iter().map(abs).collect());
    c.raw.data.eval = (!cfg.data.eval_files.is_empty())
        .then(|| Paths::Many(cfg.data.eval_files.iter().map(abs).collect()));
    let runs = run_dir.parent().map(Path::to_path_buf).unwrap_or_default();
    c.raw.output.runs_dir = abs(&runs);
    c.raw.output.name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    if let Some((path, _)) = &cfg.eval.json_schema {
        c.raw.eval.json_schema = Some(abs(path));
    }
    if Path::new(&cfg.model.base).exists() {
        c.raw.model.base = std::path::absolute(&cfg.model.base)
            .map_or(cfg.model.base.clone(), |p| p.display().to_string());
    }
    format!(
        "# resolved by graft-train {}\n{}",
        env!("CARGO_PKG_VERSION"),
        c.resolved_toml()
    )
}

/// UTC `YYYYMMDD-HHMMSS`.
fn timestamp() -> String {
    let (y, m, d, h, mi, s) = graft_core::clock::utc_now();
    format!("{y:04}{m:02}{d:02}-{h:02}{mi:02}{s:02}")
}
