//! Bounded execution: closures with a time limit, panic messages, error chains and an allocation-limiting global allocator.

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// What [`run_bounded`] observed.
#[derive(Debug)]
pub struct Bounded<T> {
    /// The closure's result, or the panic message if it panicked.
    pub result: Result<T, String>,
    /// The largest single allocation the closure's thread requested, in bytes (0 unless
    /// the test binary uses [`alloc_limit::LimitAlloc`]).
    pub largest_alloc: usize,
}

/// Runs `f` on a new thread. Panics (naming `what`) if it does not finish within
/// `timeout` — the thread is left behind, so a hang becomes a test failure instead of
/// a stuck test run. A panic inside `f` is caught and returned as `Err(message)`.
pub fn run_bounded<T, F>(what: &str, timeout: Duration, f: F) -> Bounded<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name(format!("bounded: {what}"))
        .spawn(move || {
            alloc_limit::reset_largest();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .map_err(|p| panic_message(&*p));
            let _ = tx.send(Bounded {
                result: r,
                largest_alloc: alloc_limit::largest(),
            });
        })
        .expect("spawn a thread");
    match rx.recv_timeout(timeout) {
        Ok(b) => b,
        Err(_) => panic!("{what}: did not finish within {timeout:?} (hang?)"),
    }
}

/// The message of a caught panic payload.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".to_string()
    }
}

/// An error and all its `source()`s, joined with `: `.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A global allocator that records the largest single allocation per thread and
/// refuses absurd ones.
///
/// Install it in a test binary to catch library code that sizes an allocation from
/// untrusted metadata:
///
/// ```text
/// #[global_allocator]
/// static ALLOC: qcowx_tests::alloc_limit::LimitAlloc = qcowx_tests::alloc_limit::LimitAlloc;
/// ```
///
/// Requests larger than [`alloc_limit::HARD_LIMIT`] fail (the process then aborts with
/// Rust's "memory allocation of N bytes failed" instead of exhausting the machine);
/// [`run_bounded`] reports the largest request of its closure.
pub mod alloc_limit {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Single allocations larger than this fail.
    pub const HARD_LIMIT: usize = 2 << 30;

    thread_local! {
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn note(size: usize) {
        let _ = LARGEST.try_with(|l| {
            if size > l.get() {
                l.set(size);
            }
        });
    }

    /// Forgets the current thread's largest allocation.
    pub fn reset_largest() {
        let _ = LARGEST.try_with(|l| l.set(0));
    }

    /// The current thread's largest allocation request since the last reset, in bytes.
    pub fn largest() -> usize {
        LARGEST.try_with(Cell::get).unwrap_or(0)
    }

    /// See the [module documentation](self).
    #[derive(Debug, Clone, Copy, Default)]
    pub struct LimitAlloc;

    // SAFETY: every call is forwarded to the system allocator unchanged, except that
    // requests over the limit return null, which callers of `GlobalAlloc` must handle.
    unsafe impl GlobalAlloc for LimitAlloc {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            if layout.size() > HARD_LIMIT {
                return std::ptr::null_mut();
            }
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            if layout.size() > HARD_LIMIT {
                return std::ptr::null_mut();
            }
            // SAFETY: forwarded with the caller's layout.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `System` with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            if new_size > HARD_LIMIT {
                return std::ptr::null_mut();
            }
            // SAFETY: `ptr` came from `System` with `layout`.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}
