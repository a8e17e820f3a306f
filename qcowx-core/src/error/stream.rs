//! Why a well-formed send/receive stream does not fit the receiving image (the
//! stream layer's error, re-exported as `stream::Mismatch`). Kept beside the
//! crate's [`Error`](super::Error), which wraps it, so that the error types sit below
//! every module that returns them.

use super::ErrorKind;

/// Why a well-formed stream does not fit the receiving image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Mismatch {
    /// The incremental stream's base snapshot is not in the image.
    #[error(
        "the stream is relative to snapshot uid {uid:016x}, which this image does not have \
         (a snapshot's identity, not its name, must match)"
    )]
    BaseMissing {
        /// The base's identity.
        uid: u64,
    },
    /// The snapshot the stream carries is in the image already.
    #[error("snapshot uid {uid:016x} is in this image already (as '{name}')")]
    AlreadyReceived {
        /// Its identity.
        uid: u64,
        /// Its name here (empty: a deleted root not yet collected by gc).
        name: String,
    },
    /// A different root has the snapshot's name.
    #[error(
        "a snapshot or VDI named '{name}' exists already (or was deleted and awaits gc): \
         receive it under another name"
    )]
    NameTaken {
        /// The name.
        name: String,
    },
    /// The base snapshot's size differs from the stream's.
    #[error("the base snapshot is {have} bytes, the stream's snapshot {stream} bytes")]
    Size {
        /// The base's size here.
        have: u64,
        /// The stream's virtual size.
        stream: u64,
    },
    /// Another stream's receive is in progress in this image.
    #[error(
        "a receive of snapshot uid {other:016x} is in progress in this image; finish it \
         or drop it (qcowx receive --abort)"
    )]
    OtherReceive {
        /// The snapshot being received.
        other: u64,
    },
    /// A resumed stream does not start where this image's receive stopped.
    #[error("the stream resumes at record {stream_seq}, but this image's receive {why}")]
    Resume {
        /// Where the stream starts.
        stream_seq: u64,
        /// What the receiver has.
        why: String,
    },
    /// A resume token could not be parsed or is for another stream.
    #[error("bad resume token '{token}': {why}")]
    Token {
        /// The token.
        token: String,
        /// What is wrong.
        why: String,
    },
}

impl Mismatch {
    /// The error kind for the library's [`crate::Error::kind`].
    ///
    /// ```
    /// use qcowx_core::stream::Mismatch;
    /// use qcowx_core::ErrorKind;
    ///
    /// assert_eq!(Mismatch::BaseMissing { uid: 7 }.kind(), ErrorKind::NotFound);
    /// assert_eq!(Mismatch::NameTaken { name: "s".into() }.kind(), ErrorKind::AlreadyExists);
    /// ```
    pub fn kind(&self) -> ErrorKind {
        match self {
            Mismatch::BaseMissing { .. } => ErrorKind::NotFound,
            Mismatch::AlreadyReceived { .. } | Mismatch::NameTaken { .. } => {
                ErrorKind::AlreadyExists
            }
            Mismatch::OtherReceive { .. } => ErrorKind::Locked,
            Mismatch::Size { .. } | Mismatch::Resume { .. } | Mismatch::Token { .. } => {
                ErrorKind::InvalidArgument
            }
        }
    }
}
