//! `graft-serve`: serving LoRA adapters on one quantized base model. Today it has the one-shot
//! `generate` command; the HTTP server lands next.

mod generate;

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
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Generate(args) => generate::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
