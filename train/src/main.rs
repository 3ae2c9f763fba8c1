//! `graft-train`: QLoRA fine-tuning from a TOML config (see [`graft_train::cli`]).

/// mimalloc, which keeps a step's freed activations for the next step (see
/// [`graft_core::alloc`]).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    graft_core::alloc::mimalloc_purge_delay(-1);
    if let Err(e) = graft_train::cli::main() {
        eprintln!("error: {}", graft_core::logging::describe(e.as_ref()));
        std::process::exit(1);
    }
}
