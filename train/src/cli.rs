//! The `graft-train` command line: training (the default), `data`, `resume`, `bench` and
//! `export`. `main` only sets the allocator up and reports errors; everything runs from here.
//!
//! ```text
//! graft-train <config.toml> [--set lora.r=32 ...]   train (one run per [sweep] combination)
//! graft-train data <config.toml> [--set ...]        what the data becomes: counts and examples
//! graft-train resume <run dir>                      continue a run from its last checkpoint
//! graft-train bench <config.toml> [--steps 10]      a short run that prints tokens/s, time split, memory
//! graft-train export <run dir> --gguf out.gguf      the adapter as llama.cpp's GGUF-LoRA
//! ```

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use graft_core::logging::{self, LogFormat};

use crate::{export, inspect, launch};

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
            model,
        }) => export::export_cmd(&source, &gguf, model),
        None => match cli.config {
            Some(config) => launch::train_cmd(&config, &cli.set),
            None => Err(anyhow::anyhow!(
                "no config given: graft-train <config.toml> (see graft-train --help)"
            )),
        },
    }
}
