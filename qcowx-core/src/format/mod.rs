//! The format layer: QCOW2's on-disk structures as types, bytes in and bytes out, with
//! no I/O. The header and its extensions, L1/L2 entries and the table geometry, the
//! snapshot table, the clean-close stamp, the compressed-cluster codecs, the send/receive stream and the object-store layout.

pub mod addr;
pub mod bitmap;
pub mod compress;
pub mod extensions;
mod geometry;
pub mod header;
mod header_error;
pub mod measure;
pub mod refblock;
pub(crate) mod registry;
pub mod remote;
pub mod roots;
pub mod snapshot;
pub mod stamp;
pub mod stream;
pub mod tables;
