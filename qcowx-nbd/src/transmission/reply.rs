//! Replies: the reusable buffer a reply is built in ([`ReplyBuf`]), the simple and
//! error replies, and the gathering of the replies of requests run on the reader
//! thread into few writes to the connection's [`ReplyWriter`].

use std::io;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::thread;

use zerocopy::IntoBytes;

use super::{Conn, Request};
use crate::error::nbd_errno;
use crate::socket::ReplyWriter;
use crate::wire::*;

/// Replies of requests run on the reader thread are sent once this many bytes wait,
/// or sooner when no further request is already in the input buffer.
pub(super) const REPLY_BATCH: usize = 256 << 10;

/// ... or once this many replies wait. A client that pipelines gets the first
/// replies while the reader runs the rest, so it can send more requests on the other
/// core instead of waiting for the whole batch: fio at QD 16 on 4 KiB writes ran
/// about 40% faster with 4 or 8 than with whole batches (one reply per write: a few
/// percent slower than 4-8); 4 KiB reads did not change (the client was the limit).
pub const REPLY_EVERY: usize = 8;

/// Whether the replies of requests run on the reader thread are gathered for all the
/// requests the last socket read brought in (up to 256 KiB of replies), rather
/// than sent every [`REPLY_EVERY`]: when `serving` connections (two or more) are at
/// least the cores this process may run on. Early replies buy parallelism only while
/// a core is free to run the client while the reader runs the rest; when every core
/// has a connection's reader (and its clients) to run, each early `write` only wakes
/// a client that then takes the core from the reader, and the server and the client
/// both pay the switch. fio, 4 KiB random reads at QD 16 per connection over 2 and 4
/// connections on 2 cores (3 alternations): 0.11 fewer context switches per request
/// (0.13 against 0.24) and 0.3–0.6 µs less server CPU per request (3.6–4.0 against
/// 4.1–4.3 µs).
///
/// ```
/// use qcowx_nbd::transmission::gathers_whole_input;
///
/// assert!(!gathers_whole_input(1), "one connection: replies go out every few requests");
/// assert!(gathers_whole_input(usize::MAX));
/// ```
pub fn gathers_whole_input(serving: usize) -> bool {
    static CORES: OnceLock<usize> = OnceLock::new();
    let cores = *CORES.get_or_init(|| thread::available_parallelism().map_or(1, |n| n.get()));
    serving >= 2 && serving >= cores
}

/// A reply being built: bytes `[..used]` of `data`. The vector keeps its high-water
/// length, so space handed out for read data is not zeroed again on every request
/// (the image read overwrites it).
#[derive(Default)]
pub(super) struct ReplyBuf {
    data: Vec<u8>,
    used: usize,
}

impl ReplyBuf {
    pub(super) fn len(&self) -> usize {
        self.used
    }

    pub(super) fn is_empty(&self) -> bool {
        self.used == 0
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.data[..self.used]
    }

    pub(super) fn clear(&mut self) {
        self.used = 0;
    }

    pub(super) fn truncate(&mut self, len: usize) {
        self.used = self.used.min(len);
    }

    /// `n` more bytes at the end, with whatever they held before.
    pub(super) fn grow(&mut self, n: usize) -> &mut [u8] {
        let end = self.used + n;
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        let start = self.used;
        self.used = end;
        &mut self.data[start..end]
    }

    pub(super) fn extend(&mut self, bytes: &[u8]) {
        self.grow(bytes.len()).copy_from_slice(bytes);
    }

    /// Drops the first `n` bytes (sent already).
    pub(super) fn consume_front(&mut self, n: usize) {
        let n = n.min(self.used);
        self.data.copy_within(n..self.used, 0);
        self.used -= n;
    }
}

impl<W: ReplyWriter> Conn<'_, W> {
    /// Sends the replies in `out` (if any, and if the connection still stands) and
    /// empties it.
    pub(super) fn send(&self, out: &mut ReplyBuf) {
        if !out.is_empty() && !self.dead.load(Ordering::SeqCst) {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            self.write_out(&mut *w, out.bytes());
        }
        out.clear();
    }

    /// Writes `bytes` to the writer (locked by the caller); a failure finishes the
    /// connection.
    pub(super) fn write_out(&self, w: &mut W, bytes: &[u8]) {
        if let Err(e) = w.write_all(bytes).and_then(|_| w.flush()) {
            self.broken(e);
        }
    }

    /// A reply could not be sent: the connection is finished.
    pub(super) fn broken(&self, e: io::Error) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            if self.settings.verbose {
                eprintln!("qcowx-nbd: {}: cannot send reply: {e}", self.label);
            }
            (self.kill)();
        }
    }

    pub(super) fn simple(out: &mut ReplyBuf, cookie: u64, error: u32) {
        out.extend(SimpleReply::new(cookie, error).as_bytes());
    }

    pub(super) fn push_error_chunk(
        out: &mut ReplyBuf,
        cookie: u64,
        error: u32,
        msg: &str,
        offset: Option<u64>,
    ) {
        let msg = truncate_str(msg, MAX_STRING).as_bytes();
        let (ty, extra) = match offset {
            Some(_) => (REPLY_TYPE_ERROR_OFFSET, 8),
            None => (REPLY_TYPE_ERROR, 0),
        };
        let len = 6 + msg.len() + extra;
        out.extend(ChunkHeader::new(cookie, ty, REPLY_FLAG_DONE, len as u32).as_bytes());
        let p = ErrorPayload {
            error: error.into(),
            message_length: (msg.len() as u16).into(),
        };
        out.extend(p.as_bytes());
        out.extend(msg);
        if let Some(o) = offset {
            out.extend(&o.to_be_bytes());
        }
    }

    /// The error reply for a request: a structured error chunk (with the message)
    /// when structured replies are on, else a simple reply.
    pub(super) fn error(&self, out: &mut ReplyBuf, req: &Request, error: u32, msg: &str) {
        if self.settings.verbose {
            eprintln!(
                "qcowx-nbd: {}: {} offset {} length {}: error {error}: {msg}",
                self.label,
                command_name(req.command),
                req.offset,
                req.length
            );
        }
        if self.structured {
            Self::push_error_chunk(out, req.cookie, error, msg, None);
        } else {
            Self::simple(out, req.cookie, error);
        }
    }

    pub(super) fn image_error(
        &self,
        out: &mut ReplyBuf,
        req: &Request,
        e: &qcowx_core::Error,
        write: bool,
    ) {
        eprintln!(
            "qcowx-nbd: {}: {} offset {} length {} failed: {e}",
            self.label,
            command_name(req.command),
            req.offset,
            req.length
        );
        self.error(out, req, nbd_errno(e, write), &e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_buffers_reuse_their_space() {
        let mut out = ReplyBuf::default();
        out.extend(b"abc");
        out.grow(2).copy_from_slice(b"de");
        assert_eq!(out.bytes(), b"abcde");
        out.truncate(4);
        assert_eq!(out.bytes(), b"abcd");
        out.clear();
        assert!(out.is_empty());
        // Space handed out again keeps its old bytes (the caller overwrites them).
        assert_eq!(out.grow(3), b"abc");
        assert_eq!(out.len(), 3);
    }
}
