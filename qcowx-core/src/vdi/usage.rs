//! Space accounting per root: what each VDI and snapshot maps, and what only it
//! references (what deleting it and running `gc` would give back).
//!
//! [`Image::root_usage`] walks the metadata once: every live root's L1 table, then
//! every distinct L2 table once, whatever the number of roots that share it. An L2
//! table referenced by one root only passes that ownership down to the clusters it
//! maps; a table referenced by two roots makes all its clusters shared. The cost is
//! O(metadata): the L1 tables plus the distinct L2 tables, never the data and never
//! roots × table size.

use std::collections::HashMap;

use crate::engine::{Image, TableReader, DEFAULT_ROOT};
use crate::error::Result;
use crate::format::addr::HostOffset;
use crate::format::tables::{decode_words, l2_entries, l2_tables, ClusterKind};
use crate::vdi::{RootKind, DEFAULT_VDI, VDI_NAME_PREFIX};

/// Space used by one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootUsage {
    /// The root's name (VDIs without the `vdi:` prefix; `default` for the default VDI).
    pub name: String,
    /// Snapshot or VDI.
    pub kind: RootKind,
    /// The root's unique id (0 for the default VDI), as [`Image::list`] reports it.
    pub uid: u64,
    /// Guest bytes the root maps to clusters of this image (data and compressed
    /// clusters, whole clusters; zero and unallocated clusters are not counted).
    pub mapped_bytes: u64,
    /// Bytes of host clusters referenced by this root and by no other live root: data
    /// and compressed clusters, L2 tables, and the root's own L1 table.
    pub exclusive_bytes: u64,
}

/// Owner of a host cluster during the walk.
const NONE: u32 = 0;
const SHARED: u32 = u32::MAX;

fn mark(owner: &mut [u32], cluster: u64, root: u32) {
    if let Some(o) = owner.get_mut(cluster as usize) {
        *o = match *o {
            NONE => root,
            x if x == root => root,
            _ => SHARED,
        };
    }
}

