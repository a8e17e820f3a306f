//! A global allocator for the fuzz targets that aborts on any single allocation
//! larger than [`MAX_ALLOC`], so an input that makes the library size a buffer from
//! hostile metadata is reported as a crash (and saved) even when the pages are never
//! touched (a zeroed allocation does not raise the RSS that libFuzzer watches).

use std::alloc::{GlobalAlloc, Layout, System};

/// The largest single allocation an input may cause: above every legitimate buffer
/// (NBD payloads of 32 MiB; L1 and snapshot tables bounded by the input's size).
pub const MAX_ALLOC: usize = 64 << 20;

/// See the [module documentation](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct CapAlloc;

fn check(size: usize) {
    if size > MAX_ALLOC {
        // No allocation may happen here: write a fixed message and abort.
        let msg = b"qcowx-fuzz: single allocation larger than MAX_ALLOC (64 MiB)\n";
        let _ = std::io::Write::write_all(&mut std::io::stderr(), msg);
        std::process::abort();
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; oversized
// requests abort the process before reaching it.
unsafe impl GlobalAlloc for CapAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: forwarded unchanged; `ptr` came from `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
