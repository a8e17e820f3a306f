//! The reader: parses requests from the input, runs small fast ones itself and hands
//! the others to the workers, and [`Conn::handle`], which checks a request and calls
//! its command's handler.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::time::Instant;

use super::input::Input;
use super::reply::{gathers_whole_input, ReplyBuf, REPLY_BATCH, REPLY_EVERY};
use super::{Conn, Request};
use crate::error::{Error, Result};
use crate::socket::{ReplyWriter, RequestStream};
use crate::wire::*;

/// An oversized write payload up to this many bytes is read and dropped (and the
/// request fails with `NBD_EINVAL`); a larger one closes the connection.
pub const MAX_SKIPPED_WRITE: u32 = 256 << 20;

/// Reads and writes up to this many bytes may run on the reader thread itself.
pub const INLINE_MAX: u32 = 64 << 10;

/// The size of the fixed request header.
const HEADER: usize = std::mem::size_of::<RequestHeader>();

impl<W: ReplyWriter> Conn<'_, W> {
    pub(super) fn read_requests<R: RequestStream>(
        &self,
        mut input: Input<R>,
        tx: &SyncSender<Request>,
    ) -> Result<()> {
        let mut out = ReplyBuf::default();
        let r = self.read_loop(&mut input, tx, &mut out);
        // Replies to requests already run go out whatever ended the loop.
        self.send(&mut out);
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
        // Replies gathered before a write: REPLY_EVERY, or all while every core is busy.
        let mut every = REPLY_EVERY;
        loop {
            if self.dead.load(Ordering::SeqCst) {
                return Ok(());
            }
            if input.available() < HEADER {
                // Nothing more to run before the next socket read, which may block:
                // answer what was run so far.
                self.send(out);
                if !input
                    .fill(HEADER)
                    .map_err(|e| Error::io("read request", e))?
                {
                    return Ok(());
                }
            }
            let h: RequestHeader = read_header(input.peek(HEADER)).map_err(Error::Protocol)?;
            input.consume(HEADER);
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
                    self.send(out);
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
                    every = if gathers_whole_input(self.serving.load(Ordering::Relaxed)) {
                        usize::MAX
                    } else {
                        REPLY_EVERY
                    };
                }
                let t0 = Instant::now();
                self.handle(&req, input.peek(len), out);
                self.note_small(t0);
                input.consume(len);
                gathered += 1;
                if out.len() >= REPLY_BATCH || gathered >= every {
                    self.send(out);
                }
                continue;
            }
            // To the workers. What was run here is answered first: the budget or the
            // queue may make this thread wait.
            self.send(out);
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
            && self.small_ns.load(Ordering::Relaxed)
                < self
                    .settings
                    .inline_limit
                    .as_nanos()
                    .min(u128::from(u64::MAX)) as u64
    }

    /// Folds the service time of one small read or write, begun at `t0`, into the
    /// running average (weight 1/8). The time the storage spent splitting page-cache
    /// folios under a write is left out ([`qcowx_core::storage::take_split_time`]):
    /// a one-off cost per stretch of the image, not a sign that the disk is being
    /// waited for. Counted in, the first pass of small overwrites over a copied
    /// image went to the workers (fio, 4 KiB random overwrites at QD 16, a fresh
    /// `cp` copy each run, 3 alternations: 108–121k IOPS at 8.3–9.3 µs of server
    /// CPU each, against 113–129k at 7.6–8.4 µs with every small request inline).
    pub(super) fn note_small(&self, t0: Instant) {
        let took = t0
            .elapsed()
            .saturating_sub(qcowx_core::storage::take_split_time());
        let ns = took.as_nanos().min(u128::from(u32::MAX)) as u64;
        let old = self.small_ns.load(Ordering::Relaxed);
        let new = old - old / 8 + ns / 8;
        self.small_ns.store(new, Ordering::Relaxed);
    }

    /// Runs `req` (with `payload` for a write) and appends its whole reply to `out`.
    pub(super) fn handle(&self, req: &Request, payload: &[u8], out: &mut ReplyBuf) {
        if let Err((errno, msg)) = self.check(req) {
            return self.error(out, req, errno, &msg);
        }
        match req.command {
            CMD_READ => self.read(req, out),
            CMD_WRITE => self.write(req, payload, out),
            CMD_FLUSH => self.flush(req, out),
            CMD_TRIM => self.trim(req, out),
            CMD_CACHE => self.cache(req, out),
            CMD_WRITE_ZEROES => self.write_zeroes(req, out),
            CMD_BLOCK_STATUS => self.block_status(req, out),
            _ => self.error(out, req, EINVAL, "unknown command"),
        }
    }
}
