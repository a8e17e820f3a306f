//! Reference counts per host cluster, as a full scan counts them, in as little memory
//! as `qemu-img check` uses for its own table (two bytes a cluster at the default
//! refcount width) or less: a count is kept as a low and a high byte in two arrays,
//! each allocated only when a count first needs it, so an image without counts of 256
//! or more costs one byte a cluster, and a scan that counts nothing none. The rare
//! count of 65,535 or more is kept aside.

use std::collections::HashMap;

/// The two bytes of a count that is kept aside.
const SPILLED: u64 = 0xffff;

/// References counted to each host cluster (indexes are cluster numbers).
#[derive(Debug, Clone, Default)]
pub(crate) struct Counts {
    len: u64,
    /// Empty until a count is set, then `len` bytes.
    low: Vec<u8>,
    /// Empty until a count of 256 or more is set, then `len` bytes.
    high: Vec<u8>,
    /// Counts of [`SPILLED`] or more, by cluster.
    spilled: HashMap<u64, u64>,
}

impl Counts {
    /// `clusters` counts of zero.
    pub(crate) fn new(clusters: u64) -> Counts {
        Counts {
            len: clusters,
            low: Vec::new(),
            high: Vec::new(),
            spilled: HashMap::new(),
        }
    }

    /// Clusters counted.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    fn packed(&self, c: usize) -> u64 {
        let low = self.low.get(c).copied().unwrap_or(0);
        let high = self.high.get(c).copied().unwrap_or(0);
        u64::from(high) << 8 | u64::from(low)
    }

    /// The count of cluster `c` (0 past the end).
    pub(crate) fn get(&self, c: u64) -> u64 {
        let i = c as usize;
        if c >= self.len {
            return 0;
        }
        match self.packed(i) {
            SPILLED => self.spilled.get(&c).copied().unwrap_or(SPILLED),
            v => v,
        }
    }

    /// Sets the count of cluster `c` (ignored past the end: callers count within
    /// [`Counts::len`], see [`Counts::resize`]).
    pub(crate) fn set(&mut self, c: u64, v: u64) {
        let i = c as usize;
        if c >= self.len {
            return;
        }
        if self.packed(i) == SPILLED {
            self.spilled.remove(&c);
        }
        let packed = if v >= SPILLED {
            self.spilled.insert(c, v);
            SPILLED
        } else {
            v
        };
        if self.low.is_empty() && packed != 0 {
            self.low = vec![0; self.len as usize];
        }
        if self.high.is_empty() && packed > 0xff {
            self.high = vec![0; self.len as usize];
        }
        if let Some(low) = self.low.get_mut(i) {
            *low = packed as u8;
        }
        if let Some(high) = self.high.get_mut(i) {
            *high = (packed >> 8) as u8;
        }
    }

    /// Adds `k` references to cluster `c` (saturating).
    pub(crate) fn add(&mut self, c: u64, k: u64) {
        let i = c as usize;
        if let Some(slot) = self.low.get_mut(i) {
            let low = u64::from(*slot) + k;
            if low < 0xff && self.high.get(i).is_none_or(|&h| h == 0) {
                // The common case: a small count stays small.
                *slot = low as u8;
                return;
            }
        }
        let v = self.get(c).saturating_add(k);
        self.set(c, v);
    }

    /// Grows (with zeros) or cuts the counts to `clusters`.
    pub(crate) fn resize(&mut self, clusters: u64) {
        if clusters < self.len {
            self.spilled.retain(|&c, _| c < clusters);
        }
        self.len = clusters;
        for bytes in [&mut self.low, &mut self.high] {
            if !bytes.is_empty() {
                // Exactly: a doubled allocation would be as large as the counts.
                bytes.reserve_exact((clusters as usize).saturating_sub(bytes.len()));
                bytes.resize(clusters as usize, 0);
            }
        }
    }

    /// Every count, in cluster order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.len()).map(|c| self.get(c))
    }

    /// The largest count (0 when there is none).
    pub(crate) fn max(&self) -> u64 {
        if let Some(&m) = self.spilled.values().max() {
            return m;
        }
        self.iter().max().unwrap_or(0)
    }

    /// One past the last cluster with a count, or 0.
    pub(crate) fn used_end(&self) -> u64 {
        let last = |bytes: &[u8]| {
            bytes
                .iter()
                .rposition(|&b| b != 0)
                .map_or(0, |i| i as u64 + 1)
        };
        last(&self.low).max(last(&self.high))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cross_each_byte_boundary_and_spill() {
        let mut c = Counts::new(4);
        for _ in 0..300 {
            c.add(1, 1);
        }
        assert_eq!(c.get(1), 300);
        c.add(2, 254);
        assert_eq!(c.get(2), 254);
        c.add(2, 1);
        assert_eq!(c.get(2), 255);
        c.add(3, 70_000);
        assert_eq!(c.get(3), 70_000);
        c.add(3, 5);
        assert_eq!(c.get(3), 70_005);
        c.set(3, 7);
        assert_eq!(c.get(3), 7);
        assert!(c.spilled.is_empty());
        c.set(0, u64::MAX);
        c.add(0, 9);
        assert_eq!(c.get(0), u64::MAX);
        assert_eq!(c.max(), u64::MAX);
        assert_eq!(c.get(4), 0);
        c.resize(2);
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![u64::MAX, 300]);
        c.resize(6);
        assert_eq!(c.used_end(), 2);
        c.add(5, 1);
        assert_eq!(c.used_end(), 6);
        assert_eq!(c.max(), u64::MAX);
    }
}
