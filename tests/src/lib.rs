//! Helpers shared by the workspace-level interoperability tests.
//!
//! The test targets of this package (`interop.rs`, `hostile.rs`, `model.rs`, …) use
//! QEMU's own tools as the oracle. This library gathers what they all need:
//!
//! * **Running QEMU tools** — [`qemu_img`] and [`qemu_io`] build commands (and panic
//!   with "qemu-img not found: install qemu-utils (scripts/test does)" when the tool is
//!   missing: tests that need QEMU fail, they never skip); [`run`] and [`run_ok`] run a
//!   command with a time limit and, on failure, panic with the command line, exit
//!   status, stdout and stderr. Wrappers for the common sub-commands:
//!   [`qemu_img_create`], [`qemu_io_ok`], [`convert_to_raw`], [`convert_snapshot_to_raw`],
//!   [`qemu_check`] / [`assert_qemu_check_clean`], [`assert_qemu_compare_eq`],
//!   [`qemu_map`], [`qemu_info`] / [`assert_info_matches_qemu`], [`QemuIoSession`] (a
//!   `qemu-io` process holding an image open). [`qemu_io_run`] and [`run`] never retry;
//!   [`run_ok`], [`qemu_io_ok`] and the check/compare wrappers retry transient lock
//!   failures (see [`LOCK_RETRY`]).
//! * **Opening images** — [`open_ro`], [`open_rw`] and [`open_retry`] ride out the
//!   transient lock conflicts a multi-threaded test binary causes (see [`LOCK_RETRY`]).
//! * **Comparing content** — [`assert_image_eq_file`] compares the whole content of a
//!   qcowx [`Image`] with a raw file (for example `qemu-img convert -O raw` output) in
//!   bounded chunks; [`assert_image_matches_qemu`] does the conversion too;
//!   [`assert_image_eq_bytes`] compares with an in-memory expectation.
//! * **Block status** — [`classify_block_status`] and [`classify_qemu_map`] turn qcowx
//!   extents and `qemu-img map --output=json` output into per-byte classifications that
//!   [`assert_same_classification`] compares (the two merge extents differently).
//! * **Deterministic data** — [`Rng`] (SplitMix64), [`pattern`], [`compressible`].
//! * **Expected content** — [`ExpectedDisk`], an in-memory model of a disk that mirrors
//!   qcowx's write / write-zeroes / discard semantics, and [`apply_random_ops`] to drive an
//!   image and a model with the same random operations.
//! * **Files** — [`tempdir`], [`read_at`], [`patch`], [`be32`], [`be64`]; and
//!   [`CappedStorage`], an in-memory storage with a size cap.
//! * **Bounded execution** — [`run_bounded`] runs a closure on its own thread with a time
//!   limit, catches panics and reports the largest single allocation it made (when the
//!   test binary installs [`alloc_limit::LimitAlloc`] as its global allocator).
//! * **Errors** — [`error_text`] renders an error with its whole `source()` chain.

#![warn(missing_docs)]

mod bins;
mod bounded;
pub mod cli;
mod expected;
mod files;
mod images;
mod libnbd;
mod nbd_server;
pub mod nbd_wire;
mod pause;
mod pki;
mod process;
mod qemu;
mod rng;

pub use bins::*;
pub use bounded::*;
pub use expected::*;
pub use files::*;
pub use images::*;
pub use libnbd::*;
pub use nbd_server::*;
pub use pause::*;
pub use pki::*;
pub use process::*;
pub use qemu::*;
pub use rng::*;

pub use tempfile::TempDir;
