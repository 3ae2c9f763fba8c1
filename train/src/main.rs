//! `graft-train`: QLoRA fine-tuning from a TOML config.
//!
//! ```text
//! graft-train <config.toml> [--set lora.r=32 ...]   train (one run per [sweep] combination)
//! graft-train data <config.toml> [--set ...]        what the data becomes: counts and examples
//! graft-train resume <run dir>                      continue a run from its last checkpoint
//! graft-train bench <config.toml> [--steps 10]      a short run that prints tokens/s, time split, memory
//! ```

mod bench;
mod config;
mod optim;
mod report;
mod run;
mod trainer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use graft_core::backend::GraftBackend;
use graft_core::burn::backend::{Autodiff, Flex};
use graft_core::burn::tensor::backend::AutodiffBackend;
use graft_core::device::DeviceSpec;
use graft_core::load::{load, LoadOptions, ModelSource};
use graft_core::text::chat::ChatTemplate;
use graft_datasets::prepare::{prepare, DataSpec, Prepared};
use graft_datasets::tokenize::Tokenizer;
use serde_json::json;

use config::TrainConfig;

#[derive(Parser)]
#[command(
    name = "graft-train",
    version,
    about = "QLoRA fine-tuning from a config file",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The training config (TOML).
    config: Option<PathBuf>,
    /// Override a config value: section.key=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Show what the data becomes: row and token counts, trained fraction, rendered examples.
    Data {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Examples to print.
        #[arg(long, default_value_t = 2)]
        examples: usize,
    },
    /// Continue a run from its newest checkpoint.
    Resume { run_dir: PathBuf },
    /// Run a few training steps of a config and print tokens/s, seconds per step (forward,
    /// backward, optimizer) and peak memory; the run also gets the workload and initial
    /// adapter so other trainers can run the same steps (scripts/bench/compare.py).
    Bench {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Optimizer steps to run (the first is warm-up).
        #[arg(long, default_value_t = 10)]
        steps: usize,
    },
    /// Convert a run's adapter (or a PEFT adapter directory) to llama.cpp's GGUF-LoRA format.
    Export {
        /// A run directory or a PEFT adapter directory.
        source: PathBuf,
        /// Output .gguf file.
        #[arg(long)]
        gguf: PathBuf,
        /// The base model (default: the run's model.base, or the adapter's
        /// base_model_name_or_path).
        #[arg(long)]
        model: Option<String>,
    },
}

/// A training step allocates and frees hundreds of MB of activations; glibc's malloc (and
/// mimalloc by default) hand large freed blocks back to the kernel, and every step then pays
/// page faults and zeroing for them again (≈ 30% of a CPU step). mimalloc with purging off
/// keeps them for reuse; the peak resident size is unchanged.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

