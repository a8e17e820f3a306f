//! A bounded cache of L2 tables with dirty tracking.
//!
//! The cache holds decoded tables keyed by host offset. It never does I/O itself: the
//! image loads tables into it and writes back what [`L2Cache::insert`] evicts, after the
//! data those tables link to is durable (links are written after their targets; see
//! `spec/qcowx-format.md`, "Write ordering").

use crate::format::addr::HostOffset;
use std::collections::HashMap;

/// Default cache size: 8 MiB, which maps a 64 GiB working set with 64 KiB clusters.
pub const DEFAULT_CACHE_BYTES: usize = 8 << 20;
/// The cache always holds at least this many tables (a copy-on-write touches two).
pub const MIN_CACHED_TABLES: usize = 4;

#[derive(Debug)]
struct Slot {
    words: Vec<u64>,
    dirty: bool,
    last_use: u64,
}

/// A table evicted while dirty: the caller must write it back.
#[derive(Debug)]
pub struct Evicted {
    /// Host offset of the table.
    pub offset: HostOffset,
    /// Its words.
    pub words: Vec<u64>,
}

/// LRU cache of L2 tables.
///
/// ```
/// use qcowx_core::engine::cache::L2Cache;
/// use qcowx_core::format::addr::HostOffset;
///
/// let at = |n: u64| HostOffset::new(n << 16);
/// // Room for 4 tables of 64 KiB (the minimum).
/// let mut cache = L2Cache::new(1, 65536);
/// assert_eq!(cache.capacity(), 4);
/// for i in 1..=4 {
///     assert!(cache.insert(at(i), vec![i; 8192], false).is_none());
/// }
/// assert_eq!(cache.get(at(2)).map(|t| t[0]), Some(2));
///
/// // A change marks the table dirty and counts.
/// let before = cache.changes();
/// cache.get_mut(at(1)).unwrap()[0] = 99;
/// assert!(cache.has_dirty() && cache.changes() > before);
///
/// // A fifth table evicts the least recently used clean one: table 3, nothing to write.
/// assert!(cache.insert(at(5), vec![5; 8192], false).is_none());
/// assert!(cache.get(at(3)).is_none());
///
/// // Write-back: take the dirty tables; a failed write marks them dirty again.
/// let dirty = cache.take_dirty();
/// assert_eq!(dirty.len(), 1);
/// assert!(!cache.has_dirty());
/// cache.mark_dirty(dirty[0].0);
/// assert!(cache.has_dirty());
///
/// // When every table is dirty, the one that must leave comes back to be written.
/// for i in [2, 4, 5] {
///     cache.get_mut(at(i));
/// }
/// let evicted = cache.insert(at(6), vec![6; 8192], false).expect("all are dirty");
/// assert_eq!((evicted.offset, evicted.words[0]), (at(1), 99));
/// cache.restore(evicted); // its write failed: keep it, past capacity if need be
/// assert!(cache.get(at(1)).is_some());
///
/// cache.forget(at(6)); // its cluster was freed
/// assert!(cache.get(at(6)).is_none());
/// cache.take_dirty();
/// cache.clear_clean();
/// assert!(cache.get(at(2)).is_none());
/// ```
#[derive(Debug)]
pub struct L2Cache {
    slots: HashMap<HostOffset, Slot>,
    capacity: usize,
    tick: u64,
    /// Counts modifications (a table taken for writing, a dirty table inserted).
    changes: u64,
}

impl L2Cache {
    /// A cache holding up to `bytes` worth of tables of `table_bytes` each.
    pub fn new(bytes: usize, table_bytes: usize) -> L2Cache {
        let capacity = (bytes / table_bytes.max(1)).max(MIN_CACHED_TABLES);
        L2Cache {
            slots: HashMap::new(),
            capacity,
            tick: 0,
            changes: 0,
        }
    }

    /// Number of tables the cache holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The table at `offset`, if cached.
    pub fn get(&mut self, offset: HostOffset) -> Option<&[u64]> {
        self.tick += 1;
        let tick = self.tick;
        self.slots.get_mut(&offset).map(|s| {
            s.last_use = tick;
            &s.words[..]
        })
    }

