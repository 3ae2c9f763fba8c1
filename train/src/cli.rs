//! The `graft-train` command line: training (the default), `data`, `resume`, `bench`,
//! `export` and `merge`. `main` only sets the allocator up and reports errors; everything runs from here.
//!
//! ```text
//! graft-train <config.toml> [--set lora.r=32 ...]   train (one run per [sweep] combination)
//! graft-train data <config.toml> [--set ...]        what the data becomes: counts and examples
//! graft-train resume <run dir>                      continue a run from its last checkpoint
//! graft-train bench <config.toml> [--steps 10]      a short run that prints tokens/s, time split, memory
//! graft-train export <run dir> --gguf out.gguf      the adapter as llama.cpp's GGUF-LoRA
//! graft-train export <run dir> --ollama DIR         … with a Modelfile for `ollama create`
//! graft-train eval <run dir> --data FILE [--base]   task metrics without training
//! graft-train merge <run dir> --gguf m.gguf [--quant q4_k_m]   base + adapter as one GGUF
//! graft-train merge <run dir> --out DIR [--dtype bf16]         base + adapter as an HF dir
//! graft-train compare <run dirs | runs dir>... [--html F]      runs side by side
//! ```

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use graft_core::logging::{self, LogFormat};

use crate::merge::{self, MergeTarget};
use crate::report::compare::{self, Comparison};
use crate::{evaluate, export, inspect, launch};
use graft_core::formats::safetensors_write::FloatDtype;
use graft_core::quant::mix::FileType;

#[derive(Parser)]
#[command(
    name = "graft-train",
    version,
    about = "QLoRA fine-tuning from a config file",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
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
    /// Convert a run's adapter (or a PEFT adapter directory) to llama.cpp's GGUF-LoRA format,
    /// alone or with a Modelfile for Ollama.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["gguf", "ollama"])))]
    Export {
        /// A run directory or a PEFT adapter directory.
        source: PathBuf,
        /// Output .gguf file.
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// Output directory for Ollama: adapter.gguf and a Modelfile (`ollama create NAME -f
        /// DIR/Modelfile`); the base must be GGUF or ollama:NAME.
        #[arg(long)]
        ollama: Option<PathBuf>,
        /// The base model (default: the run's model.base, or the adapter's
        /// base_model_name_or_path).
        #[arg(long)]
        model: Option<String>,
    },
    /// Task metrics ([eval] metrics: exact_match, contains, json_valid, json_schema, regex) of
    /// a run's adapter, a PEFT adapter directory or the base alone on a data file: every example
    /// answered greedily, in batches.
    Eval {
        /// A run directory or a PEFT adapter directory.
        source: PathBuf,
        /// The examples (any format graft-train reads; the trained span is the reference).
        #[arg(long)]
        data: PathBuf,
        /// Score the base model without the adapter.
        #[arg(long)]
        base: bool,
        /// The base model (default: the run's model.base, or the adapter's
        /// base_model_name_or_path).
        #[arg(long)]
        model: Option<String>,
        /// Override a config value, e.g. eval.metrics=["exact_match"] (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Write every scored answer here (JSON Lines).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Merge a run's adapter (or a PEFT adapter directory) into its base model: one GGUF file
    /// for llama.cpp / Ollama from a GGUF base, or an HF directory for transformers / vLLM.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["gguf", "out"])))]
    Merge {
        /// A run directory or a PEFT adapter directory.
        source: PathBuf,
        /// Write a GGUF file (the base must be GGUF).
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// With --gguf: re-encode every tensor in llama.cpp's mix for this type (f32, f16,
        /// bf16, q8_0, q6_k, q5_1, q5_0, q4_1, q4_0, q4_k_m); default: each tensor keeps its
        /// type.
        #[arg(long, requires = "gguf")]
        quant: Option<FileType>,
        /// Write an HF model directory (new or empty): the base's files with merged weights from
        /// an HF base, config.json and tokenizer files written from the model for a GGUF base.
        #[arg(long)]
        out: Option<PathBuf>,
        /// With --out: the weights' dtype (f32, f16, bf16; default: an HF base's, bf16 from GGUF).
        #[arg(long, requires = "out")]
        dtype: Option<FloatDtype>,
        /// With --out: the largest safetensors shard, in MB (transformers' default 5000).
        #[arg(long, default_value_t = 5000, requires = "out")]
        max_shard_mb: usize,
        /// The base model (default: the run's model.base, or the adapter's
        /// base_model_name_or_path).
        #[arg(long)]
        model: Option<String>,
        /// Skip loading the merged model back to compare it with the base plus the adapter
        /// (the check holds both in memory; an HF base dense).
        #[arg(long)]
        no_check: bool,
    },
    /// Compare runs: the config keys that differ and each run's final and best metrics as a
    /// table, and an HTML page with their curves overlaid.
    Compare {
        /// Run directories, or directories holding runs (a sweep's runs_dir).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where to write the HTML page.
        #[arg(long, default_value = "compare.html")]
        html: PathBuf,
        /// Print the comparison as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Parses the process arguments and runs the command.
///
/// # Errors
/// Whatever the command fails with; clap's own errors exit the process as clap does.
pub fn main() -> Result<()> {
    logging::init(LogFormat::Human);
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Data {
            config,
            set,
            examples,
        }) => inspect::data_cmd(&config, &set, examples),
        Some(Command::Resume { run_dir }) => launch::resume_cmd(&run_dir),
        Some(Command::Bench { config, set, steps }) => launch::bench_cmd(&config, &set, steps),
        Some(Command::Export {
            source,
            gguf,
            ollama,
            model,
        }) => {
            let target = match (gguf, ollama) {
                (Some(f), _) => export::ExportTarget::GgufLora(f),
                (None, Some(d)) => export::ExportTarget::Ollama(d),
                (None, None) => unreachable!("clap requires --gguf or --ollama"),
            };
            export::export_cmd(&source, &target, model)
        }
        Some(Command::Eval {
            source,
            data,
            base,
            model,
            set,
            out,
        }) => evaluate::eval_cmd(&source, &data, model, base, &set, out.as_deref()).map(|_| ()),
        Some(Command::Merge {
            source,
            gguf,
            quant,
            out,
            dtype,
            max_shard_mb,
            model,
            no_check,
        }) => {
            let target = match (gguf, out) {
                (Some(path), _) => MergeTarget::Gguf { path, quant },
                (None, Some(dir)) => MergeTarget::Hf {
                    dir,
                    dtype,
                    max_shard_bytes: max_shard_mb * 1_000_000,
                },
                (None, None) => unreachable!("clap requires --gguf or --out"),
            };
            merge::merge_cmd(&source, &target, model, !no_check).map(|_| ())
        }
        Some(Command::Compare { runs, html, json }) => compare_cmd(&runs, &html, json),
        None => match cli.config {
            Some(config) => launch::train_cmd(&config, &cli.set),
            None => Err(anyhow::anyhow!(
                "no config given: graft-train <config.toml> (see graft-train --help)"
            )),
        },
    }
}

fn compare_cmd(runs: &[PathBuf], html: &std::path::Path, json: bool) -> Result<()> {
    use anyhow::Context;
    let c = Comparison::new(compare::collect(runs)?);
    graft_core::atomic::write_atomic(html, c.html().as_bytes())
        .with_context(|| format!("writing {}", html.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&c.json())?);
    } else {
        print!("{}", c.table());
        eprintln!("curves: {}", html.display());
    }
    Ok(())
}