impl Image {
    /// Space accounting for every live root, in [`Image::list`] order (the default VDI
    /// first). See the module documentation for the cost.
    ///
    /// References from deleted roots that `gc` has not removed yet are not counted:
    /// a cluster shared only with a deleted root is exclusive to the live one.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[1u8; 65536], 0)?;
    /// img.snapshot("default", "s1")?;
    /// img.write_at(&[2u8; 65536], 65536)?; // a new cluster only the default VDI has
    /// let usage = img.root_usage()?;
    /// assert_eq!(usage[0].name, "default");
    /// assert_eq!(usage[0].mapped_bytes, 2 * 65536);
    /// assert_eq!(usage[1].name, "s1");
    /// assert_eq!(usage[1].mapped_bytes, 65536);
    /// // s1 owns its L1 table and the old L2 table; the data cluster is shared.
    /// assert_eq!(usage[1].exclusive_bytes, 2 * 65536);
    /// # Ok(()) }
    /// ```
    pub fn root_usage(&self) -> Result<Vec<RootUsage>> {
        let mut st = self.lock_state()?;
        if self.is_writable() {
            self.flush_locked(&mut st)?;
        }
        let geo = self.geo;
        let cs = geo.cluster_size();
        let bits = geo.cluster_bits;
        let file_len = self
            .storage
            .len()
            .map_err(|e| self.io_err("stat", 0u64, e))?;
        let file_clusters = file_len.div_ceil(cs);

        // The live roots and their L1 tables (the default VDI's from memory).
        let mut roots: Vec<(RootUsage, u64, Vec<u64>)> = Vec::new();
        let default_l1 = self.root(&st, DEFAULT_ROOT)?.l1.clone();
        roots.push((
            RootUsage {
                name: DEFAULT_VDI.to_string(),
                kind: RootKind::Vdi,
                uid: 0,
                mapped_bytes: 0,
                exclusive_bytes: 0,
            },
            st.header.l1_table_offset,
            default_l1,
        ));
        for i in 0..st.registry.len() {
            if !st.registry.is_live(i) {
                continue;
            }
            let e = st.registry.entry(i);
            let r = st.registry.record(i);
            let len = u64::from(e.l1_size) * 8;
            if let Some(why) = e.l1_problem(self.geo.cluster_size()) {
                return Err(self.corrupt("snapshot L1 table", e.l1_table_offset, why));
            }
            if e.l1_table_offset.saturating_add(len) > file_len {
                return Err(self.corrupt(
                    "snapshot L1 table",
                    e.l1_table_offset,
                    "runs past the end of the file",
                ));
            }
            let mut raw = vec![0u8; len as usize];
            self.storage
                .read_at(&mut raw, e.l1_table_offset)
                .map_err(|err| self.io_err("read L1 table", e.l1_table_offset, err))?;
            let name = match r.kind {
                RootKind::Vdi => e.name.strip_prefix(VDI_NAME_PREFIX).unwrap_or(&e.name),
                RootKind::Snapshot => &e.name,
            }
            .to_string();
            roots.push((
                RootUsage {
                    name,
                    kind: r.kind,
                    uid: r.uid,
                    mapped_bytes: 0,
                    exclusive_bytes: 0,
                },
                e.l1_table_offset,
                decode_words(&raw),
            ));
        }
        if roots.len() >= SHARED as usize {
            return Err(crate::Error::InvalidArgument(format!(
                "{}: too many roots to account for",
                self.name
            )));
        }
        drop(st);

        // L1 tables, and the owner of every L2 table.
        let mut owner = vec![NONE; file_clusters as usize];
        let mut tables: HashMap<HostOffset, u32> = HashMap::new();
        for (r, (_, l1_off, l1)) in roots.iter().enumerate() {
            let id = r as u32 + 1;
            let l1_len = (l1.len() as u64 * 8).max(1);
            for c in (l1_off >> bits)..=((l1_off + l1_len - 1) >> bits) {
                mark(&mut owner, c, id);
            }
            for (_, _, off) in l2_tables(l1, &geo) {
                let o = tables.entry(off).or_insert(id);
                if *o != id {
                    *o = SHARED;
                }
                mark(&mut owner, off.cluster(&geo).get(), id);
            }
        }

        // Every distinct L2 table once: what it maps, and who owns its clusters.
        let mut mapped: HashMap<HostOffset, u64> = HashMap::with_capacity(tables.len());
        let mut sorted: Vec<(HostOffset, u32)> = tables.into_iter().collect();
        sorted.sort_unstable();
        let mut reader = TableReader::new(self)?;
        for (off, table_owner) in sorted {
            let Some(words) = reader.read(off)? else {
                return Err(self.corrupt(
                    "L2 table",
                    off,
                    "table offset is past the end of the file",
                ));
            };
            let mut count = 0u64;
            for (_, entry) in l2_entries(&words, &geo) {
                match entry.kind(&geo) {
                    Ok(ClusterKind::Data { host })
                    | Ok(ClusterKind::Subclusters {
                        host: Some(host), ..
                    }) => {
                        count += 1;
                        mark(&mut owner, host.cluster(&geo).get(), table_owner);
                    }
                    Ok(ClusterKind::Zero { host: Some(host) }) => {
                        mark(&mut owner, host.cluster(&geo).get(), table_owner);
                    }
                    Ok(ClusterKind::Compressed { offset, len }) => {
                        count += 1;
                        let last = (offset + (len.max(1) - 1)).cluster(&geo).get();
                        for c in offset.cluster(&geo).get()..=last {
                            mark(&mut owner, c, table_owner);
                        }
                    }
                    _ => {}
                }
            }
            mapped.insert(off, count);
        }

        // One pass over the owners: clusters per owning root.
        let mut owned = vec![0u64; roots.len() + 1];
        for &o in &owner {
            if let Some(n) = owned.get_mut(o as usize) {
                *n += 1;
            }
        }
        for (r, (usage, _, l1)) in roots.iter_mut().enumerate() {
            usage.mapped_bytes = l2_tables(l1, &geo)
                .map(|(_, _, off)| mapped.get(&off).copied().unwrap_or(0) * cs)
                .sum();
            usage.exclusive_bytes = owned[r + 1] * cs;
        }
        Ok(roots.into_iter().map(|(u, _, _)| u).collect())
    }
}

#[cfg(test)]
mod tests {
    use crate::{CreateOptions, Image};

    #[test]
    fn forks_and_deletes_move_ownership() {
        let dir = tempfile::tempdir().unwrap();
        let cs = 65536u64;
        let img = std::sync::Arc::new(
            Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(4 << 20)).unwrap(),
        );
        img.write_at(&vec![1u8; 4 * cs as usize], 0).unwrap();
        img.snapshot("default", "s1").unwrap();
        img.fork("s1", "dev").unwrap();
        img.open_root("dev")
            .unwrap()
            .write_at(&vec![2u8; cs as usize], 0)
            .unwrap();
        img.write_at(&vec![3u8; 2 * cs as usize], cs).unwrap();
        let u = img.root_usage().unwrap();
        let get = |n: &str| u.iter().find(|x| x.name == n).unwrap().clone();
        // default: own L2 copy + 2 new data clusters (its L1 is its own too).
        assert_eq!(get("default").mapped_bytes, 4 * cs);
        assert_eq!(get("default").exclusive_bytes, 4 * cs);
        // dev: own L1 + own L2 copy + 1 data cluster.
        assert_eq!(get("dev").exclusive_bytes, 3 * cs);
        assert_eq!(get("dev").mapped_bytes, 4 * cs);
        // s1: its L1 and the original L2 table; none of its data is exclusive
        // (cluster 0 is still mapped by default, clusters 1-2 by dev, 3 by both).
        assert_eq!(get("s1").exclusive_bytes, 2 * cs);
        img.delete_vdi("dev").unwrap();
        let u = img.root_usage().unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[1].name, "s1");
        // Cluster 1 and 2 of s1 are now only in s1.
        assert_eq!(u[1].exclusive_bytes, 4 * cs);
    }
}
