//! The engine: one open QCOW2 image and the paths every operation on it takes. Opening
//! and creating, the L2 table cache and table access, allocation, the backing chain,
//! reads, writes, zeroing, block status, flush and resize. It knows roots (L1 tables)
//! but not what a VDI or a snapshot is: that is the [`crate::vdi`] layer's business.

pub mod alloc;
pub mod backing;
pub mod cache;
pub mod chain;
pub mod image;
