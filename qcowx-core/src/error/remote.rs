//! What can go wrong with an object store, saying what and where: the endpoint, the
//! bucket, the key and the byte range (the object-store tier's error, re-exported as
//! `remote::RemoteError`; kept beside the crate's [`Error`](super::Error), which wraps
//! it).

use super::ErrorKind;
use crate::format::remote::LayoutError;

/// A failure of the object-store tier.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The store's address, credentials or URL are missing or malformed.
    #[error("object store configuration: {why}")]
    Config {
        /// What is missing or wrong.
        why: String,
    },
    /// No answer from the endpoint: connection refused, a timeout, a broken
    /// connection.
    #[error("object store at {endpoint} is unreachable ({op} s3://{bucket}/{key}): {why}")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// What was being done.
        op: &'static str,
        /// The bucket.
        bucket: String,
        /// The object.
        key: String,
        /// What the connection said.
        why: String,
    },
    /// The store answered with an error status.
    #[error("object store refused {op} s3://{bucket}/{key}{range}: HTTP {status}{detail}")]
    Status {
        /// What was being done.
        op: &'static str,
        /// The bucket.
        bucket: String,
        /// The object.
        key: String,
        /// The byte range asked for (` bytes A-B`), or empty.
        range: String,
        /// The HTTP status.
        status: u16,
        /// The store's error code, if it sent one (`: NoSuchKey`).
        detail: String,
    },
    /// An object is larger than it may be, or not the size its manifest says.
    #[error("s3://{bucket}/{key}: {why}")]
    Size {
        /// The bucket.
        bucket: String,
        /// The object.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// A manifest or index object was refused.
    #[error("s3://{bucket}/{key}: {source}")]
    Layout {
        /// The bucket.
        bucket: String,
        /// The object.
        key: String,
        /// What is wrong with it.
        #[source]
        source: LayoutError,
    },
    /// A record read from a stream object does not verify (its crc, its fields, its
    /// payload), or does not match its index entry.
    #[error("s3://{bucket}/{key} bytes {start}-{end}: record refused: {why}")]
    Record {
        /// The bucket.
        bucket: String,
        /// The object.
        key: String,
        /// First byte of the record.
        start: u64,
        /// Last byte of the record.
        end: u64,
        /// What is wrong.
        why: String,
    },
    /// No snapshot of that name (or identity) was pushed under the prefix.
    #[error("{url}: no snapshot '{name}' (the manifest lists: {listed})")]
    NoSnapshot {
        /// The store URL.
        url: String,
        /// The snapshot asked for.
        name: String,
        /// The names it has.
        listed: String,
    },
    /// The local cache of a remote base failed.
    #[error("remote base cache {dir}: {op}: {source}")]
    Cache {
        /// The cache folder.
        dir: String,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl RemoteError {
    /// The error kind for the library's [`crate::Error::kind`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            RemoteError::Config { .. } => ErrorKind::InvalidArgument,
            RemoteError::Unreachable { .. } | RemoteError::Cache { .. } => ErrorKind::Io,
            RemoteError::Status { status: 404, .. } | RemoteError::NoSnapshot { .. } => {
                ErrorKind::NotFound
            }
            RemoteError::Status { .. } => ErrorKind::Io,
            RemoteError::Size { .. } | RemoteError::Layout { .. } | RemoteError::Record { .. } => {
                ErrorKind::Corrupt
            }
        }
    }
}
