//! The transmission phase: requests in, replies out, pipelined.
//!
//! One reader (the connection's thread) parses requests from its own input buffer.
//! Small reads and writes (at most [`INLINE_MAX`] bytes, no FUA) run right there on
//! the reader thread while such requests are fast — page-cache hits take a few
//! microseconds, less than handing a request to another thread costs — and their
//! replies are gathered and sent together: one `write` for every [`REPLY_EVERY`]
//! requests, or for what the last socket read brought in if that is fewer. When they
//! turn slow (a smoothed service time above
//! [`INLINE_LIMIT`]: the disk is being read), they go to the worker pool like every
//! other request until they are fast again, so one connection keeps several disk
//! requests in flight.
//!
//! The bounded pool of worker threads runs the other requests; each worker sends its
//! whole reply under one writer lock, so replies go out in completion order
//! (answered out of order, never interleaved mid-message). A large read whose data
//! sits in the page cache goes from the image file's mapping straight into the
//! socket ([`qcowx_core::Disk::read_mapped`]): one copy instead of two. The image
//! cannot free clusters while their bytes are lent, so such a send waits at most
//! [`LEND_WAIT`] for a slow client; what is left then is copied and sent after.
//!
//! The payload of a write the workers run is read straight into its buffer; while
//! the rest of it has not arrived the reader polls for it for up to [`PAYLOAD_SPIN`]
//! before sleeping, so the pieces a client's socket lets through do not each cost
//! a sleep and a wake-up.
//!
//! The reader stops taking requests for the workers while too many — or too many
//! payload bytes — are in flight, which pushes back on the client through the socket. Reply buffers and
//! write payload buffers are reused, not allocated and zeroed per request.
//!
//! Every rule of the protocol about requests is checked before any I/O: unknown
//! commands and flags not valid for a command get `NBD_EINVAL`; writes, trims and
//! write-zeroes on a read-only export `NBD_EPERM`; requests past the end of the
//! export `NBD_ENOSPC` for writes and write-zeroes and `NBD_EINVAL` otherwise;
//! requests not aligned to the advertised minimum block size, and reads and writes
//! longer than the maximum block size, `NBD_EINVAL` (the payload of an oversized
//! write is read and dropped, up to [`MAX_SKIPPED_WRITE`]; beyond that the
//! connection is closed). Write-zeroes, trim and cache carry no payload and are
//! accepted at any length (real clients send them larger than the maximum).

use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use qcowx_core::{Extent, ExtentStatus};
use zerocopy::{FromBytes, IntoBytes};

use crate::config::{DetectZeroes, DiscardMode, Settings};
use crate::error::{nbd_errno, Error, Result};
use crate::exports::Export;
use crate::handshake::{context_id, MetaContext, Negotiated};
use crate::wire::*;

/// An oversized write payload up to this many bytes is read and dropped (and the
/// request fails with `NBD_EINVAL`); a larger one closes the connection.
pub const MAX_SKIPPED_WRITE: u32 = 256 << 20;

/// The most bytes one block status request looks at (the reply may cover less than
/// asked, as the protocol allows).
pub const MAX_STATUS_QUERY: u64 = 1 << 30;

/// The most descriptors in one block status chunk.
pub const MAX_DESCRIPTORS: usize = 1 << 16;

/// Reads and writes up to this many bytes may run on the reader thread itself.
pub const INLINE_MAX: u32 = 64 << 10;

/// Small requests run on the reader thread while their smoothed service time stays
/// below this (page-cache hits); above it they go to the workers.
pub const INLINE_LIMIT: Duration = Duration::from_micros(50);

/// The longest a send of data lent by the image's mapping waits for the client to
/// make room; the image's cluster frees wait for it, so a client that stops reading
/// must not hold them up for longer.
pub const LEND_WAIT: Duration = Duration::from_millis(5);

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
const INPUT_BUFFER: usize = 256 << 10;

/// Replies of requests run on the reader thread are sent once this many bytes wait,
/// or sooner when no further request is already in the input buffer.
const REPLY_BATCH: usize = 256 << 10;

/// ... or once this many replies wait. A client that pipelines gets the first
/// replies while the reader runs the rest, so it can send more requests on the other
/// core instead of waiting for the whole batch: fio at QD 16 on 4 KiB writes ran
/// about 40% faster with 4 or 8 than with whole batches (one reply per write: a few
/// percent slower than 4-8); 4 KiB reads did not change (the client was the limit).
pub const REPLY_EVERY: usize = 8;

/// The most write payload bytes kept for reuse per connection.
const POOL_BYTES: usize = 64 << 20;

/// One parsed request.
#[derive(Debug)]
struct Request {
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    /// Write data (None for other commands and for oversized writes).
    payload: Option<Vec<u8>>,
    /// A write whose payload was larger than the maximum block size (dropped).
    oversized: bool,
    /// Bytes charged to the in-flight budget.
    cost: usize,
}

/// Limits the requests and payload bytes in flight on one connection.
struct Budget {
    state: Mutex<(usize, usize)>,
    cv: Condvar,
    max_count: usize,
    max_bytes: usize,
}

impl Budget {
    fn acquire(&self, bytes: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.0 >= self.max_count || (st.0 > 0 && st.1 + bytes > self.max_bytes) {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.0 += 1;
        st.1 += bytes;
    }

    fn release(&self, bytes: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(1);
        st.1 = st.1.saturating_sub(bytes);
        // Only the reader ever waits here.
        self.cv.notify_one();
    }
}

/// A reply being built: bytes `[..used]` of `data`. The vector keeps its high-water
/// length, so space handed out for read data is not zeroed again on every request
/// (the image read overwrites it).
#[derive(Default)]
struct ReplyBuf {
    data: Vec<u8>,
    used: usize,
}

impl ReplyBuf {
    fn len(&self) -> usize {
        self.used
    }

