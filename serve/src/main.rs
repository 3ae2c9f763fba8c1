//! `graft-serve`: serving LoRA adapters on one quantized base model through an
//! OpenAI-compatible HTTP API (`graft-serve --model …`), plus one-shot `generate` and `score`.

mod api;
mod bench;
mod engine;
mod generate;
mod metrics;
mod registry;
mod score;
mod scoring;
mod server;
mod watch;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "graft-serve",
    version,
    about = "Serve LoRA adapters on one quantized base model"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: server::ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt, streaming the text to stdout.
    Generate(generate::GenerateArgs),
    /// Write the logits of every position of a prompt (for parity checks against PEFT).
    Score(score::ScoreArgs),
    /// Drive a running server with concurrent clients and print latency and throughput.
    Bench(bench::BenchArgs),
}

fn main() {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if cli.command.is_none() {
        if let Err(e) = server::apply_config(&mut cli.serve, &matches) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
    let result: Result<()> = match cli.command {
        Some(Command::Generate(args)) => generate::run(args),
        Some(Command::Score(args)) => score::run(args),
        Some(Command::Bench(args)) => bench::run(args),
        None => server::run(cli.serve),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
