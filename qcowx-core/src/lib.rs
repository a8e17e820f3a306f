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
//! The module layout follows the format: [`header`] and [`extensions`], [`tables`] (L1/L2
//! entries and the read-only bit), [`alloc`], [`snapshot`] (the snapshot table),
//! [`refcount`] (the reachability scan behind check, repair and clean close), [`cache`],
//! [`storage`] and [`lock`], [`backing`], and the [`image`] API on top.
#![warn(missing_docs)]

pub mod alloc;
pub mod backing;
pub mod cache;
pub mod chain;
pub mod compress;
#[cfg(feature = "control")]
pub mod control;
pub mod convert;
pub mod crashsim;
pub mod diff;
pub mod error;
pub mod extensions;
pub mod gc;
pub mod header;
pub mod image;
pub mod import;
pub mod lock;
pub mod map;
pub mod refcount;
pub mod rename;
pub mod size;
pub mod snapshot;
pub mod storage;
pub mod tables;
pub mod usage;
pub mod vdi;

pub use compress::CompressionType;
pub use diff::Range;
pub use error::{Error, ErrorKind, Result};
pub use gc::GcReport;
pub use image::{CreateOptions, Extent, ExtentStatus, Image, ImageInfo, OpenOptions, SnapshotInfo};
pub use lock::LockMode;
pub use refcount::CheckReport;
pub use vdi::{Disk, RootInfo, RootKind};
