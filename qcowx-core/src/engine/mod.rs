//! The engine: one open QCOW2 image and the paths every operation on it takes. Opening
//! and creating, the L2 table cache and table access, allocation, the backing chain,
//! reads, writes, zeroing, block status, flush and resize. It knows roots (L1 tables)
//! but not what a VDI or a snapshot is: that is the [`crate::vdi`] layer's business.
//!
//! [`image`] declares [`Image`] and its state; each other file holds one job's
//! `impl Image` block: `open`, `create`, `table` (the one path to L1/L2
//! entries and the cache), `read`, `write`, `zero`, `flush` (and close), `status`,
//! `resize`, `bitmaps` (persistent dirty bitmaps: loaded at open, marked at the entry
//! points of write, zero and discard, stored at a clean close), `overlap` (no write
//! lands on the image's own structures). The state those two keep is declared apart,
//! without I/O: `bitmap_set` and `metadata_map`.

pub mod alloc;
mod amend;
pub mod backing;
mod bitmap_set;
mod bitmaps;
pub mod cache;
pub mod chain;
mod create;
mod deltas;
mod disk_refcounts;
mod flush;
pub mod image;
mod metadata_map;
mod open;
mod overlap;
mod prealloc;
mod read;
mod resize;
mod roots;
mod status;
mod table;
mod walk;
mod write;
mod zero;

pub use bitmap_set::BitmapInfo;
pub use create::{CreateOptions, IfExists};
pub use image::{Image, ImageInfo, OpenState, RootId, SnapshotInfo, DEFAULT_ROOT};
pub use open::OpenOptions;
pub use prealloc::Preallocation;
pub use status::{Extent, ExtentStatus, STATUS_WINDOW};

pub(crate) use deltas::{clusters_of, host_range, RefDeltas, Released, TreeDelta};
pub(crate) use disk_refcounts::DiskRefcounts;
pub(crate) use image::{Generation, IoGate, Root, State};
pub(crate) use metadata_map::Writing;
pub(crate) use open::open_error;
pub(crate) use roots::Target;
pub(crate) use walk::{walk_tree, Step, TableReader};
pub(crate) use zero::ZeroMode;
