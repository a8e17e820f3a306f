//! Large reads sent from the image file's mapping: the bytes the image lends go to
//! the socket without a copy, and what the client has no room for is copied with
//! `process_vm_readv`, which turns a page gone from under the mapping into an error
//! instead of a `SIGBUS`.
//!
//! Pages read through the mapping count in the server's resident memory until the
//! mapping drops them: the image's storage drops them every
//! [`qcowx_core::storage::MAP_RELEASE_BYTES`] lent, so the server's RSS stays bounded
//! however many bytes it serves (pages read again fault back in from the page cache).

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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

/// Whether `process_vm_readv` may be used (cleared the first time the kernel or a
/// sandbox refuses it).
static VM_READV: AtomicBool = AtomicBool::new(true);

/// Copies `src` — bytes of a file mapping — into `dst` (as long as `src`) through the
/// kernel (`process_vm_readv` on this process), so that a page gone from under the
/// mapping (the file cut short by a process that ignores the image locks) makes this
/// one copy fail with `EFAULT` instead of killing the server with `SIGBUS`, as a
/// plain copy would. Where the call is refused (`ENOSYS`, `EPERM`), a plain copy.
fn copy_mapped(dst: &mut [u8], src: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < src.len() && VM_READV.load(Ordering::Relaxed) {
        let local = libc::iovec {
            iov_base: dst[done..].as_mut_ptr().cast(),
            iov_len: src.len() - done,
        };
        let remote = libc::iovec {
            iov_base: src[done..].as_ptr() as *mut libc::c_void,
            iov_len: src.len() - done,
        };
        // SAFETY: both ranges lie in this process: `local` in `dst`, writable for its
        // length; `remote` in `src`, only read, and faults there are reported, not
        // raised.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        if n > 0 {
            done += n as usize;
            continue;
        }
        if n == 0 {
            // No progress on a non-empty range: the next byte cannot be read.
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::ENOSYS | libc::EPERM) => VM_READV.store(false, Ordering::Relaxed),
            _ => return Err(e),
        }
    }
    dst[done..].copy_from_slice(&src[done..]);
    Ok(())
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

    /// Bytes of a mapping whose file was cut short under it: the copy fails with
    /// EFAULT (a plain copy would kill the test process with SIGBUS); bytes still
    /// there copy as they are.
    #[test]
    fn copying_from_a_mapping_of_a_truncated_file_fails_without_a_signal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0x3cu8; 1 << 20]).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        // SAFETY: the test owns the file; the point is what happens when it shrinks.
        let map = unsafe { memmap2::Mmap::map(&file) }.expect("map");
        let mut dst = vec![0u8; 8192];
        copy_mapped(&mut dst, &map[..8192]).expect("copy");
        assert!(dst.iter().all(|&b| b == 0x3c));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(4096)
            .expect("truncate");
        assert!(
            VM_READV.load(Ordering::Relaxed),
            "process_vm_readv refused here: the copy would be a plain one"
        );
        let err = copy_mapped(&mut dst, &map[8192..16384]).expect_err("pages gone");
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
        copy_mapped(&mut dst[..4096], &map[..4096]).expect("first page still there");
    }
}
