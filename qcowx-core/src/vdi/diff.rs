//! The guest ranges that differ between two roots, found by walking both trees
//! together and skipping links they share: the cost grows with what changed, not with
//! the disk size.

use crate::engine::Image;
use crate::error::Result;
use crate::format::tables::{Geometry, L1Entry, L2Entry};

/// A guest range `[offset, offset + length)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Start.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

impl Image {
    /// Guest ranges (whole clusters) where roots `from` and `to` (snapshots or VDIs)
    /// may differ. Clusters linked to the same host cluster, or reading zeros in both,
    /// are never reported; a reported cluster may still hold equal bytes (data written
    /// twice with the same content).
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.snapshot(DEFAULT_VDI, "a")?;
    /// img.write_at(&[7u8; 512], 65536)?;
    /// img.snapshot(DEFAULT_VDI, "b")?;
    /// let ranges = img.diff("a", "b")?;
    /// assert_eq!((ranges[0].offset, ranges[0].length), (65536, 65536));
    /// # Ok(()) }
    /// ```
    pub fn diff(&self, from: &str, to: &str) -> Result<Vec<Range>> {
        let (a, size_a) = self.root_l1(from)?;
        let (b, size_b) = self.root_l1(to)?;
        let size = size_a.max(size_b);
        let geo = self.geo;
        let cs = geo.cluster_size();
        let per_l1 = geo.bytes_per_l1_entry();
        let has_backing = self.backing().is_some();
        let mut out: Vec<Range> = Vec::new();
        let mut push = |offset: u64| {
            let length = cs.min(size - offset);
            match out.last_mut() {
                Some(r) if r.offset + r.length == offset => r.length += length,
                _ => out.push(Range { offset, length }),
            }
        };
        for i in 0..a.len().max(b.len()) {
            let ea = L1Entry::from_raw(a.get(i).copied().unwrap_or(0));
            let eb = L1Entry::from_raw(b.get(i).copied().unwrap_or(0));
            if ea.same_table(eb) {
                continue; // the same table (or none): nothing differs below
            }
            let ta = self.l2_words(ea.link(&geo).table())?;
            let tb = self.l2_words(eb.link(&geo).table())?;
            for j in 0..geo.l2_entries() as usize {
                let offset = i as u64 * per_l1 + j as u64 * cs;
                if offset >= size {
                    break;
                }
                let x = entry(&ta, j, &geo);
                let y = entry(&tb, j, &geo);
                if x == y {
                    continue;
                }
                let zero = |e: L2Entry| match e.kind(&geo) {
                    Ok(crate::format::tables::ClusterKind::Zero { .. }) => true,
                    Ok(crate::format::tables::ClusterKind::Unallocated) => !has_backing,
                    _ => false,
                };
                if zero(x) && zero(y) {
                    continue;
                }
                push(offset);
            }
        }
        Ok(out)
    }
}

/// Entry `j` of a table (none: unallocated), without its writable bit: two roots
/// sharing a cluster differ only there.
fn entry(table: &Option<Vec<u64>>, j: usize, geo: &Geometry) -> L2Entry {
    match table {
        None => L2Entry::UNALLOCATED,
        Some(t) => L2Entry::get(t, j, geo).read_only(),
    }
}