extern "C" {
    /// mimalloc's `mi_option_set` (linked in by the `mimalloc` crate).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in `mi_option_t` (15 in both mimalloc v2 and the v3 that
/// libmimalloc-sys builds; its `extended.rs` numbers the neighbours 14 and 16).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

fn main() {
    // SAFETY: sets a plain integer option; -1 means "never purge" (mimalloc.h).
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Data {
            config,
            set,
            examples,
        }) => data_cmd(&config, &set, examples),
        Some(Command::Resume { run_dir }) => resume_cmd(&run_dir),
        Some(Command::Bench { config, set, steps }) => bench_cmd(&config, &set, steps),
        Some(Command::Export {
            source,
            gguf,
            model,
        }) => export_cmd(&source, &gguf, model),
        None => match cli.config {
            Some(config) => train_cmd(&config, &cli.set),
            None => Err(anyhow::anyhow!(
                "no config given: graft-train <config.toml> (see graft-train --help)"
            )),
        },
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Reads and checks every run of a config before any work starts.
fn configs(path: &Path, set: &[String]) -> Result<Vec<TrainConfig>> {
    let (text, raws) = config::read(path, set)?;
    raws.into_iter()
        .map(|raw| TrainConfig::from_raw(path, &text, raw).map_err(Into::into))
        .collect()
}

struct Loaded<B: GraftBackend> {
    model: graft_core::load::LoadedModel<B>,
    template: Option<ChatTemplate>,
}

fn load_model<B: GraftBackend>(cfg: &TrainConfig, device: &B::Device) -> Result<Loaded<B>> {
    let mut source =
        ModelSource::parse(&cfg.base).with_context(|| format!("model.base = {:?}", cfg.base))?;
    if let (ModelSource::Hub { revision, .. }, Some(r)) = (&mut source, &cfg.revision) {
        *revision = Some(r.clone());
    }
    let model = load::<B>(
        &source,
        LoadOptions {
            quantize: cfg.quantization,
        },
        device,
    )
    .with_context(|| format!("loading model.base = {:?}", cfg.base))?;
    let tok = model
        .tokenizer
        .as_ref()
        .with_context(|| format!("{}: the model has no tokenizer", cfg.base))?;
    let source = match cfg.chat_template.as_deref() {
        None | Some("tokenizer") => tok.chat_template.as_deref(),
        Some(name_or_inline) => {
            Some(graft_core::text::chat::named_template(name_or_inline).unwrap_or(name_or_inline))
        }
    };
    let template = match source {
        Some(s) => Some(
            ChatTemplate::new(s, tok.bos_token.as_deref(), tok.eos_token.as_deref())
                .with_context(|| format!("{}: data.chat_template", cfg.path.display()))?,
        ),
        None => None,
    };
    Ok(Loaded { model, template })
}

fn prepare_data<B: GraftBackend>(cfg: &TrainConfig, loaded: &Loaded<B>) -> Result<Prepared> {
    let tok = loaded
        .model
        .tokenizer
        .as_ref()
        .expect("checked by load_model");
    let tokenizer = Tokenizer {
        tokenizer: tok,
        template: loaded.template.as_ref(),
        train_on: cfg.train_on,
        max_seq_len: cfg.max_seq_len,
        truncation: cfg.truncation,
    };
    let spec = DataSpec {
        train_files: cfg.train_files.clone(),
        eval_files: cfg.eval_files.clone(),
        format: cfg.format.clone(),
        eval_fraction: cfg.eval_fraction,
        seed: cfg.data_seed,
        max_bad_rows: cfg.max_bad_rows,
    };
    let data =
        prepare(&spec, &tokenizer).with_context(|| format!("{}: [data]", cfg.path.display()))?;
    for bad in &data.stats.bad_rows {
        eprintln!("skipped bad row: {bad}");
    }
    Ok(data)
}

fn data_cmd(path: &Path, set: &[String], n_examples: usize) -> Result<()> {
    let cfg = configs(path, set)?
        .into_iter()
        .next()
        .expect("at least one run");
    let loaded = load_model::<Flex>(&cfg, &Default::default())?;
    let data = prepare_data(&cfg, &loaded)?;
    let s = &data.stats;
    println!("format: {}", data.format.name());
    println!(
        "rows: {} ({} bad, {} too long, {} truncated)",
        s.rows,
        s.bad_rows.len(),
        s.too_long,
        s.truncated
    );
    println!(
        "examples: {} train, {} eval",
        data.train.len(),
        data.eval.len()
    );
    println!(
        "tokens: {} ({} trained, {:.1}%)",
        s.tokens,
        s.trained_tokens,
        100.0 * s.trained_tokens as f64 / s.tokens.max(1) as f64
    );
    let tok = loaded
        .model
        .tokenizer
        .as_ref()
        .expect("checked by load_model");
    for (ex, row) in data.train.iter().zip(&data.train_rows).take(n_examples) {
        println!(
            "\n--- {} ({} tokens, {} trained; trained text in [[ ]])",
            row.location(),
            ex.ids.len(),
            ex.n_trained()
        );
        println!("{}", marked(tok, ex));
    }
    Ok(())
}

/// The example's text with trained runs wrapped in `[[ ]]`.
fn marked(
    tok: &graft_core::text::tokenizer::TokenizerBundle,
    ex: &graft_datasets::tokenize::Tokenized,
) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ex.ids.len() {
        let t = ex.trained[i] && i > 0;
        let mut j = i;
        while j < ex.ids.len() && (ex.trained[j] && j > 0) == t {
            j += 1;
        }
        let text = tok.decode(&ex.ids[i..j], false).unwrap_or_default();
        if t {
            out.push_str(&format!("[[{text}]]"));
        } else {
            out.push_str(&text);
        }
        i = j;
    }
    out
}

