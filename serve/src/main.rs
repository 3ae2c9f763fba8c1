//! `graft-serve`: serving LoRA adapters on one quantized base model through an
//! OpenAI-compatible HTTP API (`graft-serve --model …`), plus one-shot `generate` and `score`.

fn main() {
    if let Err(e) = graft_serve::cli::main() {
        eprintln!("error: {}", graft_core::logging::describe(e.as_ref()));
        std::process::exit(1);
    }
}
