//! Large reads sent from the image file's mapping: the bytes the image lends go to
//! the socket without a copy, and what the client has no room for is copied with
//! [`qcowx_core::storage::copy_mapped`], which turns a page gone from under the
//! mapping into an error instead of a `SIGBUS`.
//!
//! Pages read through the mapping count in the server's resident memory until the
//! mapping drops them: the image's storage drops them every
//! [`qcowx_core::storage::MAP_RELEASE_BYTES`] lent, so the server's RSS stays bounded
//! however many bytes it serves (pages read again fault back in from the page cache).

use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use qcowx_core::storage::copy_mapped;

use super::reply::ReplyBuf;
use super::{Conn, Request};
use crate::socket::ReplyWriter;

/// The longest a send of data lent by the image's mapping waits for the client to
/// make room; the image's cluster frees wait for it, so a client that stops reading
/// must not hold them up for longer.
pub const LEND_WAIT: Duration = Duration::from_millis(5);

impl<W: ReplyWriter> Conn<'_, W> {
    /// Runs a read too large to run inline and sends its reply (`out` is empty and
    /// left empty). Data runs the image can lend ([`qcowx_core::Disk::read_mapped`])
    /// go from its mapping to the socket under the writer lock, taken before the
    /// image's I/O gate (never the other way round: a worker waiting for the writer
    /// must not hold up the image). If the first data run cannot be lent (not in the
    /// page cache, compressed, ...) and nothing has been sent, the whole read runs as
    /// any other request, its disk reads in parallel with other replies.
    pub(super) fn read_and_send(&self, req: &Request, out: &mut ReplyBuf) {
        if let Err((errno, msg)) = self.check(req) {
            self.error(out, req, errno, &msg);
            self.send(out);
            return;
        }
        let runs = self.read_runs(req);
        if self.dead.load(Ordering::SeqCst) {
            return;
        }
        let disk = &self.export.disk;
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut sent = false;
        let n = runs.len();
        for (i, &(off, l, data)) in runs.iter().enumerate() {
            let at = out.len();
            self.read_header(out, req, i + 1 == n, off, l, data);
            if !data {
                continue;
            }
            match disk.read_mapped(off, l, |lent| lend(&mut *w, out, lent)) {
                Ok(Some(Ok(went))) => sent |= went,
                Ok(Some(Err(e))) => {
                    out.clear();
                    return self.broken(e);
                }
                Ok(None) if !sent => {
                    drop(w);
                    out.clear();
                    self.read_into(req, &runs, out);
                    self.send(out);
                    return;
                }
                Ok(None) => {
                    if let Err(e) = disk.read_at(out.grow(l as usize), off) {
                        self.read_failed(out, req, at, off, l, &e);
                        break;
                    }
                }
                Err(e) => {
                    self.read_failed(out, req, at, off, l, &e);
                    break;
                }
            }
        }
        self.write_out(&mut w, out.bytes());
        out.clear();
    }
}

/// Sends `out` (reply bytes not sent yet) and then `lent` (read data borrowed from
/// the image) as far as the client takes them before [`LEND_WAIT`] runs out, and
/// keeps the rest in `out`, in order: what is left of `lent` is copied (by
/// [`copy_mapped`]), so nothing refers to the image's mapping once this returns. True
/// if any byte went.
fn lend<W: ReplyWriter + ?Sized>(
    w: &mut W,
    out: &mut ReplyBuf,
    lent: &[IoSlice<'_>],
) -> io::Result<bool> {
    let mut bufs = Vec::with_capacity(lent.len() + 1);
    bufs.push(IoSlice::new(out.bytes()));
    bufs.extend_from_slice(lent);
    let went = w.write_until(&bufs, Instant::now() + LEND_WAIT)?;
    let head = out.len();
    if went < head {
        out.consume_front(went);
    } else {
        out.clear();
    }
    let mut skip = went.saturating_sub(head);
    for s in lent {
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        copy_mapped(out.grow(s.len() - skip), &s[skip..])?;
        skip = 0;
    }
    Ok(went > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A peer that takes at most `room` bytes before the deadline.
    struct Room {
        took: Vec<u8>,
        room: usize,
    }

    impl Write for Room {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.took.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl ReplyWriter for Room {
        fn write_until(&mut self, bufs: &[IoSlice<'_>], _: Instant) -> io::Result<usize> {
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(self.room - n);
                self.took.extend_from_slice(&b[..k]);
                n += k;
            }
            Ok(n)
        }
    }

    #[test]
    fn lent_bytes_the_peer_has_no_room_for_are_kept_in_order() {
        let lent_data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let slices = [
            IoSlice::new(&lent_data[..100]),
            IoSlice::new(&[]),
            IoSlice::new(&lent_data[100..]),
        ];
        // Room for none, part of the header, all of it and part of the data, everything.
        for room in [0, 5, 10, 150, 400] {
            let mut w = Room {
                took: Vec::new(),
                room,
            };
            let mut out = ReplyBuf::default();
            out.extend(b"0123456789");
            let went = lend(&mut w, &mut out, &slices).expect("lend");
            assert_eq!(went, room > 0);
            let mut all = w.took.clone();
            all.extend_from_slice(out.bytes());
            let mut expect = b"0123456789".to_vec();
            expect.extend_from_slice(&lent_data);
            assert_eq!(all, expect, "room {room}");
            assert_eq!(w.took.len(), room.min(expect.len()));
        }
    }
}
