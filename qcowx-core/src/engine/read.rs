//! Reads: a request is planned into pieces (data, zeros, backing, compressed) under the state lock, then read outside it.

use std::io::IoSlice;
use std::sync::RwLockReadGuard;

use crate::error::{Error, Result};
use crate::format::addr::{GuestOffset, HostOffset};
use crate::format::compress::decompress_cluster;
use crate::format::tables::{for_each_piece, ClusterKind, Source};
use crate::storage::{self, Storage};
use crate::ExtentStatus;

use super::image::*;

/// Zeros lent by [`Image::read_mapped`] for clusters that read as zeros.
pub(super) static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// A piece of a request: `len` guest bytes at `guest` come from `src`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Piece {
    pub(super) guest: u64,
    pub(super) len: u64,
    pub(super) src: Source,
}

pub(super) fn push_piece(out: &mut Vec<Piece>, p: Piece) {
    if let Some(last) = out.last_mut() {
        let merge = match (last.src, p.src) {
            (Source::Host(a), Source::Host(b)) => a + last.len == b,
            (Source::Zero, Source::Zero) | (Source::Backing, Source::Backing) => true,
            _ => false,
        };
        if merge && last.guest + last.len == p.guest {
            last.len += p.len;
            return;
        }
    }
    out.push(p);
}

impl Image {
    /// Splits `[offset, offset+len)` into pieces by source, merging neighbours.
    ///
    /// The cost follows the tables the range reaches, not its length: the span of an
    /// L1 entry with no L2 table (512 MiB with 64 KiB clusters) is one piece, found
    /// without a look at its clusters, so planning a mostly empty 64 TiB disk reads
    /// only its L1 table.
    pub(super) fn plan(
        &self,
        st: &mut State,
        root: RootId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Piece>> {
        let cs = self.geo.cluster_size();
        let span = self.geo.bytes_per_l1_entry();
        let mut out: Vec<Piece> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let (l1i, first) = self.geo.split(GuestOffset::new(pos));
            // The part of the range this L1 entry covers.
            let stop = end.min((pos / span + 1) * span);
            let Some(l2_off) = self.l1_entry(st, root, l1i)?.l2_offset() else {
                push_piece(
                    &mut out,
                    Piece {
                        guest: pos,
                        len: stop - pos,
                        src: Source::Backing,
                    },
                );
                pos = stop;
                continue;
            };
            // Every cluster of it from one look at the L2 table.
            let count = ((stop - 1) / cs - pos / cs + 1) as usize;
            let mut g = pos;
            self.l2_kinds(st, l2_off, first, count, |kind, _| {
                let in_off = g % cs;
                let n = (cs - in_off).min(stop - g);
                for_each_piece(&self.geo, kind, in_off, n, |plen, src| {
                    push_piece(
                        &mut out,
                        Piece {
                            guest: g,
                            len: plen,
                            src,
                        },
                    );
                    g += plen;
                });
            })?;
            pos = stop;
        }
        Ok(out)
    }

    /// Starts reading the host bytes behind `[offset, offset+len)` of `root` into the
    /// page cache in the background (the data clusters here, compressed ones
    /// included; the backing chain's through its layers) and returns at once. Only
    /// the metadata lookup is synchronous: L2 tables the range needs are read now.
    pub(crate) fn prefetch_root(&self, root: RootId, offset: u64, len: u64) -> Result<()> {
        let pieces = {
            let mut st = self.lock_state()?;
            self.check_range(&st, root, offset, len)?;
            self.plan(&mut st, root, offset, len)?
        };
        // Runs of host bytes that follow each other are one hint.
        let mut run: Option<(u64, u64)> = None;
        for p in &pieces {
            let host = match p.src {
                Source::Host(h) => Some((h.get(), p.len)),
                Source::Compressed { offset, len, .. } => Some((offset.get(), len)),
                Source::Backing => {
                    if let Some(b) = &self.backing {
                        b.prefetch_layer(p.guest, p.len)?;
                    }
                    None
                }
                Source::Zero => None,
            };
            if let Some((h, l)) = host {
                run = match run {
                    Some((s, e)) if e == h => Some((s, h + l)),
                    Some((s, e)) => {
                        self.storage.will_need(s, e - s);
                        Some((h, h + l))
                    }
                    None => Some((h, h + l)),
                };
            }
        }
        if let Some((s, e)) = run {
            self.storage.will_need(s, e - s);
        }
        Ok(())
    }