    fn is_empty(&self) -> bool {
        self.used == 0
    }

    fn bytes(&self) -> &[u8] {
        &self.data[..self.used]
    }

    fn clear(&mut self) {
        self.used = 0;
    }

    fn truncate(&mut self, len: usize) {
        self.used = self.used.min(len);
    }

    /// `n` more bytes at the end, with whatever they held before.
    fn grow(&mut self, n: usize) -> &mut [u8] {
        let end = self.used + n;
        if self.data.len() < end {
            self.data.resize(end, 0);
        }
        let start = self.used;
        self.used = end;
        &mut self.data[start..end]
    }

    fn extend(&mut self, bytes: &[u8]) {
        self.grow(bytes.len()).copy_from_slice(bytes);
    }

    /// Drops the first `n` bytes (sent already).
    fn consume_front(&mut self, n: usize) {
        let n = n.min(self.used);
        self.data.copy_within(n..self.used, 0);
        self.used -= n;
    }
}

/// Where a connection's replies go.
pub trait ReplyWriter: Write + Send {
    /// Writes a prefix of `bufs`, in order, waiting for the peer to make room only
    /// until `deadline`; returns how many bytes went. The default writes nothing, so
    /// every reply goes through [`Write`] (copied first).
    fn write_until(&mut self, _bufs: &[IoSlice<'_>], _deadline: Instant) -> io::Result<usize> {
        Ok(0)
    }
}

impl ReplyWriter for Vec<u8> {}

impl ReplyWriter for io::Sink {}

impl<W: ReplyWriter + ?Sized> ReplyWriter for &mut W {
    fn write_until(&mut self, bufs: &[IoSlice<'_>], deadline: Instant) -> io::Result<usize> {
        (**self).write_until(bufs, deadline)
    }
}

/// A connection's request stream: a blocking reader that can also be asked, without
/// sleeping, for bytes that have already arrived.
pub trait RequestStream: Read {
    /// Reads what has arrived without waiting for more: `Err(WouldBlock)` when
    /// nothing has. The default is `read` itself, for inputs that never keep a reader
    /// waiting (byte slices, test streams).
    fn read_now(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }
}

impl RequestStream for &[u8] {}

/// The reader's input: bytes `[start..end)` of `buf` are read but not yet parsed.
struct Input<R> {
    r: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: RequestStream> Input<R> {
    fn new(r: R) -> Input<R> {
        Input {
            r,
            buf: vec![0; INPUT_BUFFER],
            start: 0,
            end: 0,
        }
    }

    fn available(&self) -> usize {
        self.end - self.start
    }

    fn peek(&self, n: usize) -> &[u8] {
        &self.buf[self.start..self.start + n]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads until at least `n` (at most the buffer size) bytes are buffered.
    /// `Ok(false)`: the peer closed the connection with nothing buffered.
    fn fill(&mut self, n: usize) -> io::Result<bool> {
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
    fn read_exact(&mut self, dst: &mut [u8]) -> io::Result<()> {
        let k = self.available().min(dst.len());
        dst[..k].copy_from_slice(self.peek(k));
        self.consume(k);
        let mut dst = &mut dst[k..];
        // When the current wait for more bytes began.
        let mut waiting: Option<Instant> = None;
        while !dst.is_empty() {
            let r = match waiting {
                Some(t) if t.elapsed() >= PAYLOAD_SPIN => self.r.read(dst),
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
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let k = (self.available() as u64).min(n);
        self.consume(k as usize);
        io::copy(&mut (&mut self.r).take(n - k), &mut io::sink())?;
        Ok(())
    }
}

/// State shared by the reader and the workers of one connection.
struct Conn<'a, W> {
    export: &'a Export,
    structured: bool,
    contexts: &'a [MetaContext],
    settings: &'a Settings,
    writer: Mutex<W>,
    budget: Budget,
    /// Write payload buffers for reuse, and the bytes they hold.
    pool: Mutex<(Vec<Vec<u8>>, usize)>,
    /// Smoothed service time of small reads and writes, in nanoseconds.
    small_ns: AtomicU64,
    /// Set when a reply could not be sent: the connection is finished.
    dead: AtomicBool,
    /// Set once anything was written.
    wrote: AtomicBool,
    /// Called once when the connection must end at once (unblocks the reader).
    kill: &'a (dyn Fn() + Sync),
    label: &'a str,
}

/// Serves the transmission phase of one connection until the client disconnects
/// (`NBD_CMD_DISC` or EOF), breaks the protocol, or a reply cannot be sent. Requests
/// already read are always finished (and answered, if the client still listens)
/// before this returns. `reader` needs no buffering of its own.
///
/// `kill` must make blocked reads of `reader` return (for a socket: shut it down).
pub fn serve<R: RequestStream, W: ReplyWriter>(
    reader: R,
    writer: W,
    negotiated: &Negotiated,
    settings: &Settings,
    kill: &(dyn Fn() + Sync),
    label: &str,
) -> Result<()> {
    let conn = Conn {
        export: &negotiated.export,
        structured: negotiated.structured,
        contexts: &negotiated.contexts,
        settings,
        writer: Mutex::new(writer),
        budget: Budget {
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
            max_count: settings.max_in_flight,
            max_bytes: settings.max_in_flight_bytes,
        },
        pool: Mutex::new((Vec::new(), 0)),
        small_ns: AtomicU64::new(0),
        dead: AtomicBool::new(false),
        wrote: AtomicBool::new(false),
        kill,
        label,
    };
    let (tx, rx) = mpsc::sync_channel::<Request>(settings.max_in_flight);
    let rx = Mutex::new(rx);
    let result = thread::scope(|scope| {
        for _ in 0..settings.workers {
            scope.spawn(|| conn.work(&rx));
        }
        let r = conn.read_requests(Input::new(reader), &tx);
        drop(tx);
        r
    });
    if conn.wrote.load(Ordering::SeqCst) && !settings.cache.skips_flush() {
        if let Err(e) = conn.export.disk.flush() {
            eprintln!("qcowx-nbd: {label}: flush at disconnect failed: {e}");
        }
    }
    result
}

/// Whether every byte is zero.
fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// The size of the fixed request header.
const HEADER: usize = std::mem::size_of::<RequestHeader>();

impl<W: ReplyWriter> Conn<'_, W> {
    fn read_requests<R: RequestStream>(
        &self,
        mut input: Input<R>,
        tx: &SyncSender<Request>,
    ) -> Result<()> {
        let mut out = ReplyBuf::default();
        let r = self.read_loop(&mut input, tx, &mut out);
        // Replies to requests already run go out whatever ended the loop.
        self.send_batch(&mut out);
        r
    }

    fn read_loop<R: RequestStream>(
        &self,
        input: &mut Input<R>,
        tx: &SyncSender<Request>,
        out: &mut ReplyBuf,
    ) -> Result<()> {
        let max = self.settings.max_block_size;
        let mut gathered = 0usize;
        loop {
            if self.dead.load(Ordering::SeqCst) {
                return Ok(());
            }
            if input.available() < HEADER {
                // Nothing more to run before the next socket read, which may block:
                // answer what was run so far.
                self.send_batch(out);
                if !input
                    .fill(HEADER)
                    .map_err(|e| Error::io("read request", e))?
                {
                    return Ok(());
                }
            }
            let h = RequestHeader::read_from_bytes(input.peek(HEADER))
                .map_err(|_| Error::Protocol("short request header".into()))?;
            input.consume(HEADER);
            if h.magic.get() != REQUEST_MAGIC {
                return Err(Error::Protocol(format!(
                    "request magic {:#x} is not {REQUEST_MAGIC:#x}",
                    h.magic.get()
                )));
            }
            let command = h.command.get();
            let length = h.length.get();
            if command == CMD_DISC {
                return Ok(());
            }
            let mut req = Request {
                flags: h.flags.get(),
                command,
                cookie: h.cookie.get(),
                offset: h.offset.get(),
                length,
                payload: None,
                oversized: false,
                cost: 0,
            };
            if command == CMD_WRITE && length > max {
                if length > MAX_SKIPPED_WRITE {
                    return Err(Error::Protocol(format!("write payload of {length} bytes")));
                }
                input
                    .skip(u64::from(length))
                    .map_err(|e| Error::io("skip write payload", e))?;
                req.oversized = true;
            }
            if self.runs_inline(&req) {
                let len = if command == CMD_WRITE {
                    length as usize
                } else {
                    0
                };
                if input.available() < len {
                    self.send_batch(out);
                    if !input
                        .fill(len)
                        .map_err(|e| Error::io("read write payload", e))?
                    {
                        return Err(Error::io(
                            "read write payload",
                            io::ErrorKind::UnexpectedEof.into(),
                        ));
                    }
                }
                if out.is_empty() {
                    gathered = 0;
                }
                let t0 = Instant::now();
                self.handle(&req, input.peek(len), out);
                self.note_small(t0.elapsed());
                input.consume(len);
                gathered += 1;
                if out.len() >= REPLY_BATCH || gathered >= REPLY_EVERY {
                    self.send_batch(out);
                }
                continue;
            }
            // To the workers. What was run here is answered first: the budget or the
            // queue may make this thread wait.
            self.send_batch(out);
            req.cost = match command {
                CMD_READ | CMD_WRITE if !req.oversized => length.min(max) as usize,
                _ => 0,
            };
            self.budget.acquire(req.cost);
            if command == CMD_WRITE && !req.oversized {
                let mut buf = self.take_buffer(length as usize);
                if let Err(e) = input.read_exact(&mut buf) {
                    self.budget.release(req.cost);
                    return Err(Error::io("read write payload", e));
                }
                req.payload = Some(buf);
            }
            if tx.send(req).is_err() {
                return Ok(());
            }
        }
    }

    /// Whether `req` runs on the reader thread: a small read or write, with no flush
    /// to wait for, while small requests are fast.
    fn runs_inline(&self, req: &Request) -> bool {
        let small = match req.command {
            CMD_READ => true,
            CMD_WRITE => {
                req.flags & CMD_FLAG_FUA == 0
                    && !self.settings.cache.write_through()
                    && !req.oversized
            }
            _ => false,
        };
        small
            && req.length <= INLINE_MAX
            && self.small_ns.load(Ordering::Relaxed) < INLINE_LIMIT.as_nanos() as u64
    }

    /// Folds the service time of one small read or write into the running average
    /// (weight 1/8).
    fn note_small(&self, took: Duration) {
        let ns = took.as_nanos().min(u128::from(u32::MAX)) as u64;
        let old = self.small_ns.load(Ordering::Relaxed);
        let new = old - old / 8 + ns / 8;
        self.small_ns.store(new, Ordering::Relaxed);
    }

    /// A buffer of `len` bytes for a write payload, reused when one is free.
    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let mut buf = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            match pool.0.pop() {
                Some(b) => {
                    pool.1 -= b.capacity();
                    b
                }
                None => Vec::new(),
            }
        };
        if buf.len() < len {
            buf.resize(len, 0);
        } else {
            buf.truncate(len);
        }
        buf
    }

    /// Gives a payload buffer back for reuse (dropped if the pool is full).
    fn return_buffer(&self, buf: Vec<u8>) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.1 + buf.capacity() <= POOL_BYTES && pool.0.len() < self.settings.max_in_flight {
            pool.1 += buf.capacity();
            pool.0.push(buf);
        }
    }