fn train_cmd(path: &Path, set: &[String]) -> Result<()> {
    let cfgs = configs(path, set)?;
    let sweep = cfgs.len() > 1;
    for (i, cfg) in cfgs.iter().enumerate() {
        if sweep {
            eprintln!("sweep run {}/{}", i + 1, cfgs.len());
        }
        train_on_device(cfg, Target::New(sweep.then_some(i)))?;
    }
    Ok(())
}

fn bench_cmd(path: &Path, set: &[String], steps: usize) -> Result<()> {
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
    train_on_device(&cfgs[0], Target::Bench)
}

fn resume_cmd(run_dir: &Path) -> Result<()> {
    let cfg_path = run_dir.join(run::CONFIG_FILE);
    let cfg = configs(&cfg_path, &[])?
        .into_iter()
        .next()
        .expect("at least one run");
    let last = run::checkpoints(run_dir)
        .pop()
        .with_context(|| format!("{}: no checkpoint to resume from", run_dir.display()))?;
    let ckpt = run::load_checkpoint(&last).map_err(anyhow::Error::msg)?;
    eprintln!("resuming {} from {}", run_dir.display(), last.display());
    // Steps after the checkpoint will run again: drop what they logged the first time.
    for log in ["metrics.jsonl", "samples.jsonl"] {
        run::truncate_after_step(&run_dir.join(log), ckpt.state.step)
            .with_context(|| format!("rewriting {}", run_dir.join(log).display()))?;
    }
    train_on_device(&cfg, Target::Resume(run_dir, ckpt))
}

fn export_cmd(source: &Path, out: &Path, model: Option<String>) -> Result<()> {
    let (adapter_dir, run_base) = if source.join(run::CONFIG_FILE).is_file() {
        let cfg = configs(&source.join(run::CONFIG_FILE), &[])?
            .into_iter()
            .next()
            .expect("at least one run");
        (source.join("adapter"), Some(cfg.base))
    } else {
        (source.to_path_buf(), None)
    };
    let base = match model.or(run_base) {
        Some(b) => b,
        None => {
            let cfg_path = adapter_dir.join(graft_core::adapters::peft::CONFIG_FILE);
            let text = std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?;
            let cfg: graft_core::adapters::peft::PeftConfig = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", cfg_path.display()))?;
            cfg.base_model_name_or_path.with_context(|| {
                format!(
                    "{}: no base_model_name_or_path; pass --model",
                    cfg_path.display()
                )
            })?
        }
    };
    let loaded = load::<Flex>(
        &ModelSource::parse(&base)?,
        LoadOptions::default(),
        &Default::default(),
    )
    .with_context(|| format!("loading the base model {base:?}"))?;
    let (adapter, _) = graft_core::adapters::peft::load(&adapter_dir, &loaded.model)?;
    graft_core::adapters::gguf_lora::save(out, &adapter, &loaded.model)?;
    eprintln!(
        "wrote {} ({} modules, architecture {}): llama-cli -m <base.gguf> --lora {}",
        out.display(),
        adapter.modules().count(),
        loaded.model.config.architecture(),
        out.display()
    );
    Ok(())
}

/// Where a training run goes.
enum Target<'a> {
    /// A fresh run directory (created once model and data are ready), with its sweep index.
    New(Option<usize>),
    /// An existing run continued from a checkpoint.
    Resume(&'a Path, run::Checkpoint),
    /// A fresh run that also records its workload and prints bench figures.
    Bench,
}

fn train_on_device(cfg: &TrainConfig, target: Target<'_>) -> Result<()> {
    cfg.device.check_available().map_err(anyhow::Error::msg)?;
    match cfg.device {
        DeviceSpec::Cpu => train::<Autodiff<Flex>>(cfg, target, &Default::default()),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => train::<Autodiff<graft_core::device::Cuda>>(
            cfg,
            target,
            &graft_core::device::cuda_device(i),
        ),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => unreachable!("check_available rejects cuda in builds without it"),
    }
}

