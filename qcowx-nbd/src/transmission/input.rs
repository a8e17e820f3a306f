//! The reader's input: the buffer ([`Input`]) that parses requests out of a
//! connection's [`RequestStream`] in as few socket reads as possible.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use crate::socket::RequestStream;

/// How long the reader polls for the rest of a write payload before it sleeps in a
/// read. A client's socket lets only its send buffer's worth through at a time
/// (208 KiB by default on Linux), so a 1 MiB payload arrives in pieces; polling for
/// the next piece spares the reader a sleep and a wake-up per piece. fio at QD 16 on
/// 1 MiB writes over a Unix socket: 2,719-2,765 MiB/s without, 4,229-4,308 with 20
/// or 50 µs, and less server CPU per request (282-286 µs against 342). Polling for
/// request headers as well was tried and made reads slower (the reader took the
/// core the workers and the client needed).
pub const PAYLOAD_SPIN: Duration = Duration::from_micros(20);

/// Size of the reader's input buffer: the most bytes one socket read takes in.
pub(super) const INPUT_BUFFER: usize = 256 << 10;

/// The reader's input: bytes `[start..end)` of `buf` are read but not yet parsed.
pub(super) struct Input<R> {
    r: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// How long `read_exact` polls before it sleeps ([`PAYLOAD_SPIN`]).
    spin: Duration,
}

impl<R: RequestStream> Input<R> {
    pub(super) fn new(r: R) -> Input<R> {
        Input {
            r,
            buf: vec![0; INPUT_BUFFER],
            start: 0,
            end: 0,
            spin: PAYLOAD_SPIN,
        }
    }

    pub(super) fn available(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn peek(&self, n: usize) -> &[u8] {
        &self.buf[self.start..self.start + n]
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads until at least `n` (at most the buffer size) bytes are buffered.
    /// `Ok(false)`: the peer closed the connection with nothing buffered.
    pub(super) fn fill(&mut self, n: usize) -> io::Result<bool> {
        if self.buf.len() - self.start < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.available() < n {
            match self.r.read(&mut self.buf[self.end..]) {
                Ok(0) if self.available() == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Fills `dst` (the payload of a write) from the buffer, then straight from the
    /// reader. The rest of a payload is on its way: while none has arrived the reader
    /// polls for up to [`PAYLOAD_SPIN`] before it sleeps in a read.
    pub(super) fn read_exact(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let k = self.available().min(dst.len());
        dst[..k].copy_from_slice(self.peek(k));
        self.consume(k);
        let mut dst = &mut dst[k..];
        // When the current wait for more bytes began.
        let mut waiting: Option<Instant> = None;
        while !dst.is_empty() {
            let r = match waiting {
                Some(t) if t.elapsed() >= self.spin => self.r.read(dst),
                _ => self.r.read_now(dst),
            };
            match r {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    dst = &mut dst[n..];
                    waiting = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    waiting.get_or_insert_with(Instant::now);
                    std::hint::spin_loop();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Drops `n` bytes of input.
    pub(super) fn skip(&mut self, n: u64) -> io::Result<()> {
        let k = (self.available() as u64).min(n);
        self.consume(k as usize);
        io::copy(&mut (&mut self.r).take(n - k), &mut io::sink())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn input_refills_and_reads_past_its_buffer() {
        let data: Vec<u8> = (0..(INPUT_BUFFER * 2 + 100)).map(|i| i as u8).collect();
        let mut input = Input::new(&data[..]);
        assert!(input.fill(10).expect("fill"));
        assert_eq!(input.peek(3), &[0, 1, 2]);
        input.consume(5);
        let mut big = vec![0u8; INPUT_BUFFER + 50];
        input.read_exact(&mut big).expect("read");
        assert_eq!(big[0], 5);
        assert_eq!(big[INPUT_BUFFER + 49], ((INPUT_BUFFER + 54) % 256) as u8);
        input.skip(10).expect("skip");
        assert!(input.fill(1).expect("fill"));
        assert_eq!(input.peek(1)[0], ((INPUT_BUFFER + 65) % 256) as u8);
        let left = data.len() - (INPUT_BUFFER + 65);
        input.skip(left as u64).expect("skip");
        assert!(!input.fill(1).expect("eof"));
    }

    /// A stream whose bytes arrive in pieces: `read_now` finds nothing for the first
    /// `gaps` polls before each piece, and counts the blocking reads it is asked for.
    struct Trickle {
        pieces: Vec<Vec<u8>>,
        gaps: usize,
        polls: usize,
        blocking_reads: usize,
        /// Each poll sleeps this long (a piece that is slow to come).
        poll_cost: Duration,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.blocking_reads += 1;
            self.polls = self.gaps; // what was waited for has come
            self.read_now(buf)
        }
    }

    impl RequestStream for Trickle {
        fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.pieces.is_empty() {
                return Ok(0);
            }
            if self.polls < self.gaps {
                self.polls += 1;
                thread::sleep(self.poll_cost);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.polls = 0;
            let piece = &mut self.pieces[0];
            let n = piece.len().min(buf.len());
            buf[..n].copy_from_slice(&piece[..n]);
            piece.drain(..n);
            if piece.is_empty() {
                self.pieces.remove(0);
            }
            Ok(n)
        }
    }

    /// A write payload arriving in pieces is polled for, not slept for, while the
    /// pieces come within the poll window; past it the reader sleeps in a read.
    #[test]
    fn payload_pieces_are_polled_for_before_the_reader_sleeps() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let pieces = |k: usize| data.chunks(k).map(<[u8]>::to_vec).collect::<Vec<_>>();
        // Quick pieces: never a blocking read. Three polls fit in PAYLOAD_SPIN on an
        // idle machine, but a test thread can be preempted for longer than that, so
        // this part gets a window no preemption outlasts.
        let mut input = Input::new(Trickle {
            pieces: pieces(70_000),
            gaps: 3,
            polls: 0,
            blocking_reads: 0,
            poll_cost: Duration::ZERO,
        });
        input.spin = Duration::from_secs(30);
        let mut got = vec![0u8; data.len()];
        input.read_exact(&mut got).expect("read");
        assert!(got == data);
        assert_eq!(input.r.blocking_reads, 0);
        // Slow pieces: one blocking read per piece once the poll window has passed.
        let mut input = Input::new(Trickle {
            pieces: pieces(100_000),
            gaps: usize::MAX,
            polls: 0,
            blocking_reads: 0,
            poll_cost: PAYLOAD_SPIN / 4,
        });
        let mut got = vec![0u8; data.len()];
        input.read_exact(&mut got).expect("read");
        assert!(got == data);
        assert_eq!(input.r.blocking_reads, 3);
    }
}
