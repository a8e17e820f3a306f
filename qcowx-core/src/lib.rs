//! # qcowx-core
//!
//! A pure-Rust QCOW2 image library. It opens, reads, writes and creates QCOW2 images
//! exactly as QEMU does (QEMU's own tools are its test oracle), and it is the engine
//! under the `qcowx` command line and the `qcowx-nbd` server.
//!
//! ```
//! use qcowx_core::{CreateOptions, Image};
//!
//! # fn main() -> Result<(), qcowx_core::Error> {
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("disk.qcow2");
//! let img = Image::create(&path, &CreateOptions::new(64 << 20))?;
//! img.write_at(b"hello, disk", 4096)?;
//! img.flush()?;
//! let mut buf = [0u8; 11];
//! img.read_at(&mut buf, 4096)?;
//! assert_eq!(&buf, b"hello, disk");
//! img.close()?; // writes exact refcounts: the file passes `qemu-img check`
//! # Ok(()) }
//! ```
//!
//! # Layers
//!
//! From the bottom up; each uses only those below it.
//!
//! | module | holds | never does |
//! |---|---|---|
//! | [`format`](mod@format) | bytes ⇄ types: header, extensions, L1/L2 entries, refcount block entries, the snapshot table and qcowx's facts in its extra data, compression codecs | I/O |
//! | [`storage`] | the file: positional I/O, sync, hole punch, QEMU-compatible locks; test doubles behind the `testing` feature | know QCOW2 |
//! | [`engine`] | one open [`Image`]: opening and creating, table access and the L2 cache (`engine/table.rs`, the one path every writer takes), allocation, the backing chain, read, write, zero, flush, block status, resize, roots and the snapshot table | know what a VDI is |
//! | [`refcount`] | reference counts: the scan, `check`, `repair`, the rebuild, and the apply of the changes an open image records (at close and checkpoint) | |
//! | [`vdi`] | roots as VDIs and snapshots: snapshot, fork, delete, revert, rename, reconcile, gc, diff, usage, [`Disk`] | write table or header bytes except through the engine |
//! | [`convert`], [`import`], [`commit`](mod@commit) | whole-image copies built on the layers above | |
//! | [`stream`] | `send`/`receive`: a snapshot (or what changed since another) as a stream, and its atomic, resumable receipt | |
//! | `remote` (feature `s3`) | the object-store tier: `push`/`pull` of streams to an S3-compatible bucket, and a pushed snapshot as a backing layer read on demand through a bounded local cache | write to the store from a read |
//! | `control` (feature `control`) | the protocol of a running server's control socket, shared by `qcowx` and `qcowx-nbd`: one request enum, one handler per operation | |
//!
//! [`error`] holds the one [`Error`] type; [`Error::kind`] is the classification that
//! the NBD server's errno map, the control protocol and the command line's exit codes
//! all read. [`size`] parses sizes as `qemu-img` does, for every binary.
//!
//! # One NBD write, from the socket to the disk
//!
//! 1. `qcowx-nbd`'s transmission reader parses the request and calls its handler
//!    (see `qcowx_nbd::transmission`), which calls [`Disk::write_at`] on the export's
//!    VDI.
//! 2. [`Disk::write_at`] calls `Image::write_root` (`engine/write.rs`) with the VDI's
//!    root. Under the state lock it checks the root is writable and the range inside
//!    the disk, then looks up each guest cluster through `engine/table.rs`.
//! 3. A cluster whose L1 and L2 links are both writable (invariant W: this root owns it
//!    alone) is written in place: the lock is dropped, the I/O gate is held shared, and
//!    one `pwrite` covers every such cluster at consecutive host offsets
//!    ([`storage::FileStorage`]).
//! 4. Any other cluster takes the slow path: `Image::slow_target` makes the L2 table
//!    writable (`Image::writable_l2`: a shared table is copied with every link
//!    read-only, a missing one allocated) and picks a host cluster (the allocator in
//!    `engine/alloc.rs`); the data is written (merged with the old data for a partial
//!    cluster), and only then `Image::set_l2_entry` links it in the cached table.
//! 5. An NBD FLUSH (or FUA) reaches [`Image::flush`] (`engine/flush.rs`): data is made
//!    durable, then the dirty L2 tables, then the L1 sectors that link to them, with
//!    an `fdatasync` between each level; no refcount is touched (the header's dirty
//!    bit says they are stale until [`Image::close`] or [`Image::checkpoint`] writes
//!    the changes recorded in memory, `engine/deltas.rs` and `refcount/apply.rs`).
#![warn(missing_docs)]

/// The workspace README's example, compiled as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeExample;

pub mod bench;
pub mod commit;
#[cfg(feature = "control")]
pub mod control;
pub mod convert;
pub mod engine;
pub mod error;
pub mod format;
pub mod import;
pub mod measure;
pub mod refcount;
#[cfg(feature = "s3")]
pub mod remote;
pub mod size;
pub mod storage;
pub mod stream;
pub mod vdi;

pub use engine::{
    BitmapInfo, CreateOptions, Extent, ExtentStatus, IfExists, Image, ImageInfo, OpenOptions,
    OpenState, Preallocation, SnapshotInfo,
};
pub use error::{Error, ErrorKind, Result};
pub use format::compress::CompressionType;
pub use refcount::CheckReport;
pub use storage::lock::LockMode;
pub use vdi::diff::Range;
pub use vdi::gc::GcReport;
pub use vdi::{Disk, DiskCursor, DiskReader, RootInfo, RootKind, DEFAULT_VDI};
