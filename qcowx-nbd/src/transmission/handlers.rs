//! The command handlers: READ, WRITE, TRIM, WRITE_ZEROES, FLUSH, CACHE and
//! BLOCK_STATUS, each appending its whole reply to a [`ReplyBuf`].

use std::sync::atomic::Ordering;

use qcowx_core::ExtentStatus;
use zerocopy::IntoBytes;

use super::block_status::{
    align_descriptors, descriptors, dirty_descriptors, hole_runs, read_runs, status_query_limit,
    MAX_DESCRIPTORS, MAX_STATUS_QUERY,
};
use super::reply::ReplyBuf;
use super::{Conn, Request};
use crate::config::{DetectZeroes, DiscardMode};
use crate::error::nbd_errno;
use crate::handshake::{context_id, MetaContext};
use crate::socket::ReplyWriter;
use crate::wire::*;

/// Whether every byte is zero.
fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

impl<W: ReplyWriter> Conn<'_, W> {
    /// Makes what was written durable, unless the cache mode skips flushes.
    pub(super) fn make_durable(&self) -> qcowx_core::Result<()> {
        if self.settings.cache.skips_flush() {
            Ok(())
        } else {
            self.export.disk.flush()
        }
    }

    pub(super) fn flush(&self, req: &Request, out: &mut ReplyBuf) {
        match self.make_durable() {
            Ok(()) => Self::simple(out, req.cookie, 0),
            Err(e) => self.image_error(out, req, &e, true),
        }
    }

    /// A prefetch hint: looks the range up (warming the metadata cache) and starts
    /// reading its data into the page cache in the background. Failure changes
    /// nothing.
    pub(super) fn cache(&self, req: &Request, out: &mut ReplyBuf) {
        let _ = self
            .export
            .disk
            .prefetch(req.offset, u64::from(req.length).min(MAX_STATUS_QUERY));
        Self::simple(out, req.cookie, 0)
    }

    /// Makes a completed write durable if FUA (or write-through caching) asks for it.
    fn finish_write(&self, req: &Request, r: qcowx_core::Result<()>, out: &mut ReplyBuf) {
        if !self.wrote.load(Ordering::Relaxed) {
            self.wrote.store(true, Ordering::SeqCst);
        }
        let r = r.and_then(|_| {
            if req.flags & CMD_FLAG_FUA != 0 || self.settings.cache.write_through() {
                self.make_durable()
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => Self::simple(out, req.cookie, 0),
            Err(e) => self.image_error(out, req, &e, true),
        }
    }

    pub(super) fn write(&self, req: &Request, data: &[u8], out: &mut ReplyBuf) {
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

    pub(super) fn trim(&self, req: &Request, out: &mut ReplyBuf) {
        if self.settings.discard == DiscardMode::Ignore || req.length == 0 {
            return Self::simple(out, req.cookie, 0);
        }
        let r = self.export.disk.discard(req.offset, u64::from(req.length));
        self.finish_write(req, r, out)
    }

    pub(super) fn write_zeroes(&self, req: &Request, out: &mut ReplyBuf) {
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
                ext.iter().all(|x| {
                    matches!(
                        x.status,
                        ExtentStatus::Zero
                            | ExtentStatus::AllocatedZero
                            | ExtentStatus::Unallocated
                    )
                })
            })
        })
    }

    /// A read run here (small, or not lent from the mapping): one look at the tables
    /// finds the data and the holes ([`qcowx_core::Disk::read_sparse`]). The data goes
    /// straight into `out` behind the header of a single data run; only a read with
    /// holes in it is laid out again as data and hole chunks.
    pub(super) fn read(&self, req: &Request, out: &mut ReplyBuf) {
        let (off, len) = (req.offset, u64::from(req.length));
        if !self.sparse(req) {
            return self.read_into(req, &[(off, len, true)], out);
        }
        let at = out.len();
        self.read_header(out, req, true, off, len, true);
        let head = out.len() - at;
        let mut holes = Vec::new();
        let data = out.grow(len as usize);
        if let Err(e) = self
            .export
            .disk
            .read_sparse(data, off, |o, l| holes.push((o, l)))
        {
            return self.read_failed(out, req, at, off, len, &e);
        }
        if holes.is_empty() {
            return;
        }
        let data = out.bytes()[at + head..].to_vec();
        out.truncate(at);
        let runs = hole_runs(&holes, off, len);
        let n = runs.len();
        for (i, &(o, l, is_data)) in runs.iter().enumerate() {
            self.read_header(out, req, i + 1 == n, o, l, is_data);
            if is_data {
                let from = (o - off) as usize;
                out.extend(&data[from..from + l as usize]);
            }
        }
    }

    /// Whether a read reply may leave holes out: structured replies, no
    /// `NBD_CMD_FLAG_DF`, and something to read.
    fn sparse(&self, req: &Request) -> bool {
        self.structured && req.length > 0 && req.flags & CMD_FLAG_DF == 0
    }

    /// The reply to read `req`, made of `runs` (see [`Conn::read_runs`]), read with
    /// `read_at`.
    pub(super) fn read_into(&self, req: &Request, runs: &[(u64, u64, bool)], out: &mut ReplyBuf) {
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
    pub(super) fn read_runs(&self, req: &Request) -> Vec<(u64, u64, bool)> {
        let whole = vec![(req.offset, u64::from(req.length), true)];
        if !self.sparse(req) {
            return whole;
        }
        // From the tables alone: no lseek (and no wait on writes) per read.
        match self
            .export
            .disk
            .block_status_from_tables(req.offset, u64::from(req.length))
        {
            Ok(ext) => read_runs(&ext, req.offset, u64::from(req.length)),
            Err(_) => whole,
        }
    }

    /// Appends what goes before the data of one run of a read reply: the simple
    /// reply's header, or a data chunk's header and offset, or a whole hole chunk.
    pub(super) fn read_header(
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
    pub(super) fn read_failed(
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

    pub(super) fn block_status(&self, req: &Request, out: &mut ReplyBuf) {
        let disk = &self.export.disk;
        let limit = status_query_limit(disk.image().cluster_size());
        let len = u64::from(req.length).min(limit);
        let needs_extents = self.contexts.iter().any(|c| {
            !matches!(
                c,
                MetaContext::DirtyBitmap(_) | MetaContext::PersistentBitmap(_)
            )
        });
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
                MetaContext::PersistentBitmap(name) => {
                    match disk.image().bitmap_dirty_in(name, req.offset, len) {
                        Ok(ranges) => {
                            let ranges: Vec<qcowx_core::Range> = ranges
                                .into_iter()
                                .map(|(offset, length)| qcowx_core::Range { offset, length })
                                .collect();
                            dirty_descriptors(&ranges, req.offset, len)
                        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 10000]));
        let mut b = vec![0u8; 10000];
        b[9999] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }
}
