//! Fuzz targets: every parser that reads untrusted input, each behind one entry point
//! [`run`]`(target, bytes)`. A target passes when it returns: errors are the expected answer
//! to bad input; a panic, an abort, a hang or an allocation over [`alloc::MAX_ALLOCATION`] is a
//! finding. AFL++ drives them through `src/main.rs` (feature `afl`); the regression test runs
//! every committed corpus and crash input through the same entry point.

pub mod alloc;
pub mod seeds;
mod targets;

pub use targets::{run, TARGETS};

/// The allocator every fuzz binary and the regression test run under.
#[global_allocator]
static ALLOC: alloc::Capped = alloc::Capped;
