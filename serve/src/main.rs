//! `graft-serve`: serving LoRA adapters on one quantized base model through an
//! OpenAI-compatible HTTP API (`graft-serve --model …`), plus one-shot `generate` and `score`.

/// mimalloc, which hands memory left unused for a second back to the kernel (see
/// [`graft_core::alloc`]).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    graft_core::alloc::mimalloc_purge_delay(1000);
    if let Err(e) = graft_serve::cli::main() {
        eprintln!("error: {}", graft_core::logging::describe(e.as_ref()));
        std::process::exit(1);
    }
}
