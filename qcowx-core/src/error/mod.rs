//! The crate's top-level error: what failed, in which file, at which offset.

#[cfg(feature = "s3")]
pub(crate) mod remote;
pub(crate) mod stream;

use crate::format::compress::CompressError;
use crate::format::header::HeaderError;
use crate::format::snapshot::SnapshotError;
use crate::storage::lock::{LockError, LockHolder};
use crate::storage::OpenError;

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
    /// An I/O operation failed. A full disk is [`Error::NoSpace`] instead; a missing
    /// file is this variant with the OS error `ENOENT` (see [`Error::raw_os_error`] and
    /// [`ErrorKind::NotFound`]).
    #[error("{file}: {op} at offset {offset:#x} failed: {source}")]
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
    /// The storage is full: the OS reported `ENOSPC`, `EDQUOT` or `EFBIG` (or an
    /// [`std::io::ErrorKind::StorageFull`] without a number). What was written before
    /// the failure and flushed stays readable; see `spec/limits.md`.
    #[error("{file}: {op} at offset {offset:#x} failed: {source}")]
    NoSpace {
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
    #[error("{file}: corrupt {structure} at offset {offset:#x}: {why}")]
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
    /// A scan of the image's metadata found structural damage (two structures in one
    /// cluster, a table past the end of the file, a malformed entry…). Nothing was
    /// written; [`Image::check`](crate::Image::check) lists every problem, and
    /// [`Image::repair`](crate::Image::repair) fixes what can be fixed.
    #[error("{file}: {doing}the image's metadata is damaged ({errors} structural error(s); first: {first})")]
    Damaged {
        /// The image file.
        file: String,
        /// What could not be done because of it ("" or e.g. "cannot repair: ").
        doing: String,
        /// How many structural errors the scan found.
        errors: u64,
        /// The first, as `check` words it (structure and offset, in hex).
        first: String,
    },
    /// The persistent bitmaps (extension, directory or a table) are invalid.
    #[error("{file}: {source}")]
    Bitmap {
        /// The image file.
        file: String,
        /// What is wrong.
        #[source]
        source: crate::format::bitmap::BitmapError,
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
    /// The image is locked by another process, or by another handle in this one
    /// ([`Error::lock_holder`] says which when it can be known).
    #[error("{file}: {source}")]
    Locked {
        /// The image file.
        file: String,
        /// Which lock conflicts.
        #[source]
        source: LockError,
    },
    /// A compressed cluster could not be decompressed.
    #[error("{file}: compressed cluster at offset {offset:#x}: {source}")]
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
    #[error("{file}: cluster at offset {offset:#x} would have {count} references, more than {bits}-bit refcounts hold")]
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
    /// A snapshot or VDI of that name exists already, or (creating a new image file)
    /// the file does.
    #[error("{file}: a {what} named '{name}' already exists")]
    AlreadyExists {
        /// The image file.
        file: String,
        /// What exists (`snapshot or VDI`, `file`).
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
    /// A send/receive stream's bytes were refused (damaged, truncated, reordered, an
    /// unknown version); the receiving image is as it was.
    #[error("{file}: stream refused: {source}")]
    Stream {
        /// The receiving image file.
        file: String,
        /// What is wrong with the stream.
        #[source]
        source: crate::format::stream::StreamError,
    },
    /// A well-formed stream does not fit the receiving image (a base it lacks, a
    /// snapshot it has, another size); the image is as it was.
    #[error("{file}: {source}")]
    StreamMismatch {
        /// The receiving image file.
        file: String,
        /// Why it does not fit.
        #[source]
        source: stream::Mismatch,
    },
    /// The object-store tier failed: the store is unreachable or refused a request,
    /// or an object is damaged (it says which bucket, key and range).
    #[cfg(feature = "s3")]
    #[error("{source}")]
    Remote {
        /// What failed, and where.
        #[source]
        source: Box<remote::RemoteError>,
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
    /// A snapshot, VDI or file of that name exists already.
    AlreadyExists,
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
    /// Every kind, for reading an [`ErrorKind::as_str`] name back.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::InvalidArgument,
        ErrorKind::ReadOnly,
        ErrorKind::OutOfRange,
        ErrorKind::NoSpace,
        ErrorKind::Io,
        ErrorKind::Corrupt,
        ErrorKind::Locked,
        ErrorKind::Unsupported,
        ErrorKind::Closed,
        ErrorKind::Image,
    ];

    /// The kind whose [`ErrorKind::as_str`] is `name`.
    ///
    /// ```
    /// use qcowx_core::ErrorKind;
    ///
    /// for kind in ErrorKind::ALL {
    ///     assert_eq!(ErrorKind::from_name(kind.as_str()), Some(kind));
    /// }
    /// assert_eq!(ErrorKind::from_name("no-space"), Some(ErrorKind::NoSpace));
    /// assert_eq!(ErrorKind::from_name("bogus"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// A short stable name (`not-found`, `read-only`, …) for machine-readable output.
    ///
    /// ```
    /// use qcowx_core::ErrorKind;
    ///
    /// assert_eq!(ErrorKind::ReadOnly.as_str(), "read-only");
    /// assert_eq!(ErrorKind::ReadOnly.to_string(), "read-only");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
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

/// Whether an OS error says the storage is full.
fn is_full(source: &std::io::Error) -> bool {
    matches!(
        source.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
    ) || source.kind() == std::io::ErrorKind::StorageFull
}

impl Error {
    /// The error for an I/O operation `op` at `offset` of `file` that failed with
    /// `source`: [`Error::NoSpace`] when the storage is full, [`Error::Io`] otherwise.
    ///
    /// ```
    /// use qcowx_core::{Error, ErrorKind};
    ///
    /// let full = std::io::Error::from_raw_os_error(28); // ENOSPC
    /// let e = Error::io("a.qcow2", "write data", 4096, full);
    /// assert!(matches!(e, Error::NoSpace { offset: 4096, .. }));
    /// assert_eq!((e.kind(), e.raw_os_error()), (ErrorKind::NoSpace, Some(28)));
    /// let other = Error::io("a.qcow2", "read", 0, std::io::Error::from_raw_os_error(5)); // EIO
    /// assert_eq!(other.kind(), ErrorKind::Io);
    /// ```
    pub fn io(
        file: impl Into<String>,
        op: &'static str,
        offset: u64,
        source: std::io::Error,
    ) -> Error {
        let file = file.into();
        if is_full(&source) {
            Error::NoSpace {
                file,
                op,
                offset,
                source,
            }
        } else {
            Error::Io {
                file,
                op,
                offset,
                source,
            }
        }
    }

    /// The error for a file that could not be opened or created: the OS error kept as
    /// it is (so [`Error::raw_os_error`] reads it), an existing file refused by a
    /// create-new as [`Error::AlreadyExists`], a lock conflict as [`Error::Locked`].
    pub(crate) fn from_open(file: &str, e: OpenError) -> Error {
        match e {
            OpenError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists => {
                Error::AlreadyExists {
                    file: file.to_string(),
                    what: "file".into(),
                    name: file.to_string(),
                }
            }
            OpenError::Io { source, .. } => Error::io(file, "open", 0, source),
            OpenError::Lock { source, .. } => Error::Locked {
                file: file.to_string(),
                source,
            },
            other => Error::InvalidArgument(other.to_string()),
        }
    }

    /// The OS error number behind this error, if it came from the OS: `Some(2)`
    /// (`ENOENT`) for a missing image or backing file, `Some(28)` (`ENOSPC`) for a
    /// full disk.
    ///
    /// ```
    /// use qcowx_core::Image;
    ///
    /// let e = Image::open("/nonexistent/disk.qcow2").unwrap_err();
    /// assert_eq!(e.raw_os_error(), Some(2));
    /// // Converted to an io::Error, the OS error survives.
    /// assert_eq!(std::io::Error::from(e).kind(), std::io::ErrorKind::NotFound);
    /// ```
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::NoSpace { source, .. } => source.raw_os_error(),
            Error::Locked {
                source: LockError::Io { source, .. },
                ..
            } => source.raw_os_error(),
            Error::Backing {
                source: Some(inner),
                ..
            } => inner.raw_os_error(),
            _ => None,
        }
    }

    /// Who holds the lock that made this a [`Error::Locked`], when that can be known.
    ///
    /// ```
    /// use qcowx_core::storage::lock::LockHolder;
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("a.qcow2");
    /// let _writer = Image::create(&path, &CreateOptions::new(1 << 20))?;
    /// let e = Image::open(&path).unwrap_err();
    /// assert_eq!(e.lock_holder(), Some(&LockHolder::ThisProcess));
    /// assert!(e.to_string().contains("another handle in this process"), "{e}");
    /// # Ok(()) }
    /// ```
    pub fn lock_holder(&self) -> Option<&LockHolder> {
        match self {
            Error::Locked { source, .. } => source.holder(),
            _ => None,
        }
    }

    /// What kind of failure this is. OS errors are classified by their error number:
    /// a full disk, an exceeded quota or a file grown past its limit is
    /// [`ErrorKind::NoSpace`]; a refused permission is [`ErrorKind::ReadOnly`]; a
    /// missing file is [`ErrorKind::NotFound`].
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, ErrorKind, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// let kind = |r: qcowx_core::Result<()>| r.unwrap_err().kind();
    /// assert_eq!(kind(img.delete_snapshot("none")), ErrorKind::NotFound);
    /// img.snapshot("default", "s")?;
    /// assert_eq!(kind(img.snapshot("default", "s").map(drop)), ErrorKind::AlreadyExists);
    /// assert_eq!(kind(img.write_at(&[0], 1 << 20)), ErrorKind::OutOfRange);
    /// assert_eq!(kind(img.resize(1)), ErrorKind::Unsupported);
    /// # Ok(()) }
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::ReadOnly { .. } => ErrorKind::ReadOnly,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::NoSpace { .. } | Error::Limit { .. } | Error::RefcountOverflow { .. } => {
                ErrorKind::NoSpace
            }
            Error::Corrupt { .. } | Error::Damaged { .. } => ErrorKind::Corrupt,
            Error::Locked { .. } => ErrorKind::Locked,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::Closed { .. } => ErrorKind::Closed,
            Error::Stream { .. } => ErrorKind::Corrupt,
            Error::StreamMismatch { source, .. } => source.kind(),
            #[cfg(feature = "s3")]
            Error::Remote { source } => source.kind(),
            Error::Io { source, .. } => match source.raw_os_error() {
                _ if is_full(source) => ErrorKind::NoSpace,
                Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => ErrorKind::ReadOnly,
                Some(libc::ENOENT) => ErrorKind::NotFound,
                Some(libc::EEXIST) => ErrorKind::AlreadyExists,
                Some(libc::EINVAL) => ErrorKind::InvalidArgument,
                _ => ErrorKind::Io,
            },
            Error::Header { .. }
            | Error::Snapshot { .. }
            | Error::Bitmap { .. }
            | Error::Compressed { .. }
            | Error::Backing { .. } => ErrorKind::Image,
        }
    }
}