    fn work(&self, rx: &Mutex<Receiver<Request>>) {
        let mut out = ReplyBuf::default();
        loop {
            let req = {
                let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
                rx.recv()
            };
            let Ok(mut req) = req else { return };
            let cost = req.cost;
            let payload = req.payload.take();
            let small = matches!(req.command, CMD_READ | CMD_WRITE) && req.length <= INLINE_MAX;
            if req.command == CMD_READ && req.length > INLINE_MAX {
                self.read_and_send(&req, &mut out);
                self.budget.release(cost);
                continue;
            }
            let t0 = Instant::now();
            self.handle(&req, payload.as_deref().unwrap_or_default(), &mut out);
            if small {
                self.note_small(t0.elapsed());
            }
            if let Some(buf) = payload {
                self.return_buffer(buf);
            }
            self.send(out.bytes());
            out.clear();
            self.budget.release(cost);
        }
    }

    /// Sends the replies gathered in `out` (if any) and empties it.
    fn send_batch(&self, out: &mut ReplyBuf) {
        if !out.is_empty() {
            self.send(out.bytes());
            out.clear();
        }
    }

    fn send(&self, bytes: &[u8]) {
        if self.dead.load(Ordering::SeqCst) {
            return;
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = w.write_all(bytes).and_then(|_| w.flush()) {
            self.broken(e);
        }
    }

    /// A reply could not be sent: the connection is finished.
    fn broken(&self, e: io::Error) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            if self.settings.verbose {
                eprintln!("qcowx-nbd: {}: cannot send reply: {e}", self.label);
            }
            (self.kill)();
        }
    }

