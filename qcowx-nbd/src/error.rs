//! Errors of the server and how image errors map to NBD error values.

use std::io;

use crate::wire;

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can end a connection or stop the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The client broke a mandatory rule of the protocol; the connection is closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The client asked for an export that does not exist with `NBD_OPT_EXPORT_NAME`
    /// (which cannot be answered with an error); the connection is closed.
    #[error("no export named '{0}'")]
    UnknownExport(String),
    /// The handshake took longer than the configured limit.
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    /// The image failed.
    #[error(transparent)]
    Image(#[from] qcowx_core::Error),
    /// TLS failed (handshake, certificate verification, a bad record).
    #[error("{0}")]
    Tls(String),
    /// The configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// A bug: a request handler panicked (only that client's connection ends).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether this is the peer going away (EOF, reset, broken pipe) rather than a
    /// real failure.
    pub fn is_disconnect(&self) -> bool {
        match self {
            Error::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// The NBD error value for an image error, from its [`qcowx_core::ErrorKind`]. `write`
/// selects `ENOSPC` for requests past the end of the disk (the protocol's choice for
/// writes; reads get `EINVAL`). The protocol has no `EEXIST`: a name that exists
/// already is `EINVAL`.
pub fn nbd_errno(err: &qcowx_core::Error, write: bool) -> u32 {
    use qcowx_core::ErrorKind as K;
    match err.kind() {
        K::ReadOnly => wire::EPERM,
        K::OutOfRange if write => wire::ENOSPC,
        K::OutOfRange | K::InvalidArgument | K::AlreadyExists => wire::EINVAL,
        K::NoSpace => wire::ENOSPC,
        K::Closed => wire::ESHUTDOWN,
        _ => wire::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_os_errors() {
        let io = |code| qcowx_core::Error::Io {
            file: "x".into(),
            op: "write data",
            offset: 0,
            source: io::Error::from_raw_os_error(code),
        };
        assert_eq!(nbd_errno(&io(libc::ENOSPC), true), wire::ENOSPC);
        assert_eq!(nbd_errno(&io(libc::EDQUOT), true), wire::ENOSPC);
        assert_eq!(nbd_errno(&io(libc::EIO), false), wire::EIO);
        assert_eq!(nbd_errno(&io(libc::ENOENT), false), wire::EIO);
        let ro = qcowx_core::Error::ReadOnly {
            file: "x".into(),
            why: "snapshot".into(),
        };
        assert_eq!(nbd_errno(&ro, true), wire::EPERM);
        let oor = qcowx_core::Error::OutOfRange {
            file: "x".into(),
            offset: 1,
            len: 2,
            size: 1,
        };
        assert_eq!(nbd_errno(&oor, true), wire::ENOSPC);
        assert_eq!(nbd_errno(&oor, false), wire::EINVAL);
    }
}
