//! # qcowx-fuzz-harness
//!
//! What each fuzz target of `fuzz/` does with one input, as plain functions. The
//! cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) call them with libFuzzer's inputs;
//! the workspace test `tests/fuzz_regress.rs` calls them, on stable Rust, with every
//! committed seed and every input that once failed.
//!
//! * [`image_ops::run`]: an image from hostile bytes, opened read-only and read, then
//!   opened for writing and driven by a byte-coded op script (read, write,
//!   write-zeroes, discard, snapshot, fork, delete, revert, gc, check, flush, block
//!   status, resize, close and reopen);
//! * [`snapshot_table::run`]: hostile bytes as a snapshot table, parsed directly and
//!   as the table of a real image that is then used;
//! * [`nbd::handshake`]: hostile bytes as the client's side of the NBD handshake (and,
//!   when it reaches transmission, of the requests after it);
//! * [`nbd::transmission`]: a valid handshake chosen by the first byte, then hostile
//!   bytes as the transmission phase.
//!
//! Every function returns normally whatever the input. It panics only when qcowx breaks
//! a promise: a panic inside the library, a successful write that does not read back,
//! an image qcowx closed cleanly that it cannot open again, corruption appearing in an
//! image that checked clean, a valid handshake refused, a request answered twice or
//! never, a malformed reply. Work per input is bounded by the constants of each
//! module, so libFuzzer's time and memory limits find hangs and unbounded allocations
//! in the library, not in the harness.

#![warn(missing_docs)]

pub mod alloc_cap;
pub mod fixture;
pub mod image_ops;
pub mod nbd;
pub mod script;
pub mod snapshot_table;
