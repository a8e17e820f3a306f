//! Repair of guest data that shares a host cluster with metadata: the data is copied
//! to a new cluster and every link to it moved there, so the structure keeps its
//! cluster and the guest reads what it read before.
//!
//! QEMU's repair leaves such a cluster shared (its refcount raised, bit 63 cleared, so
//! that the next write copies it away); qcowx moves the data at once, which reads the
//! same and leaves no cluster with two meanings.

use std::collections::{BTreeMap, BTreeSet};

use crate::engine::{Image, State, DEFAULT_ROOT};
use crate::error::Result;
use crate::format::addr::{HostCluster, HostOffset};
use crate::format::tables::{l2_entries, l2_tables, ClusterKind, L2Entry};
use crate::storage::Storage;

use super::scan::Source;

impl Image {
    /// Copies each cluster of `clusters` (cluster indexes that hold metadata and are
    /// also linked as guest data) to a new cluster and relinks every data link to it,
    /// in every root. Returns how many links moved. The caller holds the structure
    /// lock and has flushed; links are written back by the caller's next flush.
    pub(super) fn relocate_data_on_metadata(
        &self,
        st: &mut State,
        clusters: &BTreeSet<u64>,
    ) -> Result<u64> {
        if clusters.is_empty() {
            return Ok(0);
        }
        let geo = self.geo;
        let cs = geo.cluster_size();
        // The copies first, durably: nothing links to them yet.
        let mut moved: BTreeMap<HostOffset, HostOffset> = BTreeMap::new();
        let mut buf = vec![0u8; cs as usize];
        for &c in clusters {
            let from = HostCluster::new(c).offset(&geo);
            self.storage
                .read_at(&mut buf, from.get())
                .map_err(|e| self.io_err("read cluster to relocate", from, e))?;
            let to = st.alloc.contiguous(1);
            self.storage
                .write_at(&buf, to.get())
                .map_err(|e| self.io_err("write relocated cluster", to, e))?;
            moved.insert(from, to);
        }
        self.sync()?;

        // (A repair runs this only when the scan found no other damage, so every
        // entry's L1 reference is sound.)
        let mut links = 0;
        for off in self.linked_l2_tables(st)? {
            self.load_l2(st, off)?;
            let Some(words) = st.cache.get_mut(off) else {
                continue;
            };
            let relinked: Vec<(usize, L2Entry)> = l2_entries(words, &geo)
                .filter_map(|(i, e)| {
                    let host = match e.kind(&geo) {
                        Ok(ClusterKind::Data { host })
                        | Ok(ClusterKind::Zero { host: Some(host) })
                        | Ok(ClusterKind::Subclusters {
                            host: Some(host), ..
                        }) => host,
                        _ => return None,
                    };
                    moved.get(&host).map(|&to| (i, e.with_host(to)))
                })
                .collect();
            for &(i, e) in &relinked {
                e.put(words, i, &geo);
            }
            if !relinked.is_empty() {
                links += relinked.len() as u64;
                st.cache.mark_dirty(off);
            }
        }
        st.deltas.lose_exactness();
        Ok(links)
    }

    /// Every L2 table any root links (the active L1 as in memory, every snapshot
    /// table entry's L1 from the file), each once. An entry whose L1 reference is
    /// unsound is skipped. The caller holds the state and has flushed.
    pub(super) fn linked_l2_tables(&self, st: &State) -> Result<BTreeSet<HostOffset>> {
        let geo = self.geo;
        let mut tables: BTreeSet<HostOffset> = BTreeSet::new();
        let mut add_l1 = |l1: &[u64]| tables.extend(l2_tables(l1, &geo).map(|(_, _, t)| t));
        add_l1(&self.root(st, DEFAULT_ROOT)?.l1);
        let cs = geo.cluster_size();
        for e in st.registry.entries() {
            if e.l1_problem(cs).is_none() {
                add_l1(&Source::File.l1(self, e.l1_table_offset, e.l1_size, false)?);
            }
        }
        Ok(tables)
    }
}
