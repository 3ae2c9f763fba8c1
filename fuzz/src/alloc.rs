//! An allocator that aborts on any single allocation larger than [`MAX_ALLOCATION`]: a size read
//! from a header that drives an allocation unchecked shows up as a crash, not as a slow run or
//! an out-of-memory kill that a fuzzer may not attribute.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;

/// The stated bound: no input of up to 1 MiB (AFL++'s default limit) may make graft ask for
/// more than this in one allocation.
pub const MAX_ALLOCATION: usize = 256 << 20;

pub struct Capped;

fn check(size: usize) {
    if size > MAX_ALLOCATION {
        // No allocation from here on: write a fixed message and abort.
        let _ = std::io::stderr().write_all(b"graft-fuzz: an allocation exceeded MAX_ALLOCATION\n");
        std::process::abort();
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged, after a size check.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