fn train<B: AutodiffBackend + GraftBackend>(
    cfg: &TrainConfig,
    target: Target<'_>,
    device: &B::Device,
) -> Result<()> {
    let loaded = load_model::<B>(cfg, device)?;
    let data = prepare_data(cfg, &loaded)?;
    let bench = matches!(target, Target::Bench);
    let layout = loaded.model.model.config.targets();
    if !cfg.lora.target_modules.iter().any(|t| layout.contains(t)) {
        let names = |ts: &[graft_core::adapters::lora::TargetModule]| {
            ts.iter()
                .map(|t| t.hf_name())
                .collect::<Vec<_>>()
                .join(", ")
        };
        anyhow::bail!(
            "lora.target_modules [{}]: none is a projection of this {} model (its layers have {})",
            names(&cfg.lora.target_modules),
            loaded.model.model.config.family,
            names(layout)
        );
    }
    let fresh = |sweep_index| -> Result<PathBuf> {
        let dir = new_run_dir(cfg, sweep_index)?;
        std::fs::write(dir.join(run::CONFIG_FILE), resolved(cfg, &dir))
            .with_context(|| format!("writing {}", dir.display()))?;
        Ok(dir)
    };
    let (run_dir, resume) = match target {
        Target::Resume(dir, ckpt) => (dir.to_path_buf(), Some(ckpt)),
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
    let trainer = trainer::Trainer::new(
        cfg,
        &loaded.model.model,
        tok,
        &data,
        run_dir.to_path_buf(),
        cfg.base.clone(),
        &stop,
    );
    eprintln!(
        "run {}: {} train / {} eval examples, {} trained tokens, adapter r={} on {} modules ({} parameters), base {} ({:.1} MiB)",
        run_dir.display(),
        data.train.len(),
        data.eval.len(),
        data.stats.trained_tokens,
        cfg.lora.r,
        trainer.param_names().len() / 2,
        trainer.n_params(),
        loaded.model.name,
        loaded.model.model.base_bytes() as f64 / 1048576.0,
    );
    if bench {
        bench::write_inputs(&trainer, run_dir, cfg.max_steps.unwrap_or(0))?;
    }
    let outcome = trainer
        .run(resume)
        .with_context(|| format!("writing run {}", run_dir.display()))?;
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
    });
    run::write_atomic(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    report::write_metrics_parquet(run_dir)
        .with_context(|| format!("writing {}/metrics.parquet", run_dir.display()))?;
    report::write_html(run_dir, &summary)
        .with_context(|| format!("writing {}/report.html", run_dir.display()))?;
    if bench {
        return bench::report(cfg, run_dir);
    }
    eprintln!("{}", serde_json::to_string_pretty(&summary)?);
    if outcome.interrupted {
        eprintln!("resume with: graft-train resume {}", run_dir.display());
    }
    Ok(())
}

/// Sets `stop` on the first SIGINT; a second SIGINT ends the process as usual.
fn install_sigint(stop: Arc<AtomicBool>) {
    let _ = ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nSIGINT: finishing this step and saving a checkpoint (press again to abort)");
    });
}

/// A fresh directory under `runs_dir` named after the config (or `output.name`) and the time.
fn new_run_dir(cfg: &TrainConfig, sweep_index: Option<usize>) -> Result<PathBuf> {
    let stem = cfg
        .path
        .file_stem()
        .map_or("run".into(), |s| s.to_string_lossy().into_owned());
    let mut name = cfg
        .name
        .clone()
        .unwrap_or_else(|| format!("{stem}-{}", timestamp()));
    if let Some(i) = sweep_index {
        name.push_str(&format!("-sweep{i}"));
    }
    std::fs::create_dir_all(&cfg.runs_dir)
        .with_context(|| format!("creating {}", cfg.runs_dir.display()))?;
    for n in 0.. {
        let candidate = if n == 0 {
            cfg.runs_dir.join(&name)
        } else {
            cfg.runs_dir.join(format!("{name}-{n}"))
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
        toml::Value::String(
            std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
        )
    };
    c.raw.data.train = Some(toml::Value::Array(
        cfg.train_files.iter().map(abs).collect(),
    ));
    c.raw.data.eval = (!cfg.eval_files.is_empty())
        .then(|| toml::Value::Array(cfg.eval_files.iter().map(abs).collect()));
    let runs = run_dir.parent().map(Path::to_path_buf).unwrap_or_default();
    c.raw.output.runs_dir = Some(
        std::path::absolute(&runs)
            .unwrap_or(runs)
            .display()
            .to_string(),
    );
    c.raw.output.name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    if Path::new(&cfg.base).exists() {
        c.raw.model.base =
            std::path::absolute(&cfg.base).map_or(cfg.base.clone(), |p| p.display().to_string());
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
