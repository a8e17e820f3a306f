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
//! The layers, from the bottom up (each uses only those below it):
//!
//! | module | holds |
//! |---|---|
//! | [`format`](mod@format) | bytes ⇄ types: header, extensions, L1/L2 entries, snapshot table, codecs; no I/O |
//! | [`storage`] | the file: positional I/O, sync, hole punch, QEMU-compatible locks |
//! | [`engine`] | one open image: table access and the L2 cache, allocation, the backing chain, read/write/zero/flush |
//! | [`refcount`] | reference counts from reachability: check, repair, the rebuild at clean close |
//! | [`vdi`] | roots as VDIs and snapshots: snapshot, fork, delete, revert, rename, gc, diff, usage, [`Disk`] |
//! | [`convert`], [`import`] | whole-image copies built on the layers above |
#![warn(missing_docs)]

#[cfg(feature = "control")]
pub mod control;
pub mod convert;
pub mod engine;
pub mod error;
pub mod format;
pub mod import;
pub mod map;
pub mod refcount;
pub mod size;
pub mod storage;
pub mod vdi;

pub use engine::{
    CreateOptions, Extent, ExtentStatus, Image, ImageInfo, OpenOptions, SnapshotInfo,
};
pub use error::{Error, ErrorKind, Result};
pub use format::compress::CompressionType;
pub use refcount::CheckReport;
pub use storage::lock::LockMode;
pub use vdi::diff::Range;
pub use vdi::gc::GcReport;
pub use vdi::{Disk, RootInfo, RootKind};
