//! `send` and `receive`: a snapshot, or what changed between two snapshots, as a
//! stream (`spec/stream.md`; its bytes are [`crate::format::stream`]), and the atomic,
//! resumable receipt of one into another image.
//!
//! - [`send`] walks the tree diff between the base and the snapshot (or, for a full
//!   stream, the snapshot's allocated extents) and writes one record per changed
//!   range: data (at most 1 MiB, zstd-compressed when that is smaller), zeros or a
//!   discard.
//! - [`receive`] writes the records into a hidden staging VDI (a fork of the base, or
//!   an empty VDI), recording its progress durably beside the image every few MiB,
//!   and takes the snapshot with the sender's identity only once the end record and
//!   the whole-stream checksum verified. A receive that stopped resumes from its
//!   progress: run it again with the same stream (records already applied are
//!   checked and skipped), or give the sender the [`ResumeToken`] so it starts there.

mod progress;
mod receive;
mod send;

pub use progress::{progress_path, ResumeToken};
pub use receive::{abort, receive, resume_token, ReceiveOptions, ReceiveReport};
pub use send::{send, send_indexed, SendOptions, SendReport};

use crate::error::ErrorKind;

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
