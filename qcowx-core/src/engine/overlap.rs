//! Metadata overlap protection: no write lands on the image's own structures.
//!
//! A damaged image can link a guest cluster to a host cluster that is also metadata
//! (an L2 entry pointing at a refcount block, an L1 entry pointing at the L1 table
//! itself). Reads through such a link are harmless; a write through it would destroy
//! the structure. Every path that writes guest data or an L2 table to the file asks
//! [`Image::guard_write`] first; a write that would overlap is refused, the image is
//! marked corrupt (the header's corrupt bit, as QEMU marks it) and this handle
//! writes nothing more, so nothing else is harmed. A repair clears the bit.
//!
//! What is protected: the header cluster, every loaded root's L1 table and the L2
//! tables it links, every snapshot's L1 table, the snapshot table, the refcount table
//! and its blocks. Snapshots' L2 tables are not listed (that would mean reading every
//! snapshot's L1 table at open): an image qcowx did not close cleanly is scanned at a
//! writable open, and that scan refuses any cluster used twice.
//!
//! The map is built when first needed and rebuilt when the set of roots or tables
//! changes. Structures created during the session live in clusters newly allocated,
//! which no existing link reaches (a link past the allocated end is refused as
//! damage); a cluster that stopped being metadata leaves the map at a rebuild, and a
//! hit is confirmed on a fresh map before anything is refused.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::format::addr::HostOffset;
use crate::format::header::Incompatible;
use crate::format::tables::{decode_words, l2_tables};
use crate::storage::Storage;

use super::image::*;
use super::metadata_map::{Key, MetadataMap, Structure, Writing};

fn key_of(st: &State) -> Key {
    Key {
        roots: st.roots.len(),
        root_l1s: st.roots.values().fold(0u64, |acc, r| {
            acc.wrapping_mul(31)
                .wrapping_add(r.l1_offset ^ r.l1.len() as u64)
        }),
        snapshots: st.registry.len(),
        snapshots_offset: st.header.snapshots_offset,
        refcount_table: (
            st.header.refcount_table_offset,
            st.header.refcount_table_clusters,
        ),
    }
}

impl Image {
    /// The refcount table's entries (refcount block offsets), as the header places it.
    pub(crate) fn read_reftable(&self, h: &crate::format::header::Header) -> Result<Vec<u64>> {
        let len = u64::from(h.refcount_table_clusters) * self.geo.cluster_size();
        let mut raw = vec![0u8; len as usize];
        self.storage
            .read_at(&mut raw, h.refcount_table_offset)
            .map_err(|e| self.io_err("read refcount table", h.refcount_table_offset, e))?;
        Ok(decode_words(&raw))
    }

    /// Lists every protected structure's clusters from the state as it is now.
    fn build_metadata_map(&self, st: &State) -> Result<MetadataMap> {
        let bits = self.geo.cluster_bits;
        let cs = self.geo.cluster_size();
        let mut clusters = HashMap::new();
        let mut add = |offset: u64, len: u64, s: Structure| {
            if len == 0 {
                return;
            }
            let first = offset >> bits;
            let last = offset.saturating_add(len - 1) >> bits;
            // A structure that claims more clusters than the file can hold is damage
            // the open or check reports; list only what could be written.
            for c in first..=last.min(first + (1 << 20)) {
                clusters.entry(c).or_insert((s, offset));
            }
        };
        add(0, cs, Structure::Header);
        let h = &st.header;
        add(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
            Structure::RefcountTable,
        );
        for block in self.read_reftable(h)? {
            // An unaligned entry names no block (check reports it): listing the
            // cluster it falls in could refuse sound writes there.
            if block != 0 && block % cs == 0 {
                add(block, cs, Structure::RefcountBlock);
            }
        }
        if !st.registry.is_empty() {
            let used: u64 = st
                .registry
                .entries()
                .iter()
                .map(|e| e.encoded_len() as u64)
                .sum();
            add(h.snapshots_offset, used, Structure::SnapshotTable);
        }
        for e in st.registry.entries() {
            add(
                e.l1_table_offset,
                u64::from(e.l1_size) * 8,
                Structure::SnapshotL1Table,
            );
        }
        for &(offset, len) in st.bitmaps.metadata() {
            add(offset, len, Structure::Bitmap);
        }
        let mut l2 = Vec::new();
        for r in st.roots.values() {
            add(r.l1_offset, r.l1.len() as u64 * 8, Structure::L1Table);
            l2.extend(l2_tables(&r.l1, &self.geo).map(|(_, _, table)| table));
        }
        let mut l2_tables: Vec<u64> = l2.into_iter().map(|off| off.get() & !(cs - 1)).collect();
        l2_tables.sort_unstable();
        l2_tables.dedup();
        Ok(MetadataMap {
            key: Some(key_of(st)),
            clusters,
            l2_tables,
            cluster_bits: bits,
        })
    }

    /// Refuses a write of `what` to the host bytes `[host, host+len)` that would land
    /// on the image's metadata or past every allocated cluster (both mean the link
    /// that led here is damaged): the image is marked corrupt and this handle writes
    /// nothing more. See the module documentation.
    pub(crate) fn guard_write(
        &self,
        st: &mut State,
        what: Writing,
        host: HostOffset,
        len: u64,
    ) -> Result<()> {
        let host = host.get();
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let end = host.saturating_add(len);
        if end > st.alloc.end() {
            let why = format!(
                "refused to write {} at host offset {host:#x} (+{len:#x}): it lies past the \
                 end of the allocated clusters ({:#x}), so the link to it is damaged",
                what.name(),
                st.alloc.end()
            );
            return Err(self.refuse(st, host, why));
        }
        let bits = self.geo.cluster_bits;
        let (first, last) = (host >> bits, (end - 1) >> bits);
        let skip = (what == Writing::L2Table).then_some(Structure::L2Table);
        if st.metadata.key == Some(key_of(st)) && st.metadata.hit(first, last, skip).is_none() {
            return Ok(());
        }
        // Built for another state, or a hit: confirm on a map of the state as it is.
        st.metadata = self.build_metadata_map(st)?;
        let Some((c, s, at)) = st.metadata.hit(first, last, skip) else {
            return Ok(());
        };
        let why = format!(
            "refused to write {} at host offset {host:#x} (+{len:#x}): cluster {:#x} is \
             the {} at {at:#x}",
            what.name(),
            c << bits,
            s.name()
        );
        Err(self.refuse(st, host, why))
    }

    /// Marks the image corrupt (one header write, made durable) and stops this
    /// handle's writes; returns the error that reports it.
    fn refuse(&self, st: &mut State, host: u64, why: String) -> Error {
        let marked = if st.header.incompatible.contains(Incompatible::CORRUPT) {
            Ok(())
        } else {
            st.header.incompatible |= Incompatible::CORRUPT;
            self.write_header_fields(st).and_then(|_| self.sync())
        };
        let note = match marked {
            Ok(()) => "the image is now marked corrupt and opens read-only until repaired",
            Err(_) => "marking the image corrupt failed as well",
        };
        self.set_refused(Some(format!(
            "writes stopped after a refused write on metadata at {host:#x}"
        )));
        self.corrupt("image metadata", host, format!("{why}; {note}"))
    }
}
