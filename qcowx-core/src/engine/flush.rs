//! Flush ordering and close: data durable before the links that reach it, links before the header that commits them.

use crate::engine::alloc::runs;
use crate::error::Result;
use crate::format::extensions::EXT_FEATURE_NAMES;
use crate::format::header::Incompatible;
use crate::format::stamp::{self, EXT_CLEAN_STAMP};
use crate::format::tables::encode_words;
use crate::storage::Storage;

use super::image::*;

impl Image {
    /// Sets the header's dirty bit durably before the first change that makes the
    /// refcounts stale.
    pub(crate) fn mark_stale(&self, st: &mut State) -> Result<()> {
        if st.stale {
            return Ok(());
        }
        st.header.incompatible |= Incompatible::DIRTY;
        self.write_header_fields(st)?;
        self.sync()?;
        st.stale = true;
        Ok(())
    }

    /// Writes the clean-close stamp of the state as it is now (see
    /// [`crate::format::stamp`]), before the header write that clears the dirty bit.
    /// In place when the image has one; else the header area is rewritten with one
    /// added (without the informative feature name table if that is what it takes),
    /// but only when the area fits in one sector (a single-sector write cannot be
    /// torn) — otherwise the image goes without, and its writable opens scan.
    pub(crate) fn write_clean_stamp(&self, st: &mut State) -> Result<()> {
        if st.header.version < 3 {
            return Ok(());
        }
        let l1 = &self.root(st, DEFAULT_ROOT)?.l1;
        let ext = stamp::extension(stamp::compute(&st.header, l1, st.registry.entries()));
        let existing = st.header.extensions.get(EXT_CLEAN_STAMP);
        if existing == Some(&ext) {
            return Ok(());
        }
        if let (Some(old), Some(at)) = (existing, st.header.extension_data_offset(EXT_CLEAN_STAMP))
        {
            if old.data.len() == ext.data.len() {
                self.storage
                    .write_at(&ext.data, at)
                    .map_err(|e| self.io_err("write clean stamp", at, e))?;
                st.header.extensions.set(ext);
                return Ok(());
            }
        }
        let mut h = st.header.clone();
        h.extensions.remove(EXT_CLEAN_STAMP);
        h.extensions.set(ext);
        h.layout_backing();
        if h.area_bytes().is_none_or(|a| a.len() > 512) {
            // The feature name table is informative (QEMU rewrites it whenever it
            // updates the header): leave it out rather than write more than a sector.
            // QEMU's own header area is exactly one sector with it.
            h.extensions.remove(EXT_FEATURE_NAMES);
            h.layout_backing();
        }
        let Some(area) = h.area_bytes().filter(|a| a.len() <= 512) else {
            return Ok(());
        };
        self.storage
            .write_at(&area, 0)
            .map_err(|e| self.io_err("write header", 0u64, e))?;
        st.header = h;
        Ok(())
    }

    /// Whether the image carries a clean-close stamp that matches it: qcowx closed it
    /// cleanly and nothing that matters changed since (see [`crate::format::stamp`]).
    pub(crate) fn stamp_matches(&self, st: &State) -> bool {
        let Some(crc) = st
            .header
            .extensions
            .get(EXT_CLEAN_STAMP)
            .and_then(stamp::read)
        else {
            return false;
        };
        !st.header.incompatible.contains(Incompatible::DIRTY)
            && st
                .roots
                .get(&DEFAULT_ROOT)
                .is_some_and(|r| stamp::compute(&st.header, &r.l1, st.registry.entries()) == crc)
    }

    /// Writes the fixed header fields (one sector).
    pub(crate) fn write_header_fields(&self, st: &State) -> Result<()> {
        let bytes = st.header.commit_bytes();
        self.storage
            .write_at(&bytes, 0)
            .map_err(|e| self.io_err("write header", 0u64, e))
    }

    /// Makes every completed write durable, then writes metadata links in dependency
    /// order: data and new tables first, then the L2 tables that link to data, then the
    /// L1 entries that link to tables, with an fdatasync between each level.
    ///
    /// A write that has returned is durable once `flush` returns: a crash after it loses
    /// nothing, and the next open finds the data (rebuilding refcounts if the image was not
    /// closed).
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(b"durable", 0)?;
    /// img.flush()?;
    /// assert!(img.info()?.dirty, "refcounts stay stale until close or checkpoint");
    /// # Ok(()) }
    /// ```
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock_state()?;
        self.flush_locked(&mut st)
    }

    pub(crate) fn flush_locked(&self, st: &mut State) -> Result<()> {
        self.flush_metadata(st)?;
        // Clusters unlinked before this flush can be reused once punched durably; the
        // gate makes sure no read in flight still uses their old mapping.
        if st.alloc.pending_len() > 0 {
            let _gate = self.io_gate_write();
            self.promote_pending(st)?;
        }
        Ok(())
    }

    /// Punches the clusters freed since the last flush, durably, and makes them
    /// reusable. The caller holds the I/O gate and has flushed the metadata.
    pub(crate) fn promote_pending(&self, st: &mut State) -> Result<()> {
        let pending = st.alloc.take_pending();
        if pending.is_empty() {
            return Ok(());
        }
        for (start, len) in runs(&pending, self.geo.cluster_size()) {
            self.storage
                .punch_hole(start, len)
                .map_err(|e| self.io_err("punch hole", start, e))?;
        }
        self.sync()?;
        st.alloc.make_ready(pending);
        Ok(())
    }

    /// The metadata part of a flush: data, then L2 tables, then L1 tables, with an
    /// fdatasync between the levels. Callers that already hold the I/O gate use this
    /// (then [`Image::promote_pending`]) instead of [`Image::flush_locked`].
    pub(crate) fn flush_metadata(&self, st: &mut State) -> Result<()> {
        self.sync()?;
        if st.cache.has_dirty() {
            let dirty = st.cache.take_dirty();
            let mut result = Ok(());
            for (off, words) in &dirty {
                if let Err(e) = self.storage.write_at(&encode_words(words), off.get()) {
                    result = Err(self.io_err("write L2 table", *off, e));
                    break;
                }
            }
            if let Err(e) = result.and_then(|_| self.sync()) {
                // Not known durable: write them again (and sync) before any L1 link
                // to them is written.
                for (o, _) in &dirty {
                    st.cache.mark_dirty(*o);
                }
                return Err(e);
            }
        }
        let mut wrote_l1 = false;
        for r in st.roots.values_mut() {
            while let Some(s) = r.dirty.pop_first() {
                let start = s * 64;
                let end = (start + 64).min(r.l1.len());
                let off = r.l1_offset + start as u64 * 8;
                if let Err(e) = self.storage.write_at(&encode_words(&r.l1[start..end]), off) {
                    r.dirty.insert(s);
                    return Err(self.io_err("write L1 table", off, e));
                }
                wrote_l1 = true;
            }
        }
        if wrote_l1 {
            self.sync()?;
        }
        Ok(())
    }
}