    /// Runs a read too large to run inline and sends its reply (`out` is empty and
    /// left empty). Data runs the image can lend ([`qcowx_core::Disk::read_mapped`])
    /// go from its mapping to the socket under the writer lock, taken before the
    /// image's I/O gate (never the other way round: a worker waiting for the writer
    /// must not hold up the image). If the first data run cannot be lent (not in the
    /// page cache, compressed, ...) and nothing has been sent, the whole read runs as
    /// any other request, its disk reads in parallel with other replies.
    fn read_and_send(&self, req: &Request, out: &mut ReplyBuf) {
        if let Err((errno, msg)) = self.check(req) {
            self.error(out, req, errno, &msg);
            self.send(out.bytes());
            out.clear();
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
                    self.send(out.bytes());
                    out.clear();
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
        if let Err(e) = w.write_all(out.bytes()).and_then(|_| w.flush()) {
            self.broken(e);
        }
        out.clear();
    }

    // ---- replies --------------------------------------------------------------------

    fn simple(out: &mut ReplyBuf, cookie: u64, error: u32) {
        out.extend(SimpleReply::new(cookie, error).as_bytes());
    }

    fn push_error_chunk(
        out: &mut ReplyBuf,
        cookie: u64,
        error: u32,
        msg: &str,
        offset: Option<u64>,
    ) {
        let mut end = msg.len().min(MAX_STRING);
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        let msg = &msg.as_bytes()[..end];
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
    fn error(&self, out: &mut ReplyBuf, req: &Request, error: u32, msg: &str) {
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

    fn image_error(&self, out: &mut ReplyBuf, req: &Request, e: &qcowx_core::Error, write: bool) {
        eprintln!(
            "qcowx-nbd: {}: {} offset {} length {} failed: {e}",
            self.label,
            command_name(req.command),
            req.offset,
            req.length
        );
        self.error(out, req, nbd_errno(e, write), &e.to_string())
    }

    // ---- requests ---------------------------------------------------------------------

    /// Checks a request against the protocol's rules; `Err((errno, message))` if it
    /// must fail without doing anything.
    fn check(&self, req: &Request) -> std::result::Result<(), (u32, String)> {
        let name = command_name(req.command);
        let allowed = match req.command {
            CMD_READ if self.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            c => return Err((EINVAL, format!("unknown command {c}"))),
        };
        if req.flags & !allowed != 0 {
            return Err((
                EINVAL,
                format!("flags {:#x} are not valid for {name}", req.flags & !allowed),
            ));
        }
        let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && !self.export.writable {
            return Err((EPERM, format!("{name} on a read-only export")));
        }
        let max = self.settings.max_block_size;
        // Only requests with a payload are limited: clients (nbdcopy among them)
        // send write-zeroes, trim and cache requests larger than the maximum block
        // size, and they cost no buffer here.
        let limited = matches!(req.command, CMD_READ | CMD_WRITE);
        if req.oversized || (limited && req.length > max) {
            return Err((
                EINVAL,
                format!(
                    "{name} of {} bytes is larger than the maximum block size {max}",
                    req.length
                ),
            ));
        }
        if req.command == CMD_FLUSH {
            if req.offset != 0 || req.length != 0 {
                return Err((EINVAL, "FLUSH with a nonzero offset or length".into()));
            }
            return Ok(());
        }
        if req.command == CMD_BLOCK_STATUS {
            if !self.structured || self.contexts.is_empty() {
                return Err((
                    EINVAL,
                    "BLOCK_STATUS without a negotiated metadata context".into(),
                ));
            }
            if req.length == 0 {
                return Err((EINVAL, "BLOCK_STATUS of length 0".into()));
            }
        }
        let size = self.export.size;
        let end = req.offset.checked_add(u64::from(req.length));
        if end.is_none_or(|e| e > size) {
            let errno = if matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES) {
                ENOSPC
            } else {
                EINVAL
            };
            return Err((
                errno,
                format!(
                    "{name} at offset {} length {} is past the end of the export ({size} bytes)",
                    req.offset, req.length
                ),
            ));
        }
        let min = u64::from(self.settings.min_block_size);
        if min > 1 {
            let end = req.offset + u64::from(req.length);
            if !req.offset.is_multiple_of(min)
                || (!u64::from(req.length).is_multiple_of(min) && end != size)
            {
                return Err((
                    EINVAL,
                    format!(
                        "{name} at offset {} length {} is not aligned to the minimum block size {min}",
                        req.offset, req.length
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Runs `req` (with `payload` for a write) and appends its whole reply to `out`.
    fn handle(&self, req: &Request, payload: &[u8], out: &mut ReplyBuf) {
        if let Err((errno, msg)) = self.check(req) {
            return self.error(out, req, errno, &msg);
        }
        match req.command {
            CMD_READ => self.read(req, out),
            CMD_WRITE => self.write(req, payload, out),
            CMD_FLUSH => match self.flush() {
                Ok(()) => Self::simple(out, req.cookie, 0),
                Err(e) => self.image_error(out, req, &e, true),
            },
            CMD_TRIM => self.trim(req, out),
            CMD_CACHE => {
                // A prefetch hint: warm the metadata cache. Failure changes nothing.
                let _ = self
                    .export
                    .disk
                    .block_status(req.offset, u64::from(req.length).min(MAX_STATUS_QUERY));
                Self::simple(out, req.cookie, 0)
            }
            CMD_WRITE_ZEROES => self.write_zeroes(req, out),
            CMD_BLOCK_STATUS => self.block_status(req, out),
            _ => self.error(out, req, EINVAL, "unknown command"),
        }
    }

    fn flush(&self) -> qcowx_core::Result<()> {
        if self.settings.cache.skips_flush() {
            Ok(())
        } else {
            self.export.disk.flush()
        }
    }

    /// Makes a completed write durable if FUA (or write-through caching) asks for it.
    fn finish_write(&self, req: &Request, r: qcowx_core::Result<()>, out: &mut ReplyBuf) {
        if !self.wrote.load(Ordering::Relaxed) {
            self.wrote.store(true, Ordering::SeqCst);
        }
        let r = r.and_then(|_| {
            if req.flags & CMD_FLAG_FUA != 0 || self.settings.cache.write_through() {
                self.flush()
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => Self::simple(out, req.cookie, 0),
            Err(e) => self.image_error(out, req, &e, true),
        }
    }

    fn write(&self, req: &Request, data: &[u8], out: &mut ReplyBuf) {
        let disk = &self.export.disk;
        let r = if self.settings.detect_zeroes != DetectZeroes::Off && is_zero(data) {
            let unmap = self.settings.detect_zeroes == DetectZeroes::Unmap
                && self.settings.discard == DiscardMode::Unmap;
            disk.write_zeroes(req.offset, data.len() as u64, unmap)
        } else {
            disk.write_at(data, req.offset)
        };
        self.finish_write(req, r, out)
    }

    fn trim(&self, req: &Request, out: &mut ReplyBuf) {
        if self.settings.discard == DiscardMode::Ignore || req.length == 0 {
            return Self::simple(out, req.cookie, 0);
        }
        let r = self.export.disk.discard(req.offset, u64::from(req.length));
        self.finish_write(req, r, out)
    }

    fn write_zeroes(&self, req: &Request, out: &mut ReplyBuf) {
        let len = u64::from(req.length);
        if req.flags & CMD_FLAG_FAST_ZERO != 0 && !self.zeroing_is_fast(req.offset, len) {
            return self.error(
                out,
                req,
                ENOTSUP,
                "zeroing this range would need data writes (partial clusters)",
            );
        }
        if len == 0 {
            return Self::simple(out, req.cookie, 0);
        }
        let unmap =
            req.flags & CMD_FLAG_NO_HOLE == 0 && self.settings.discard == DiscardMode::Unmap;
        let r = self.export.disk.write_zeroes(req.offset, len, unmap);
        self.finish_write(req, r, out)
    }

    /// Whether write-zeroes of the range changes only metadata: whole clusters are
    /// zeroed by flag; partial clusters at the edges only if they already read as
    /// zeros.
    fn zeroing_is_fast(&self, offset: u64, len: u64) -> bool {
        let cs = self.export.cluster_size;
        let end = offset + len;
        let size = self.export.size;
        let mut edges = Vec::new();
        if !offset.is_multiple_of(cs) {
            edges.push((offset, (offset.next_multiple_of(cs)).min(end)));
        }
        if !end.is_multiple_of(cs) && end != size {
            let start = (end - end % cs).max(offset);
            if edges.last().is_none_or(|&(_, e)| e <= start) {
                edges.push((start, end));
            }
        }
        edges.into_iter().filter(|(s, e)| e > s).all(|(s, e)| {
            self.export.disk.block_status(s, e - s).is_ok_and(|ext| {
                ext.iter()
                    .all(|x| matches!(x.status, ExtentStatus::Zero | ExtentStatus::Unallocated))
            })
        })
    }

    fn read(&self, req: &Request, out: &mut ReplyBuf) {
        self.read_into(req, &self.read_runs(req), out);
    }

    /// The reply to read `req`, made of `runs` (see [`Conn::read_runs`]), read with
    /// `read_at`.
    fn read_into(&self, req: &Request, runs: &[(u64, u64, bool)], out: &mut ReplyBuf) {
        let n = runs.len();
        for (i, &(off, l, data)) in runs.iter().enumerate() {
            let at = out.len();
            self.read_header(out, req, i + 1 == n, off, l, data);
            if data {
                if let Err(e) = self.export.disk.read_at(out.grow(l as usize), off) {
                    return self.read_failed(out, req, at, off, l, &e);
                }
            }
        }
    }

    /// The runs a read reply is made of (`(offset, length, is_data)`): the whole
    /// range as data for simple replies and `NBD_CMD_FLAG_DF`, else data and holes
    /// as block status finds them (one zero-length data run for an empty read).
    fn read_runs(&self, req: &Request) -> Vec<(u64, u64, bool)> {
        let whole = vec![(req.offset, u64::from(req.length), true)];
        if !self.structured || req.length == 0 || req.flags & CMD_FLAG_DF != 0 {
            return whole;
        }
        match self
            .export
            .disk
            .block_status(req.offset, u64::from(req.length))
        {
            Ok(ext) => read_runs(&ext, req.offset, u64::from(req.length)),
            Err(_) => whole,
        }
    }

    /// Appends what goes before the data of one run of a read reply: the simple
    /// reply's header, or a data chunk's header and offset, or a whole hole chunk.
    fn read_header(
        &self,
        out: &mut ReplyBuf,
        req: &Request,
        last: bool,
        off: u64,
        l: u64,
        data: bool,
    ) {
        if !self.structured {
            out.extend(SimpleReply::new(req.cookie, 0).as_bytes());
            return;
        }
        let flags = if last { REPLY_FLAG_DONE } else { 0 };
        if l == 0 {
            out.extend(ChunkHeader::new(req.cookie, REPLY_TYPE_NONE, flags, 0).as_bytes());
        } else if data {
            out.extend(
                ChunkHeader::new(req.cookie, REPLY_TYPE_OFFSET_DATA, flags, 8 + l as u32)
                    .as_bytes(),
            );
            out.extend(&off.to_be_bytes());
        } else {
            out.extend(ChunkHeader::new(req.cookie, REPLY_TYPE_OFFSET_HOLE, flags, 12).as_bytes());
            let h = HolePayload {
                offset: off.into(),
                length: (l as u32).into(),
            };
            out.extend(h.as_bytes());
        }
    }

    /// Replaces the run that starts at `at` in `out` (its header, not yet sent) with
    /// the error reply for a read that failed there.
    fn read_failed(
        &self,
        out: &mut ReplyBuf,
        req: &Request,
        at: usize,
        off: u64,
        l: u64,
        e: &qcowx_core::Error,
    ) {
        out.truncate(at);
        if !self.structured {
            return self.image_error(out, req, e, false);
        }
        eprintln!(
            "qcowx-nbd: {}: READ offset {off} length {l} failed: {e}",
            self.label
        );
        Self::push_error_chunk(
            out,
            req.cookie,
            nbd_errno(e, false),
            &e.to_string(),
            Some(off),
        );
    }

    fn block_status(&self, req: &Request, out: &mut ReplyBuf) {
        let len = u64::from(req.length).min(MAX_STATUS_QUERY);
        let disk = &self.export.disk;
        let needs_extents = self
            .contexts
            .iter()
            .any(|c| !matches!(c, MetaContext::DirtyBitmap(_)));
        let extents = if needs_extents {
            match disk.block_status(req.offset, len) {
                Ok(e) => e,
                Err(e) => return self.image_error(out, req, &e, false),
            }
        } else {
            Vec::new()
        };
        let min = u64::from(self.settings.min_block_size);
        let start = out.len();
        let n = self.contexts.len();
        for (i, ctx) in self.contexts.iter().enumerate() {
            let mut descs = match ctx {
                MetaContext::DirtyBitmap(snap) => {
                    match disk.image().diff(snap, &self.export.info.root) {
                        Ok(ranges) => dirty_descriptors(&ranges, req.offset, len),
                        Err(e) => {
                            out.truncate(start);
                            return self.image_error(out, req, &e, false);
                        }
                    }
                }
                _ => descriptors(&extents, req.offset, len, ctx),
            };
            if min > 1 {
                descs = align_descriptors(descs, req.offset, min, self.export.size, ctx);
            }
            if req.flags & CMD_FLAG_REQ_ONE != 0 {
                descs.truncate(1);
            }
            descs.truncate(MAX_DESCRIPTORS);
            let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
            let plen = 4 + 8 * descs.len();
            out.extend(
                ChunkHeader::new(req.cookie, REPLY_TYPE_BLOCK_STATUS, flags, plen as u32)
                    .as_bytes(),
            );
            out.extend(&context_id(i).to_be_bytes());
            for (l, status) in descs {
                let d = BlockDescriptor {
                    length: (l as u32).into(),
                    status: status.into(),
                };
                out.extend(d.as_bytes());
            }
        }
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

/// Splits `[offset, offset+len)` into data runs and hole runs (`(offset, length,
/// is_data)`) from the extents of the range. Anything the extents do not describe
/// is data.
fn read_runs(extents: &[Extent], offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = offset + len;
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |start: u64, stop: u64, data: bool| {
        if stop <= start {
            return;
        }
        match runs.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == start => last.1 += stop - start,
            _ => runs.push((start, stop - start, data)),
        }
    };
    let mut pos = offset;
    for e in extents {
        let s = e.offset.max(pos);
        let t = (e.offset + e.length).min(end);
        if t <= s {
            continue;
        }
        push(pos, s, true);
        let data = e.status == ExtentStatus::Data;
        push(s, t, data);
        pos = t;
    }
    push(pos, end, true);
    runs
}

/// The status value of an extent in an allocation context.
fn status_of(e: &Extent, ctx: &MetaContext) -> u32 {
    match ctx {
        MetaContext::BaseAllocation => match e.status {
            ExtentStatus::Data => 0,
            ExtentStatus::Zero | ExtentStatus::Unallocated => STATE_HOLE | STATE_ZERO,
        },
        MetaContext::AllocationDepth => match e.status {
            ExtentStatus::Unallocated => 0,
            ExtentStatus::Data | ExtentStatus::Zero => e.depth + 1,
        },
        // Computed from the tree diff, never from extents.
        MetaContext::DirtyBitmap(_) => 1,
    }
}

/// `qemu:dirty-bitmap:` descriptors for `[offset, offset+len)`: status 1 (dirty)
/// inside `ranges`, 0 elsewhere.
fn dirty_descriptors(ranges: &[qcowx_core::Range], offset: u64, len: u64) -> Vec<(u64, u32)> {
    let end = offset + len;
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut push = |l: u64, st: u32| {
        if l == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.1 == st => last.0 += l,
            _ => out.push((l, st)),
        }
    };
    let mut pos = offset;
    for r in ranges {
        let s = r.offset.max(pos);
        let t = (r.offset + r.length).min(end);
        if t <= s {
            continue;
        }
        push(s - pos, 0);
        push(t - s, 1);
        pos = t;
    }
    push(end - pos, 0);
    out
}

/// Block status descriptors `(length, status)` for `[offset, offset+len)`, merged
/// where the status repeats. Gaps in the extents are reported as status 0 / depth 1
/// (the safe answer).
fn descriptors(extents: &[Extent], offset: u64, len: u64, ctx: &MetaContext) -> Vec<(u64, u32)> {
    let end = offset + len;
    let gap = match ctx {
        MetaContext::BaseAllocation => 0,
        MetaContext::AllocationDepth | MetaContext::DirtyBitmap(_) => 1,
    };
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut push = |l: u64, st: u32| {
        if l == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.1 == st => last.0 += l,
            _ => out.push((l, st)),
        }
    };
    let mut pos = offset;
    for e in extents {
        let s = e.offset.max(pos);
        let t = (e.offset + e.length).min(end);
        if t <= s {
            continue;
        }
        push(s - pos, gap);
        push(t - s, status_of(e, ctx));
        pos = t;
    }
    push(end - pos, gap);
    out
}

/// Merges descriptors so every boundary lies on a multiple of `min` (or at the end of
/// the export), as the protocol requires when a minimum block size is advertised.
/// Merged hole/zero flags keep only what both sides have, merged depths the deepest,
/// merged dirty flags are dirty if either side is.
fn align_descriptors(
    descs: Vec<(u64, u32)>,
    offset: u64,
    min: u64,
    size: u64,
    ctx: &MetaContext,
) -> Vec<(u64, u32)> {
    let combine = |a: u32, b: u32| match ctx {
        MetaContext::BaseAllocation => a & b,
        MetaContext::AllocationDepth => a.max(b),
        MetaContext::DirtyBitmap(_) => a | b,
    };
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut pos = offset;
    let mut pending: Option<(u64, u32)> = None;
    for (l, st) in descs {
        let cur = match pending.take() {
            Some((pl, pst)) => (pl + l, combine(pst, st)),
            None => (l, st),
        };
        let end = pos + cur.0;
        if end.is_multiple_of(min) || end == size {
            match out.last_mut() {
                Some(last) if last.1 == cur.1 => last.0 += cur.0,
                _ => out.push(cur),
            }
            pos = end;
        } else {
            pending = Some(cur);
        }
    }
    if let Some(p) = pending {
        // The tail of a reduced-length query: drop the unaligned remainder unless it
        // is all there is.
        let keep = p.0 - (pos + p.0) % min;
        if keep > 0 {
            out.push((keep, p.1));
        } else if out.is_empty() {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, status: ExtentStatus, depth: u32) -> Extent {
        Extent {
            offset,
            length,
            status,
            depth,
            host_offset: None,
        }
    }

    #[test]
    fn read_runs_split_data_and_holes() {
        let e = [
            ext(0, 65536, ExtentStatus::Data, 0),
            ext(65536, 65536, ExtentStatus::Unallocated, 0),
            ext(131072, 65536, ExtentStatus::Zero, 0),
            ext(196608, 65536, ExtentStatus::Data, 0),
        ];
        let r = read_runs(&e, 1000, 200_000);
        assert_eq!(
            r,
            vec![
                (1000, 64536, true),
                (65536, 131072, false),
                (196608, 1000 + 200_000 - 196608, true)
            ]
        );
        // Nothing described: one data run.
        assert_eq!(read_runs(&[], 5, 10), vec![(5, 10, true)]);
    }

    #[test]
    fn descriptors_merge_and_map_contexts() {
        let e = [
            ext(0, 4096, ExtentStatus::Data, 0),
            ext(4096, 4096, ExtentStatus::Data, 1),
            ext(8192, 4096, ExtentStatus::Zero, 0),
            ext(12288, 4096, ExtentStatus::Unallocated, 1),
        ];
        assert_eq!(
            descriptors(&e, 0, 16384, &MetaContext::BaseAllocation),
            vec![(8192, 0), (8192, STATE_HOLE | STATE_ZERO)]
        );
        assert_eq!(
            descriptors(&e, 0, 16384, &MetaContext::AllocationDepth),
            vec![(4096, 1), (4096, 2), (4096, 1), (4096, 0)]
        );
    }

    #[test]
    fn descriptors_align_to_the_minimum_block_size() {
        let d = vec![(512, 0), (3584, 3), (4096, 3)];
        assert_eq!(
            align_descriptors(d, 0, 4096, 1 << 20, &MetaContext::BaseAllocation),
            vec![(4096, 0), (4096, 3)]
        );
        let d = vec![(4096, 3), (100, 0)];
        assert_eq!(
            align_descriptors(d, 0, 4096, 4196, &MetaContext::BaseAllocation),
            vec![(4096, 3), (100, 0)]
        );
    }

    #[test]
    fn dirty_descriptors_mark_changed_ranges() {
        let r = [
            qcowx_core::Range {
                offset: 65536,
                length: 65536,
            },
            qcowx_core::Range {
                offset: 262144,
                length: 131072,
            },
        ];
        assert_eq!(
            dirty_descriptors(&r, 0, 524288),
            vec![
                (65536, 0),
                (65536, 1),
                (131072, 0),
                (131072, 1),
                (131072, 0)
            ]
        );
        assert_eq!(dirty_descriptors(&r, 300000, 1000), vec![(1000, 1)]);
        assert_eq!(dirty_descriptors(&[], 5, 10), vec![(10, 0)]);
    }

    /// The default export of a new in-memory image of `size` bytes, negotiated with
    /// simple replies.
    fn memory_export(size: u64) -> Negotiated {
        use crate::exports::{ExportPlan, Exports};
        use qcowx_core::storage::MemStorage;
        use qcowx_core::{CreateOptions, Image};
        use std::sync::Arc;

        let image = Image::create_in(Arc::new(MemStorage::new()), &CreateOptions::new(size))
            .expect("create");
        let plan = ExportPlan::Auto {
            main_name: "default".into(),
            main_description: None,
        };
        let exports = Exports::new(Arc::new(image), plan, false).expect("exports");
        let info = exports.find("default").expect("find").expect("default");
        Negotiated {
            export: exports.open(&info).expect("open"),
            flags: 0,
            structured: false,
            contexts: Vec::new(),
        }
    }

    fn request(out: &mut Vec<u8>, command: u16, cookie: u64, offset: u64, len: u32) {
        let h = RequestHeader {
            magic: REQUEST_MAGIC.into(),
            flags: 0.into(),
            command: command.into(),
            cookie: cookie.into(),
            offset: offset.into(),
            length: len.into(),
        };
        out.extend_from_slice(h.as_bytes());
    }

    /// Small requests (run on the reader thread, replies sent in batches) and large
    /// ones (run by the workers), pipelined in one stream: every request gets exactly
    /// one reply, a read pipelined behind a write of the same range sees all of it or
    /// none of it (NBD does not order requests in flight; small requests go to the
    /// workers too when the machine is slow), and every write lands.
    #[test]
    fn reader_and_worker_requests_interleave() {
        use std::collections::HashMap;

        let n = memory_export(4 << 20);
        let settings = Settings::default();
        let big = INLINE_MAX * 4;
        let mut input = Vec::new();
        // cookie -> bytes a successful reply carries after its 16-byte header, and
        // the byte they must all hold.
        let mut expect: HashMap<u64, (usize, u8)> = HashMap::new();
        for i in 0..40u64 {
            let small_at = i * 4096;
            let big_at = (1 << 20) + (i % 8) * u64::from(big);
            let b = i as u8 + 1;
            request(&mut input, CMD_WRITE, 4 * i, small_at, 4096);
            input.resize(input.len() + 4096, b);
            expect.insert(4 * i, (0, 0));
            request(&mut input, CMD_WRITE, 4 * i + 1, big_at, big);
            input.resize(input.len() + big as usize, 0xee);
            expect.insert(4 * i + 1, (0, 0));
            request(&mut input, CMD_READ, 4 * i + 2, small_at, 4096);
            expect.insert(4 * i + 2, (4096, b));
            request(&mut input, CMD_FLUSH, 4 * i + 3, 0, 0);
            expect.insert(4 * i + 3, (0, 0));
        }
        let mut replies = Vec::new();
        serve(&input[..], &mut replies, &n, &settings, &|| {}, "test").expect("serve");
        let mut rest = &replies[..];
        while !rest.is_empty() {
            let r = SimpleReply::read_from_bytes(&rest[..16]).expect("reply header");
            assert_eq!(r.magic.get(), SIMPLE_REPLY_MAGIC);
            assert_eq!(r.error.get(), 0, "cookie {}", r.cookie.get());
            let (len, byte) = expect
                .remove(&r.cookie.get())
                .unwrap_or_else(|| panic!("unexpected reply for cookie {}", r.cookie.get()));
            let data = &rest[16..16 + len];
            assert!(
                data.iter().all(|&x| x == byte) || data.iter().all(|&x| x == 0),
                "cookie {}: a torn read",
                r.cookie.get()
            );
            rest = &rest[16 + len..];
        }
        assert!(expect.is_empty(), "no reply for {:?}", expect.keys());
        for i in 0..40u64 {
            let mut small = vec![0u8; 4096];
            n.export
                .disk
                .read_at(&mut small, i * 4096)
                .expect("read back");
            assert!(small.iter().all(|&x| x == i as u8 + 1), "small write {i}");
        }
        let mut buf = vec![0u8; big as usize];
        n.export.disk.read_at(&mut buf, 1 << 20).expect("read back");
        assert!(buf.iter().all(|&x| x == 0xee));
    }

    /// A peer that records the length of every write.
    #[derive(Default)]
    struct Writes(Vec<usize>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.push(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl ReplyWriter for Writes {}

    /// Replies to small pipelined requests go out every [`REPLY_EVERY`] requests, not
    /// only when the input buffer runs dry.
    #[test]
    fn replies_to_pipelined_small_writes_go_out_in_groups() {
        let n = memory_export(4 << 20);
        let mut input = Vec::new();
        let count = 4 * REPLY_EVERY as u64;
        for i in 0..count {
            request(&mut input, CMD_WRITE, i, i * 4096, 4096);
            input.resize(input.len() + 4096, i as u8);
        }
        assert!(input.len() <= INPUT_BUFFER, "all of it in one socket read");
        let mut writes = Writes::default();
        let settings = Settings::default();
        serve(&input[..], &mut writes, &n, &settings, &|| {}, "test").expect("serve");
        // Simple replies, 16 bytes each, REPLY_EVERY to a write.
        assert_eq!(writes.0, vec![16 * REPLY_EVERY; 4], "{:?}", writes.0);
        let mut back = vec![0u8; 4096];
        n.export
            .disk
            .read_at(&mut back, (count - 1) * 4096)
            .expect("read back");
        assert!(back.iter().all(|&b| b == (count - 1) as u8));
    }

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
    /// pieces come within [`PAYLOAD_SPIN`]; past it the reader sleeps in a read.
    #[test]
    fn payload_pieces_are_polled_for_before_the_reader_sleeps() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let pieces = |k: usize| data.chunks(k).map(<[u8]>::to_vec).collect::<Vec<_>>();
        // Quick pieces: never a blocking read.
        let mut input = Input::new(Trickle {
            pieces: pieces(70_000),
            gaps: 3,
            polls: 0,
            blocking_reads: 0,
            poll_cost: Duration::ZERO,
        });
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

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 10000]));
        let mut b = vec![0u8; 10000];
        b[9999] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }
}
