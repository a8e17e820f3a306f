//! The format layer: QCOW2's on-disk structures as types, bytes in and bytes out, with
//! no I/O. The header and its extensions, L1/L2 entries and the table geometry, the
//! snapshot table, the clean-close stamp, and the compressed-cluster codecs.

pub mod addr;
pub mod bitmap;
pub mod compress;
pub mod extensions;
pub mod header;
mod header_error;
pub mod refblock;
pub(crate) mod registry;
pub mod roots;
pub mod snapshot;
pub mod stamp;
pub mod tables;
