//! The worker pool of a connection: the threads that run requests the reader hands
//! them, the budget that bounds the requests and payload bytes in flight, and the
//! write payload buffers kept for reuse.

use std::sync::mpsc::Receiver;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use qcowx_core::storage::IoBuf;

use super::dispatch::INLINE_MAX;
use super::reply::ReplyBuf;
use super::{Conn, Request};
use crate::socket::ReplyWriter;
use crate::wire::*;

/// The most write payload bytes kept for reuse per connection.
const POOL_BYTES: usize = 64 << 20;

/// Limits the requests and payload bytes in flight on one connection.
pub(super) struct Budget {
    state: Mutex<(usize, usize)>,
    cv: Condvar,
    max_count: usize,
    max_bytes: usize,
}

impl Budget {
    /// A budget of `max_count` requests and `max_bytes` payload bytes.
    pub(super) fn new(max_count: usize, max_bytes: usize) -> Budget {
        Budget {
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
            max_count,
            max_bytes,
        }
    }

    pub(super) fn acquire(&self, bytes: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while st.0 >= self.max_count || (st.0 > 0 && st.1 + bytes > self.max_bytes) {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.0 += 1;
        st.1 += bytes;
    }

    pub(super) fn release(&self, bytes: usize) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(1);
        st.1 = st.1.saturating_sub(bytes);
        // Only the reader ever waits here.
        self.cv.notify_one();
    }
}

impl<W: ReplyWriter> Conn<'_, W> {
    /// A buffer of `len` bytes for a write payload, reused when one is free; page-aligned
    /// (see [`IoBuf`]), as the kernel copies the payload into it.
    pub(super) fn take_buffer(&self, len: usize) -> IoBuf {
        let mut buf = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            match pool.0.pop() {
                Some(b) => {
                    pool.1 -= b.capacity();
                    b
                }
                None => qcowx_core::storage::io_buf(0),
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
    pub(super) fn return_buffer(&self, buf: IoBuf) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.1 + buf.capacity() <= POOL_BYTES && pool.0.len() < self.settings.max_in_flight {
            pool.1 += buf.capacity();
            pool.0.push(buf);
        }
    }

    pub(super) fn work(&self, rx: &Mutex<Receiver<Request>>) {
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
                self.note_small(t0);
            }
            if let Some(buf) = payload {
                self.return_buffer(buf);
            }
            self.send(&mut out);
            self.budget.release(cost);
        }
    }
}
