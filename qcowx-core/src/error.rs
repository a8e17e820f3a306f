//! The crate's top-level error: what failed, in which file, at which offset.

use crate::format::compress::CompressError;
use crate::format::header::HeaderError;
use crate::format::snapshot::SnapshotError;
use crate::storage::lock::LockError;

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
    #[error("{file}: {what} '{name}' not found")]
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

/// What kind of failure an [`Error`] is: the one classification that the NBD server's
/// errno map, the control protocol's `kind` field and the command line's exit codes and
/// hints all read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A named snapshot, VDI or file does not exist.
    NotFound,
    /// An argument is invalid.
    InvalidArgument,
    /// The image, the handle or the root does not allow writing.
    ReadOnly,
    /// A request lies past the end of the virtual disk.
    OutOfRange,
    /// The storage is full, or a limit of the format would be exceeded.
    NoSpace,
    /// An operating-system I/O error other than a full disk.
    Io,
    /// The image's metadata is damaged.
    Corrupt,
    /// Another process (or another handle in this one) holds the image's lock.
    Locked,
    /// The image uses a feature this implementation does not support.
    Unsupported,
    /// The image was closed.
    Closed,
    /// Anything else about the image (its header, snapshot table, backing chain,
    /// compressed data).
    Image,
}

impl ErrorKind {
    /// A short stable name (`not-found`, `read-only`, …) for machine-readable output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::OutOfRange => "out-of-range",
            ErrorKind::NoSpace => "no-space",
            ErrorKind::Io => "io",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Locked => "locked",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Closed => "closed",
            ErrorKind::Image => "image",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    /// The OS error number behind this error, if it came from the OS (for NBD replies).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// What kind of failure this is. OS errors are classified by their error number:
    /// a full disk, an exceeded quota or a file grown past its limit is
    /// [`ErrorKind::NoSpace`]; a refused permission is [`ErrorKind::ReadOnly`]; a
    /// missing file is [`ErrorKind::NotFound`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::Limit { .. } | Error::RefcountOverflow { .. } => ErrorKind::NoSpace,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::Locked { .. } => ErrorKind::Locked,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Closed { .. } => ErrorKind::Closed,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ErrorKind::NoSpace,
                Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => ErrorKind::ReadOnly,
                Some(libc::ENOENT) => ErrorKind::NotFound,
                Some(libc::EINVAL) => ErrorKind::InvalidArgument,
                _ if source.kind() == std::io::ErrorKind::StorageFull => ErrorKind::NoSpace,
                _ => ErrorKind::Io,
            },
            Error::Header { .. }
            | Error::Snapshot { .. }
            | Error::Compressed { .. }
            | Error::Backing { .. } => ErrorKind::Image,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(code: i32) -> Error {
        Error::Io {
            file: "x".into(),
            op: "write data",
            offset: 0,
            source: std::io::Error::from_raw_os_error(code),
        }
    }

    #[test]
    fn os_errors_are_classified_by_number() {
        assert_eq!(io(libc::ENOSPC).kind(), ErrorKind::NoSpace);
        assert_eq!(io(libc::EDQUOT).kind(), ErrorKind::NoSpace);
        assert_eq!(io(libc::EFBIG).kind(), ErrorKind::NoSpace);
        assert_eq!(io(libc::EROFS).kind(), ErrorKind::ReadOnly);
        assert_eq!(io(libc::ENOENT).kind(), ErrorKind::NotFound);
        assert_eq!(io(libc::EIO).kind(), ErrorKind::Io);
        let full = Error::Io {
            file: "x".into(),
            op: "write data",
            offset: 0,
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        assert_eq!(full.kind(), ErrorKind::NoSpace);
    }

    #[test]
    fn messages_name_no_command() {
        let e = Error::NotFound {
            file: "a.qcow2".into(),
            what: "snapshot".into(),
            name: "s1".into(),
        };
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(e.to_string(), "a.qcow2: snapshot 's1' not found");
    }
}