impl From<Error> for std::io::Error {
    /// An error from the OS converts back to that OS error
    /// ([`std::io::Error::raw_os_error`] reads the same number as
    /// [`Error::raw_os_error`]; the file and the operation are then only in the
    /// original error, so log it first where they matter). Any other error is wrapped
    /// whole, with the [`std::io::ErrorKind`] closest to its [`ErrorKind`]:
    /// [`ErrorKind::Locked`] is `ResourceBusy`, [`ErrorKind::ReadOnly`]
    /// `PermissionDenied`, [`ErrorKind::NoSpace`] `StorageFull`, corrupt metadata
    /// `InvalidData`, and so on.
    fn from(err: Error) -> std::io::Error {
        use std::io::ErrorKind as Io;
        if let Some(code) = err.raw_os_error() {
            return std::io::Error::from_raw_os_error(code);
        }
        let kind = match err.kind() {
            ErrorKind::NotFound => Io::NotFound,
            ErrorKind::AlreadyExists => Io::AlreadyExists,
            ErrorKind::InvalidArgument | ErrorKind::OutOfRange => Io::InvalidInput,
            ErrorKind::ReadOnly => Io::PermissionDenied,
            ErrorKind::NoSpace => Io::StorageFull,
            ErrorKind::Corrupt | ErrorKind::Image => Io::InvalidData,
            ErrorKind::Locked => Io::ResourceBusy,
            ErrorKind::Unsupported => Io::Unsupported,
            ErrorKind::Io | ErrorKind::Closed => match &err {
                Error::Io { source, .. } => source.kind(),
                _ => Io::Other,
            },
        };
        std::io::Error::new(kind, err)
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
    fn a_full_disk_is_no_space_and_keeps_its_os_error() {
        for source in [
            std::io::Error::from_raw_os_error(libc::ENOSPC),
            std::io::Error::from(std::io::ErrorKind::StorageFull),
        ] {
            let e = Error::io("x", "write data", 7, source);
            assert!(matches!(e, Error::NoSpace { offset: 7, .. }), "{e:?}");
            assert_eq!(e.kind(), ErrorKind::NoSpace);
        }
        let e = Error::io(
            "x",
            "write data",
            0,
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        let io: std::io::Error = e.into();
        assert_eq!(io.raw_os_error(), Some(libc::ENOSPC));
        assert!(matches!(
            Error::io("x", "read", 0, std::io::Error::from_raw_os_error(libc::EIO)),
            Error::Io { .. }
        ));
    }

    #[test]
    fn a_missing_file_keeps_its_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = crate::Image::open(dir.path().join("missing.qcow2")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e:?}");
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let io: std::io::Error = e.into();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(io.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn writing_with_a_shared_lock_is_an_invalid_argument() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.qcow2");
        crate::Image::create(&path, &crate::CreateOptions::new(1 << 20))
            .unwrap()
            .close()
            .unwrap();
        let e = crate::OpenOptions::new()
            .write(true)
            .lock(crate::LockMode::Shared)
            .open(&path)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().contains("exclusive"), "{e}");
    }

    #[test]
    fn a_second_handle_in_this_process_is_named_as_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.qcow2");
        let _held = crate::Image::create(&path, &crate::CreateOptions::new(1 << 20)).unwrap();
        let e = crate::Image::open(&path).unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{e:?}");
        assert_eq!(e.lock_holder(), Some(&LockHolder::ThisProcess));
        assert!(
            e.to_string().contains("another handle in this process"),
            "{e}"
        );
        assert!(!e.to_string().contains("another process"), "{e}");
        let io: std::io::Error = e.into();
        assert_eq!(io.kind(), std::io::ErrorKind::ResourceBusy);
    }

    #[test]
    fn a_taken_name_is_already_exists() {
        let img = crate::Image::create_in(
            std::sync::Arc::new(crate::storage::MemStorage::new()),
            &crate::CreateOptions::new(1 << 20),
        )
        .unwrap();
        img.snapshot("default", "s").unwrap();
        let e = img.snapshot("default", "s").unwrap_err();
        assert!(
            matches!(&e, Error::AlreadyExists { name, .. } if name == "s"),
            "{e:?}"
        );
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(e.kind().as_str(), "already-exists");
        let io: std::io::Error = e.into();
        assert_eq!(io.kind(), std::io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn kinds_read_back_from_their_names() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_name(k.as_str()), Some(k));
        }
        assert_eq!(ErrorKind::from_name("busy"), None);
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
