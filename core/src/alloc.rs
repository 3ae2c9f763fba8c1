//! How long mimalloc keeps freed memory before handing it back to the kernel. Both binaries
//! use mimalloc as their global allocator, with a delay that suits their allocation pattern:
//! a training step frees and re-allocates hundreds of MB of activations every step, so the
//! trainer never hands them back (giving them back costs page faults and zeroing on every
//! step, ≈ 30% of a CPU step); the server frees adapters, KV caches and request buffers at
//! random moments over days, so it hands back what stays unused for a second — glibc's
//! malloc, whose mmap threshold rises to 32 MB after the first large free, instead kept
//! them in its arenas and the server's resident memory grew under a long soak.

extern "C" {
    /// mimalloc's `mi_option_set`, linked in by the `mimalloc` crate of the binary.
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in `mi_option_t` (15 in both mimalloc v2 and the v3 that
/// libmimalloc-sys builds; its `extended.rs` numbers the neighbours 14 and 16).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

/// Sets mimalloc's purge delay: freed memory unused for `ms` milliseconds goes back to the
/// kernel; -1 keeps it for good. Call it first thing in `main`, and only in a binary whose
/// global allocator is mimalloc (it links against mimalloc's symbol).
pub fn mimalloc_purge_delay(ms: i64) {
    // SAFETY: sets a plain integer option (mimalloc.h); any value is accepted.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, ms as std::ffi::c_long) };
}
