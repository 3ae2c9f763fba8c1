//! The `graft-serve` command line: serving (the default), and the one-shot `generate`,
//! `score`, `bench` and `load` commands. `main` only parses and reports errors; everything runs
//! from here.

mod bench;
mod generate;
mod load;
mod score;

pub use bench::read_bandwidth;

use anyhow::Result;
use clap::{Parser, Subcommand};
use graft_core::logging::{self, LogFormat};

use crate::config::ServeArgs;

#[derive(Parser)]
#[command(
    name = "graft-serve",
    version,
    about = "Serve LoRA adapters on one quantized base model"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt, streaming the text to stdout.
    Generate(generate::GenerateArgs),
    /// Write the logits of every position of a prompt (for parity checks against PEFT).
    Score(score::ScoreArgs),
    /// Drive a running server with concurrent clients and print latency and throughput.
    Bench(bench::BenchArgs),
    /// Load and soak test a running server: a mix of requests, disconnects and adapter
    /// replacements; fails on any 5xx or lost request.
    Load(load::LoadArgs),
}

/// Parses the process arguments and runs the command. The server logs JSON lines (its
/// request log), the other commands human-readable lines.
///
/// # Errors
/// Whatever the command fails with; clap's own errors exit the process as clap does.
pub fn main() -> Result<()> {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        None => {
            logging::init(LogFormat::Json);
            crate::server::run(ServeArgs::from_matches(&matches)?)
        }
        Some(command) => {
            logging::init(LogFormat::Human);
            match command {
                Command::Generate(args) => generate::run(args),
                Command::Score(args) => score::run(args),
                Command::Bench(args) => bench::run(args),
                Command::Load(args) => load::run(args),
            }
        }
    }
}