    pub(super) fn read_backing(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        match &self.backing {
            Some(b) => b.read_layer(buf, guest),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    pub(super) fn read_compressed(&self, offset: HostOffset, len: u64) -> Result<Vec<u8>> {
        let offset = offset.get();
        let cs = self.geo.cluster_size();
        let file_len = self
            .storage
            .len()
            .map_err(|e| self.io_err("stat", 0u64, e))?;
        if offset >= file_len {
            return Err(self.corrupt(
                "compressed cluster",
                offset,
                "compressed data starts past the end of the file",
            ));
        }
        let avail = len.min(file_len - offset).min(2 * cs);
        let mut input = vec![0u8; avail as usize];
        self.storage
            .read_at(&mut input, offset)
            .map_err(|e| self.io_err("read compressed cluster", offset, e))?;
        let mut out = vec![0u8; cs as usize];
        decompress_cluster(self.compression, &input, &mut out).map_err(|source| {
            Error::Compressed {
                file: self.name.clone(),
                offset,
                source,
            }
        })?;
        Ok(out)
    }

    pub(super) fn read_pieces(&self, pieces: &[Piece], base: u64, buf: &mut [u8]) -> Result<()> {
        for p in pieces {
            let at = (p.guest - base) as usize;
            let dst = &mut buf[at..at + p.len as usize];
            match p.src {
                Source::Host(h) => self
                    .storage
                    .read_at(dst, h.get())
                    .map_err(|e| self.io_err("read data", h, e))?,
                Source::Zero => dst.fill(0),
                Source::Backing => self.read_backing(dst, p.guest)?,
                Source::Compressed { offset, len, at } => {
                    let cluster = self.read_compressed(offset, len)?;
                    dst.copy_from_slice(&cluster[at as usize..at as usize + dst.len()]);
                }
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `at` inside the guest cluster at `cg`
    /// (cluster-aligned), whose entry says `kind`.
    pub(super) fn read_cluster_range(
        &self,
        kind: ClusterKind,
        cg: GuestOffset,
        at: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let base = cg.get() + at;
        let mut pieces = Vec::new();
        let mut g = base;
        for_each_piece(&self.geo, kind, at, buf.len() as u64, |plen, src| {
            pieces.push(Piece {
                guest: g,
                len: plen,
                src,
            });
            g += plen;
        });
        self.read_pieces(&pieces, base, buf)
    }

    /// Reads `buf.len()` bytes of the disk at `offset`.
    ///
    /// Unwritten ranges read as zeros; a read past the end of the disk is refused.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Error, Image};
    ///
    /// # fn main() -> Result<(), Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(b"abc", 10)?;
    /// let mut buf = [0xffu8; 16];
    /// img.read_at(&mut buf, 0)?;
    /// assert_eq!(&buf[..13], b"\0\0\0\0\0\0\0\0\0\0abc");
    /// assert!(matches!(img.read_at(&mut buf, (1 << 20) - 8), Err(Error::OutOfRange { .. })));
    /// # Ok(()) }
    /// ```
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_root(DEFAULT_ROOT, buf, offset)
    }

    /// A hint that `[offset, offset+len)` of the disk will be read soon: the host
    /// bytes behind it (this file's clusters and the backing chain's) start coming
    /// into the page cache in the background, and the call returns once the
    /// metadata lookup is done. A reader that names what it will read next keeps the
    /// device busy with many reads at once instead of waiting for each (`qcowx send`
    /// does, and the NBD server for `NBD_CMD_CACHE`). Changes nothing a read returns.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[7; 4096], 0)?;
    /// img.prefetch(0, 1 << 20)?;
    /// let mut buf = [0u8; 4096];
    /// img.read_at(&mut buf, 0)?;
    /// assert_eq!(buf, [7; 4096]);
    /// assert!(img.prefetch(0, 2 << 20).is_err()); // past the end, as a read
    /// # Ok(()) }
    /// ```
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.prefetch_root(DEFAULT_ROOT, offset, len)
    }

    /// The pieces of a read of `[offset, offset+len)` of `root`, planned under the
    /// state lock, and the I/O gate that keeps their clusters from being freed until
    /// the caller has read them (taken before the state lock is let go).
    fn plan_read(
        &self,
        root: RootId,
        offset: u64,
        len: u64,
    ) -> Result<(Vec<Piece>, RwLockReadGuard<'_, ()>)> {
        let mut st = self.lock_state()?;
        self.check_range(&st, root, offset, len)?;
        let pieces = self.plan(&mut st, root, offset, len)?;
        Ok((pieces, self.gate_read()))
    }

    pub(crate) fn read_root(&self, root: RootId, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        let (pieces, _gate) = self.plan_read(root, offset, len)?;
        self.read_pieces(&pieces, offset, buf)
    }

    /// Reads as [`Image::read_root`] does, from one look at the tables, and calls
    /// `hole(offset, len)` for the parts that read as zeros with no data behind them
    /// (the `Zero` and `Unallocated` extents of a block status from the tables,
    /// [`crate::Disk::block_status_from_tables`]), in order and merged. A backing
    /// file's part is asked for its status only where this file leaves the range to
    /// it.
    pub(crate) fn read_root_sparse(
        &self,
        root: RootId,
        buf: &mut [u8],
        offset: u64,
        mut hole: impl FnMut(u64, u64),
    ) -> Result<()> {
        let len = buf.len() as u64;
        let (pieces, _gate) = self.plan_read(root, offset, len)?;
        self.read_pieces(&pieces, offset, buf)?;
        // The holes, merged across pieces: (start, end) of the one being gathered.
        let mut open: Option<(u64, u64)> = None;
        let mut add = |start: u64, n: u64| match open {
            Some((s, e)) if e == start => open = Some((s, e + n)),
            Some((s, e)) => {
                hole(s, e - s);
                open = Some((start, start + n));
            }
            None => open = Some((start, start + n)),
        };
        for p in &pieces {
            match (p.src, &self.backing) {
                (Source::Zero, _) | (Source::Backing, None) => add(p.guest, p.len),
                (Source::Backing, Some(b)) => {
                    for e in b.layer_status(p.guest, p.len)? {
                        if e.status != ExtentStatus::Data {
                            add(e.offset, e.length);
                        }
                    }
                }
                (Source::Host(_) | Source::Compressed { .. }, _) => {}
            }
        }
        if let Some((s, e)) = open {
            hole(s, e - s);
        }
        Ok(())
    }

    /// Reads `len` bytes of the disk at `offset` without copying them: `f` gets them,
    /// in order, as slices of the image file's mapping (and of a zero buffer where
    /// clusters read as zeros), while no cluster they come from can be freed, reused
    /// or cut off the file.
    ///
    /// Returns `Ok(None)` without calling `f` when the bytes cannot be lent cheaply:
    /// the storage cannot map its file, a cluster is compressed or comes from a
    /// backing file, or a page is not in the page cache (`f` would wait for the disk
    /// while holding up the image). [`Image::read_at`] reads those.
    ///
    /// `f` runs under the image's I/O gate, which cluster frees wait for: it must not
    /// call into this image, and must not wait long — a socket send has to be bounded
    /// by a deadline, not left to a peer that may never read.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[3; 4096], 0)?;
    /// // Count the 3s without copying; fall back to read_at when the bytes are not lent.
    /// let count = |slices: &[std::io::IoSlice<'_>]| {
    ///     slices.iter().map(|s| s.iter().filter(|&&b| b == 3).count()).sum::<usize>()
    /// };
    /// let n = match img.read_mapped(0, 8192, count)? {
    ///     Some(n) => n,
    ///     None => {
    ///         let mut buf = vec![0u8; 8192];
    ///         img.read_at(&mut buf, 0)?;
    ///         count(&[std::io::IoSlice::new(&buf)])
    ///     }
    /// };
    /// assert_eq!(n, 4096);
    /// # Ok(()) }
    /// ```
    pub fn read_mapped<R>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&[IoSlice<'_>]) -> R,
    ) -> Result<Option<R>> {
        self.read_root_mapped(DEFAULT_ROOT, offset, len, f)
    }

    pub(crate) fn read_root_mapped<R>(
        &self,
        root: RootId,
        offset: u64,
        len: u64,
        f: impl FnOnce(&[IoSlice<'_>]) -> R,
    ) -> Result<Option<R>> {
        let (pieces, _gate) = self.plan_read(root, offset, len)?;
        let mut end = 0u64;
        for p in &pieces {
            match p.src {
                Source::Host(h) => match h.get().checked_add(p.len) {
                    Some(e) => end = end.max(e),
                    None => return Ok(None),
                },
                Source::Zero => {}
                Source::Backing if self.backing.is_none() => {}
                Source::Backing | Source::Compressed { .. } => return Ok(None),
            }
        }
        let map = match end {
            0 => None,
            _ => match self.storage.mapping(end) {
                Some(m) => Some(m),
                None => return Ok(None),
            },
        };
        let mut slices = Vec::with_capacity(pieces.len());
        for p in &pieces {
            match (p.src, &map) {
                (Source::Host(h), Some(m)) => {
                    // Below `end`, which the mapping and the file both cover.
                    let (h, l) = (h.get() as usize, p.len as usize);
                    if !storage::resident(m, h, l) {
                        return Ok(None);
                    }
                    slices.push(IoSlice::new(&m[h..h + l]));
                }
                _ => {
                    let mut left = p.len as usize;
                    while left > 0 {
                        let n = left.min(ZEROS.len());
                        slices.push(IoSlice::new(&ZEROS[..n]));
                        left -= n;
                    }
                }
            }
        }
        let r = f(&slices);
        drop(slices);
        for p in &pieces {
            if let (Source::Host(h), Some(_)) = (p.src, &map) {
                self.storage.mapped_read(h.get(), p.len);
            }
        }
        Ok(Some(r))
    }
}
