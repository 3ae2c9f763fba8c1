//! `graft-serve`: serving LoRA adapters on one quantized base model. Today it has the one-shot
//! `generate` command; the HTTP server lands next.

mod generate;
mod score;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "graft-serve",
    version,
    about = "Serve LoRA adapters on one quantized base model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt, streaming the text to stdout.
    Generate(generate::GenerateArgs),
    /// Write the logits of every position of a prompt (for parity checks against PEFT).
    Score(score::ScoreArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Score(args) => score::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
