//! The downgrade to version 2 (`qemu-img amend -o compat=0.10`): zero clusters, which
//! version 2 cannot express, become data clusters of zeros (or unallocated ones where
//! nothing is read through), the refcounts are rebuilt, and the header is written
//! as version 2, without the feature fields and the extensions only version 3 has.
//!
//! Every L2 table any root links is visited once. A table several roots share is
//! changed in place for all of them alike: each read zeros at the entry, and reads
//! zeros after. A cluster written with zeros in place is one only this table links
//! (its references are the table's); any other gets a new cluster of zeros.

use crate::engine::{Image, State};
use crate::error::{Error, Result};
use crate::format::addr::HostOffset;
use crate::format::extensions::{EXT_BITMAPS, EXT_DATA_FILE, EXT_FEATURE_NAMES};
use crate::format::header::{Incompatible, V2_HEADER_LEN};
use crate::format::remote::EXT_REMOTE_BASE;
use crate::format::stamp::EXT_CLEAN_STAMP;
use crate::format::tables::{l2_entries, ClusterKind, L2Entry};
use crate::storage::Storage;

use super::scan::{scan, Scan};

/// What one zero entry becomes.
enum Expand {
    /// Unallocated: nothing is read through it (no backing file), so it reads zeros.
    Unallocate,
    /// Its preallocated cluster, written with zeros, as a data cluster.
    InPlace(HostOffset),
    /// A new cluster of zeros.
    NewCluster,
}

impl Image {
    /// Closes the image as a version 2 (compat 0.10) image, as `qemu-img amend -o
    /// compat=0.10` leaves it: zero clusters in every root become data clusters of
    /// zeros (unallocated where the image has no backing file), refcounts are rebuilt,
    /// and the header is written as version 2. qcowx opens the result read-only (or
    /// upgrades it again, [`OpenOptions::upgrade`](crate::OpenOptions::upgrade)).
    ///
    /// Refused, with nothing written, as qemu-img refuses it: refcounts other than 16
    /// bits, incompatible features other than the dirty bit and the compression type
    /// (subclusters, a corrupt image), zstd-compressed clusters, a snapshot (or VDI)
    /// whose size is not the image's or whose VM state exceeds 32 bits. Damage a
    /// rebuild cannot resolve refuses too. Persistent bitmaps, which version 2 cannot
    /// hold, are removed first (list them with [`Image::bitmaps`] before, to tell the
    /// user). A version 2 image is closed as it is.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image, OpenOptions};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("a.qcow2");
    /// let opts = CreateOptions { refcount_bits: 16, ..CreateOptions::new(1 << 20) };
    /// let img = Image::create(&path, &opts)?;
    /// img.write_at(&[7; 512], 0)?;
    /// img.write_zeroes(65536, 65536, false)?;
    /// img.close_as_v2()?;
    /// let img = OpenOptions::new().write(false).open(&path)?;
    /// assert_eq!(img.info()?.version, 2);
    /// let mut b = [1u8; 2];
    /// img.read_at(&mut b, 511)?;
    /// assert_eq!(b, [7, 0]);
    /// # Ok(()) }
    /// ```
    pub fn close_as_v2(&self) -> Result<()> {
        self.check_writable()?;
        {
            let _structure = self.lock_structure();
            let mut st = self.lock_state()?;
            if st.header.version >= 3 && !st.closed {
                self.downgrade_locked(&mut st)?;
            }
        }
        self.close()
    }

    fn downgrade_locked(&self, st: &mut State) -> Result<()> {
        self.refuse_downgrade(st)?;
        self.flush_locked(st)?;
        // Damage a rebuild cannot resolve refuses before anything is written.
        let probe = scan(self, st, false)?.checked(self, "cannot downgrade: ")?;
        let plan = self.expansion_plan(st, &probe)?;
        drop(probe);

        self.mark_stale(st)?;
        // Version 2 cannot hold persistent bitmaps: they go, and the rebuild below
        // finds their clusters free. (qemu-img leaves them in the file, inconsistent,
        // their clusters leaked.)
        self.drop_bitmaps(st)?;
        let cs = self.geo.cluster_size();
        let zeros = vec![0u8; cs as usize];
        let mut placed = Vec::with_capacity(plan.len());
        for (table, i, old, how) in plan {
            let new = match how {
                Expand::Unallocate => L2Entry::UNALLOCATED,
                Expand::InPlace(host) => {
                    self.write_zero_cluster(&zeros, host)?;
                    L2Entry::data(host, &self.geo).with_writable(old.writable())
                }
                Expand::NewCluster => {
                    let host = st.alloc.contiguous(1);
                    self.write_zero_cluster(&zeros, host)?;
                    // Bit 63 is set by the rebuild where the cluster has one owner.
                    L2Entry::data(host, &self.geo).with_writable(false)
                }
            };
            placed.push((table, i, new));
        }
        // The zeros are durable before any link to them.
        self.sync()?;
        for (table, i, new) in placed {
            self.load_l2(st, table)?;
            if let Some(words) = st.cache.get_mut(table) {
                new.put(words, i, &self.geo);
                st.cache.mark_dirty(table);
            }
        }
        st.deltas.lose_exactness();
        self.flush_locked(st)?;
        super::rebuild(self, st)?;

        let mut h = st.header.clone();
        h.version = 2;
        h.header_length = V2_HEADER_LEN;
        h.incompatible = Incompatible::empty();
        h.compatible = 0;
        h.autoclear = 0;
        h.refcount_order = 4;
        h.compression_type = 0;
        h.unknown_fields.clear();
        h.extensions.remove(EXT_FEATURE_NAMES);
        h.extensions.remove(EXT_CLEAN_STAMP);
        h.extensions.remove(EXT_BITMAPS);
        self.write_header_area(st, h)
    }