    /// The table at `offset` for modification; marks it dirty.
    pub fn get_mut(&mut self, offset: HostOffset) -> Option<&mut Vec<u64>> {
        self.tick += 1;
        self.changes += 1;
        let tick = self.tick;
        self.slots.get_mut(&offset).map(|s| {
            s.last_use = tick;
            s.dirty = true;
            &mut s.words
        })
    }

    /// Inserts a table. Returns a dirty table that had to be evicted to make room.
    pub fn insert(&mut self, offset: HostOffset, words: Vec<u64>, dirty: bool) -> Option<Evicted> {
        self.tick += 1;
        self.changes += u64::from(dirty);
        let mut evicted = None;
        if !self.slots.contains_key(&offset) && self.slots.len() >= self.capacity {
            // Least recently used clean table first; a dirty one only if all are dirty.
            let victim = self
                .slots
                .iter()
                .min_by_key(|(_, s)| (s.dirty, s.last_use))
                .map(|(&o, _)| o);
            if let Some(v) = victim {
                if let Some(slot) = self.slots.remove(&v) {
                    if slot.dirty {
                        evicted = Some(Evicted {
                            offset: v,
                            words: slot.words,
                        });
                    }
                }
            }
        }
        self.slots.insert(
            offset,
            Slot {
                words,
                dirty,
                last_use: self.tick,
            },
        );
        evicted
    }

    /// Puts back a table whose write-back failed, even past capacity.
    pub fn restore(&mut self, ev: Evicted) {
        self.tick += 1;
        self.slots.insert(
            ev.offset,
            Slot {
                words: ev.words,
                dirty: true,
                last_use: self.tick,
            },
        );
    }

    /// Removes a table without writing it (its cluster was freed).
    pub fn forget(&mut self, offset: HostOffset) {
        self.slots.remove(&offset);
    }

    /// How many times a table was taken for writing or inserted dirty: equal values
    /// at two moments mean no table changed in between.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Whether any table is dirty.
    pub fn has_dirty(&self) -> bool {
        self.slots.values().any(|s| s.dirty)
    }

    /// Takes copies of every dirty table and marks them clean.
    pub fn take_dirty(&mut self) -> Vec<(HostOffset, Vec<u64>)> {
        let mut out: Vec<(HostOffset, Vec<u64>)> = self
            .slots
            .iter_mut()
            .filter(|(_, s)| s.dirty)
            .map(|(&o, s)| {
                s.dirty = false;
                (o, s.words.clone())
            })
            .collect();
        out.sort_by_key(|(o, _)| *o);
        out
    }

    /// Marks a table dirty again (a write-back failed).
    pub fn mark_dirty(&mut self, offset: HostOffset) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = true;
        }
    }

    /// Drops every clean table.
    pub fn clear_clean(&mut self) {
        self.slots.retain(|_, s| s.dirty);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_covers_a_32_gib_working_set_with_64k_clusters() {
        let table = 65536usize;
        let c = L2Cache::new(DEFAULT_CACHE_BYTES, table);
        // Each 64 KiB table maps 8192 clusters of 64 KiB = 512 MiB of guest data.
        let covered = c.capacity() as u64 * (table as u64 / 8) * 65536;
        assert!(covered >= 32 << 30, "{covered}");
    }

    #[test]
    fn evicts_clean_before_dirty() {
        let h = HostOffset::new;
        let mut c = L2Cache::new(4 * 64, 64);
        assert!(c.insert(h(1), vec![1], true).is_none());
        for o in 2..=4 {
            assert!(c.insert(h(o), vec![o], false).is_none());
        }
        c.get(h(2));
        // 3 is the least recently used clean table.
        assert!(c.insert(h(5), vec![5], false).is_none());
        assert!(c.get(h(3)).is_none());
        assert!(c.get(h(1)).is_some());
        // Make everything dirty; the next insert evicts a dirty table and returns it.
        for o in [1, 2, 4, 5] {
            c.get_mut(h(o));
        }
        let ev = c.insert(h(6), vec![6], false).expect("dirty eviction");
        assert!(c.get(ev.offset).is_none());
    }
}
