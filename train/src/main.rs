//! `graft-train`: QLoRA fine-tuning from a TOML config (see [`graft_train::cli`]).

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
    if let Err(e) = graft_train::cli::main() {
        eprintln!("error: {}", graft_core::logging::describe(e.as_ref()));
        std::process::exit(1);
    }
}
