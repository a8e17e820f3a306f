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

pub use crate::error::stream::Mismatch;
