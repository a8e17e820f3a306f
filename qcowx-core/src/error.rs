//! The crate's top-level error: what failed, in which file, at which offset.

use crate::compress::CompressError;
use crate::header::HeaderError;
use crate::lock::LockError;
use crate::snapshot::SnapshotError;

/// Result type of the image API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The header is invalid or names unsupported features.
    #[error("{file}: {source}")]
    Header {
        /// The image file.
        file: String,
        /// What is wrong.
        #[source]
        source: HeaderError,
    },
    /// An I/O operation failed.
    #[error("{file}: {op} at offset {offset} failed: {source}")]
    Io {
        /// The image file.
        file: String,
        /// What was being done.
        op: &'static str,
        /// Byte offset in the file.
        offset: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A metadata structure is inconsistent.
    #[error("{file}: corrupt {structure} at offset {offset}: {why}")]
    Corrupt {
        /// The image file.
        file: String,
        /// Which structure (L1 table, L2 table, refcount block, …).
        structure: &'static str,
        /// Byte offset of the structure or entry.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The snapshot table is invalid.
    #[error("{file}: {source}")]
    Snapshot {
        /// The image file.
        file: String,
        /// What is wrong.
        #[source]
        source: SnapshotError,
    },
    /// The image is locked by another process (or open elsewhere in this one).
    #[error("{file}: {source}")]
    Locked {
        /// The image file.
        file: String,
        /// Which lock conflicts.
        #[source]
        source: LockError,
    },
    /// A compressed cluster could not be decompressed.
    #[error("{file}: compressed cluster at offset {offset}: {source}")]
    Compressed {
        /// The image file.
        file: String,
        /// Host offset of the compressed data.
        offset: u64,
        /// What failed.
        #[source]
        source: CompressError,
    },
    /// The backing chain cannot be opened.
    #[error("{file}: backing file: {why}")]
    Backing {
        /// The image whose backing file failed.
        file: String,
        /// What failed.
        why: String,
        /// The underlying error, when opening the backing file failed.
        #[source]
        source: Option<Box<Error>>,
    },
    /// The image (or this handle) does not allow writing.
    #[error("{file}: {why}")]
    ReadOnly {
        /// The image file.
        file: String,
        /// Why writing is refused.
        why: String,
    },
    /// A feature this implementation does not support.
    #[error("{file}: {what} is not supported")]
    Unsupported {
        /// The image file.
        file: String,
        /// The feature.
        what: String,
    },
    /// A request outside the virtual disk.
    #[error("{file}: request at offset {offset} length {len} is past the end of the disk ({size} bytes)")]
    OutOfRange {
        /// The image file.
        file: String,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// An argument is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// A reference count does not fit the image's refcount width.
    #[error("{file}: cluster at offset {offset} has {count} references, more than {bits}-bit refcounts hold")]
    RefcountOverflow {
        /// The image file.
        file: String,
        /// Host offset of the cluster.
        offset: u64,
        /// Its reference count.
        count: u64,
        /// The refcount width.
        bits: u32,
    },
    /// A named snapshot or VDI does not exist.
    #[error("{file}: {what} '{name}' not found; `qcowx list {file}` lists them")]
    NotFound {
        /// The image file.
        file: String,
        /// What was looked for (snapshot, VDI).
        what: String,
        /// The name given.
        name: String,
    },
    /// A limit of the format would be exceeded.
    #[error("{file}: {what}")]
    Limit {
        /// The image file.
        file: String,
        /// Which limit.
        what: String,
    },
    /// The image was closed.
    #[error("{file}: image is closed")]
    Closed {
        /// The image file.
        file: String,
    },
}

impl Error {
    /// The OS error number behind this error, if it came from the OS (for NBD replies).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
