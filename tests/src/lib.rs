//! The test-support library of the workspace: what the integration tests of every crate
//! (`qcowx-core`, `qcowx-cli`, `qcowx-nbd`) and the workspace-level tests of this package
//! (`interop_qemu_images.rs`, `hostile_headers.rs`, `nbd_clients.rs`, …) share, so that no test file carries its own
//! copy. QEMU's and libnbd's tools are the oracles; a missing tool fails the test with
//! the package to install, it never skips it.
//!
//! * **Processes** (`process`) — [`run`] and [`run_timeout`] run a command with a time
//!   limit; [`describe`] and [`command_line`] for messages; [`require_tool`] checks an
//!   oracle once per process; [`spawn_piped`] and [`KillOnDrop`] for long-running helper
//!   processes; [`send_signal`].
//! * **QEMU's tools** (`qemu`) — [`qemu_img`] and [`qemu_io`] build commands;
//!   [`run_ok`] asserts success. Wrappers for the common sub-commands:
//!   [`qemu_img_run`], [`qemu_img_ok`], [`qemu_img_fails`], [`qemu_img_create`],
//!   [`qemu_io_ok`], [`convert_to_raw`], [`convert_snapshot_to_raw`], [`qemu_check`] /
//!   [`assert_qemu_check_clean`] / [`assert_qemu_check_clean_bytes`],
//!   [`assert_qemu_compare_eq`], [`qemu_map`], [`qemu_info`] /
//!   [`assert_info_matches_qemu`], [`QemuIoSession`] (a `qemu-io` process holding an
//!   image open). [`qemu_io_run`] and [`run`] never retry; [`run_ok`], [`qemu_io_ok`] and
//!   the check/compare wrappers retry transient lock failures (see [`LOCK_RETRY`]).
//! * **Images** (`images`) — [`open_ro`], [`open_rw`] and [`open_retry`] ride out the
//!   transient lock conflicts a multi-threaded test binary causes;
//!   [`assert_image_eq_file`], [`assert_image_matches_qemu`] and
//!   [`assert_image_eq_bytes`] compare whole disks in bounded chunks;
//!   [`classify_block_status`], [`classify_qemu_map`] and [`assert_same_classification`]
//!   compare block status with `qemu-img map`.
//! * **Deterministic data** (`rng`) — [`Rng`], the one pseudo-random generator of the
//!   tests (SplitMix64), [`pattern`], [`compressible`].
//! * **Models** (`expected`, [`strategies`]) — [`ExpectedDisk`], an in-memory model of a
//!   disk, and [`apply_random_ops`]; the proptest ranges and position-dependent write
//!   data of the model tests.
//! * **Files and storages** (`files`, `pause`) — [`tempdir`], [`read_at`], [`patch`],
//!   [`be32`], [`be64`], [`evict_page_cache`], [`CappedStorage`]; [`Pause`], a pause
//!   point that stops one thread on a chosen read.
//! * **Bounded execution** (`bounded`) — [`run_bounded`], [`alloc_limit::LimitAlloc`],
//!   [`error_text`].
//! * **Binaries** (`bins`) — [`qcowx_cli_bin`] and [`qcowx_nbd_bin`]: the binary cargo
//!   built for the running test, or built with cargo once per test process.
//! * **The CLI** ([`cli`]) — `qcowx` and QEMU's tools run in a test directory, and the
//!   assertions the CLI tests make on their exit codes and output.
//! * **Damaged images** ([`damaged`]) — [`damaged::Case`], an image damaged as QEMU's
//!   qcow2 iotests damage theirs, and the assertions comparing qcowx with QEMU on it.
//! * **NBD** (`nbd_server`, `libnbd`, [`nbd_wire`], `pki`) — [`QcowxNbd`], a `qcowx-nbd`
//!   process on a Unix socket or a free TCP port, stopped when dropped; libnbd's tools
//!   ([`nbdinfo`], [`nbdcopy`], [`nbdsh`], [`libnbd_read_ranges`]); a hand-written
//!   protocol client and an in-process server; [`make_pki`], the certificates of the TLS
//!   tests.
//! * **S3** (`s3`) — [`s3_cluster`], a real S3 server on loopback (a one-node Ceph
//!   cluster with radosgw, [`S3Cluster`]) started once per test process and stopped
//!   when it exits.
//! * **Persistent bitmaps** (`bitmaps`) — [`qemu_bitmaps`] (what `qemu-img info` lists),
//!   [`nbdinfo_dirty`] (the dirty ranges of a `qemu:dirty-bitmap:NAME` context) and
//!   [`qemu_nbd_dirty`] (the same through a `qemu-nbd -B NAME` it starts and stops).

#![warn(missing_docs)]

mod bins;
mod bitmaps;
mod bounded;
pub mod cli;
pub mod damaged;
mod expected;
mod files;
pub mod hostile_tools;
mod images;
pub mod interop_tools;
pub mod kill_tools;
mod libnbd;
mod nbd_server;
pub mod nbd_tools;
pub mod nbd_wire;
mod pause;
mod pki;
mod process;
mod qemu;
mod rng;
mod s3;
pub mod soak_tools;
pub mod strategies;

pub use bins::*;
pub use bitmaps::*;
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
pub use s3::*;

pub use tempfile::TempDir;