    /// What qemu-img refuses to downgrade, and what version 2 cannot hold.
    fn refuse_downgrade(&self, st: &State) -> Result<()> {
        let refuse = |why: String| {
            Err(Error::Unsupported {
                file: self.name.clone(),
                what: format!("a downgrade to compat=0.10: {why}"),
            })
        };
        let h = &st.header;
        if h.refcount_order != 4 {
            return refuse(format!(
                "version 2 has 16-bit refcounts only, this image has {}-bit ones (amend -o \
                 refcount_bits=16 first, or in the same call)",
                1u32 << h.refcount_order
            ));
        }
        let features = h.incompatible - Incompatible::DIRTY - Incompatible::COMPRESSION_TYPE;
        if !features.is_empty() {
            return refuse(format!(
                "incompatible features {:#x} are set (subclusters, or the image is marked corrupt)",
                features.bits()
            ));
        }
        if h.extensions.has(EXT_DATA_FILE) {
            return refuse("the image has an external data file".into());
        }
        for e in st.registry.entries() {
            if e.vm_state_size() > u64::from(u32::MAX) || e.disk_size().is_some_and(|d| d != h.size)
            {
                return refuse(format!(
                    "snapshot '{}' has another size than the image (or more than 4 GiB of VM \
                     state), which version 2 readers would not know",
                    e.name
                ));
            }
        }
        Ok(())
    }

    /// Every zero entry of every L2 table any root links (each table once), and what
    /// it becomes. Refuses zstd-compressed clusters (version 2 has deflate only).
    fn expansion_plan(
        &self,
        st: &mut State,
        probe: &Scan,
    ) -> Result<Vec<(HostOffset, usize, L2Entry, Expand)>> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let zstd = st
            .header
            .incompatible
            .contains(Incompatible::COMPRESSION_TYPE);
        let backed = st.header.backing_file.is_some() || st.header.extensions.has(EXT_REMOTE_BASE);
        let mut plan = Vec::new();
        for table in self.linked_l2_tables(st)? {
            let table_refs = probe.count(table.get() / cs);
            self.load_l2(st, table)?;
            let Some(words) = st.cache.get(table) else {
                continue;
            };
            for (i, e) in l2_entries(words, &geo) {
                let how = match e.kind(&geo) {
                    Ok(ClusterKind::Compressed { offset, .. }) if zstd => {
                        return Err(Error::Unsupported {
                            file: self.name.clone(),
                            what: format!(
                                "a downgrade to compat=0.10: the image has zstd-compressed \
                                 clusters (the L2 table at {:#x} links one at {:#x}), which \
                                 version 2 cannot read",
                                table.get(),
                                offset.get()
                            ),
                        });
                    }
                    Ok(ClusterKind::Zero { host: Some(host) })
                        if probe.count(host.get() / cs) == table_refs =>
                    {
                        Expand::InPlace(host)
                    }
                    Ok(ClusterKind::Zero { .. }) if backed => Expand::NewCluster,
                    Ok(ClusterKind::Zero { host: None }) => Expand::Unallocate,
                    // A preallocated cluster other tables link too: a cluster of its
                    // own, so theirs is not written.
                    Ok(ClusterKind::Zero { host: Some(_) }) => Expand::NewCluster,
                    _ => continue,
                };
                plan.push((table, i, e, how));
            }
        }
        Ok(plan)
    }

    fn write_zero_cluster(&self, zeros: &[u8], at: HostOffset) -> Result<()> {
        self.storage
            .write_at(zeros, at.get())
            .map_err(|e| self.io_err("write a cluster of zeros", at, e))
    }
}
