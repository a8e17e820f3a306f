//! The registry: the roots a snapshot table lists, as one value — QEMU's entries,
//! qcowx's record of each (parallel to the entries), the bytes the table may grow into
//! in place, and the in-memory index of names, VDI heads and uids over them. Every
//! change goes through a method that keeps the three in step; nothing outside this
//! file touches the index. Types only; no I/O (the engine writes the table and commits
//! it with the header).

use std::collections::HashMap;

use super::roots::{Record, RootKind, VDI_NAME_PREFIX};
use super::snapshot::SnapshotEntry;

/// The snapshot table's roots, with qcowx's records and lookups over them.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    entries: Vec<SnapshotEntry>,
    /// qcowx's facts about each entry (parallel to `entries`).
    records: Vec<Record>,
    /// Bytes at the table's offset this session may fill without moving the table;
    /// 0 also when the file's table is not these entries byte for byte (read with a
    /// name that is not UTF-8), where nothing may be written in place.
    capacity: u64,
    index: Index,
}

impl Registry {
    /// The registry of a table holding `entries` (with their `records`), with
    /// `capacity` bytes of room at its offset.
    pub(crate) fn new(entries: Vec<SnapshotEntry>, records: Vec<Record>, capacity: u64) -> Self {
        let index = Index::build(&entries, &records);
        Registry {
            entries,
            records,
            capacity,
            index,
        }
    }

    /// Number of entries, deleted ones included.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no entries.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The table's entries, in table order.
    pub(crate) fn entries(&self) -> &[SnapshotEntry] {
        &self.entries
    }

    /// The records, parallel to [`Registry::entries`].
    pub(crate) fn records(&self) -> &[Record] {
        &self.records
    }

    /// Entry `i`.
    pub(crate) fn entry(&self, i: usize) -> &SnapshotEntry {
        &self.entries[i]
    }

    /// The record of entry `i`.
    pub(crate) fn record(&self, i: usize) -> &Record {
        &self.records[i]
    }

    /// Bytes the entries occupy.
    pub(crate) fn used_bytes(&self) -> u64 {
        self.index.used
    }

    /// Byte offset of entry `i` inside the table.
    pub(crate) fn offset_of(&self, i: usize) -> u64 {
        self.index.offsets[i]
    }

    /// Bytes at the table's offset that may be filled without moving the table.
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Records the room the table now has at its offset.
    pub(crate) fn set_capacity(&mut self, capacity: u64) {
        self.capacity = capacity;
    }

    /// Largest numeric QCOW2 snapshot ID in the table.
    pub(crate) fn max_id(&self) -> u64 {
        self.index.max_id
    }

    /// The live head entry of VDI `vdi` (highest generation, not deleted).
    pub(crate) fn head(&self, vdi: u64) -> Option<usize> {
        self.index.heads.get(&vdi).copied()
    }

    /// The live root called `name` (a snapshot, or a VDI by its display name).
    pub(crate) fn by_name(&self, name: &str) -> Option<usize> {
        self.index.names.get(name).copied()
    }

    /// The entry of the root with uid `uid`.
    pub(crate) fn by_uid(&self, uid: u64) -> Option<usize> {
        self.index.by_uid.get(&uid).copied()
    }

    /// Whether any entry, deleted ones included, carries display name `name` (QEMU
    /// resolves names to the first entry, so a name stays taken until gc removes them
    /// all).
    pub(crate) fn name_taken(&self, name: &str) -> bool {
        self.index.all_names.contains_key(name)
    }

    /// The newest live snapshot taken of VDI `vdi`: `(creation time, uid)`.
    pub(crate) fn latest(&self, vdi: u64) -> Option<(u64, u64)> {
        self.index.latest.get(&vdi).copied()
    }

    /// Whether entry `i` is a live root (not deleted, not a superseded head).
    pub(crate) fn is_live(&self, i: usize) -> bool {
        let r = &self.records[i];
        match r.kind {
            RootKind::Snapshot => !r.deleted,
            RootKind::Vdi => self.head(r.vdi) == Some(i),
        }
    }

    /// The name users know entry `i` by (a VDI head without its prefix).
    pub(crate) fn display_name(&self, i: usize) -> &str {
        let n = &self.entries[i].name;
        match self.records[i].kind {
            RootKind::Vdi => n.strip_prefix(VDI_NAME_PREFIX).unwrap_or(n),
            RootKind::Snapshot => n,
        }
    }

    /// Appends an entry (written to the file, not yet committed).
    pub(crate) fn push(&mut self, entry: SnapshotEntry, record: Record) {
        self.entries.push(entry);
        self.records.push(record);
        self.index
            .on_append(&self.entries, &self.records, self.entries.len() - 1);
    }

    /// Takes back the last [`Registry::push`] (its commit failed).
    pub(crate) fn pop(&mut self) {
        self.entries.pop();
        self.records.pop();
        self.index = Index::build(&self.entries, &self.records);
    }

    /// Flags entry `i` deleted (`true`) or takes a flag back (`false`).
    pub(crate) fn set_deleted(&mut self, i: usize, deleted: bool) {
        if self.records[i].deleted == deleted {
            return;
        }
        self.records[i].deleted = deleted;
        if deleted {
            self.index.on_delete(&self.entries, &self.records, i);
        } else {
            self.index = Index::build(&self.entries, &self.records);
        }
    }

    /// The extra data of entry `i`, to keep in step with a flags word written in
    /// place (the index does not depend on it).
    pub(crate) fn extra_mut(&mut self, i: usize) -> &mut Vec<u8> {
        &mut self.entries[i].extra
    }

    /// Replaces the whole table (with `capacity` bytes of room at its new offset) and
    /// returns the old one, for putting back with [`Registry::restore`] if the
    /// commit fails.
    pub(crate) fn replace(
        &mut self,
        entries: Vec<SnapshotEntry>,
        records: Vec<Record>,
        capacity: u64,
    ) -> Registry {
        std::mem::replace(self, Registry::new(entries, records, capacity))
    }

    /// Puts back a table [`Registry::replace`] returned.
    pub(crate) fn restore(&mut self, old: Registry) {
        *self = old;
    }
}

/// Lookups over the snapshot table kept in memory, so that snapshot and fork cost
/// O(L1) however many roots there are. Rebuilt (O(table)) when the table is rewritten;
/// updated in place when an entry is appended or flagged deleted.
#[derive(Debug, Default)]
struct Index {
    /// Live roots by display name.
    names: HashMap<String, usize>,
    /// Live head entry of each VDI.
    heads: HashMap<u64, usize>,
    /// Newest snapshot (creation time, uid) taken of each VDI.
    latest: HashMap<u64, (u64, u64)>,
    /// Bytes the entries occupy.
    used: u64,
    /// Byte offset of each entry inside the table.
    offsets: Vec<u64>,
    /// Entry index of each root uid.
    by_uid: HashMap<u64, usize>,
    /// How many entries, deleted ones included, carry each display name: QEMU resolves
    /// names to the first entry, so a name stays taken until gc removes them all.
    all_names: HashMap<String, usize>,
    /// Largest numeric QCOW2 snapshot ID.
    max_id: u64,
}

pub(crate) fn display(entry: &SnapshotEntry, rec: &Record) -> String {
    match rec.kind {
        RootKind::Vdi => entry
            .name
            .strip_prefix(VDI_NAME_PREFIX)
            .unwrap_or(&entry.name)
            .to_string(),
        RootKind::Snapshot => entry.name.clone(),
    }
}

impl Index {
    /// Builds the index of a whole table.
    fn build(entries: &[SnapshotEntry], records: &[Record]) -> Index {
        let mut ix = Index::default();
        for i in 0..entries.len() {
            ix.on_append(entries, records, i);
        }
        ix
    }

    /// Accounts for entry `i`, just appended.
    fn on_append(&mut self, entries: &[SnapshotEntry], records: &[Record], i: usize) {
        let (e, r) = (&entries[i], &records[i]);
        self.offsets.push(self.used);
        self.used += e.encoded_len() as u64;
        self.by_uid.insert(r.uid, i);
        *self.all_names.entry(display(e, r)).or_insert(0) += 1;
        if let Ok(id) = e.id.parse::<u64>() {
            self.max_id = self.max_id.max(id);
        }
        match r.kind {
            RootKind::Snapshot if !r.deleted => {
                let newest = self.latest.entry(r.vdi).or_insert((r.created_ns, r.uid));
                if r.created_ns >= newest.0 {
                    *newest = (r.created_ns, r.uid);
                }
                self.names.insert(display(e, r), i);
            }
            RootKind::Snapshot => {}
            RootKind::Vdi if !r.deleted => {
                let wins = match self.heads.get(&r.vdi) {
                    Some(&h) => records[h].generation <= r.generation,
                    None => true,
                };
                if wins {
                    if let Some(&h) = self.heads.get(&r.vdi) {
                        self.forget_name(&display(&entries[h], &records[h]), h);
                    }
                    self.heads.insert(r.vdi, i);
                    self.names.insert(display(e, r), i);
                }
            }
            RootKind::Vdi => {}
        }
    }

    fn forget_name(&mut self, name: &str, i: usize) {
        if self.names.get(name) == Some(&i) {
            self.names.remove(name);
        }
    }

    /// Accounts for entry `i`, just flagged deleted.
    fn on_delete(&mut self, entries: &[SnapshotEntry], records: &[Record], i: usize) {
        self.forget_name(&display(&entries[i], &records[i]), i);
        let r = &records[i];
        if r.kind == RootKind::Snapshot && self.latest.get(&r.vdi).map(|l| l.1) == Some(r.uid) {
            // The newest live snapshot of that VDI takes over as the next parent.
            self.latest.remove(&r.vdi);
            if let Some(n) = records
                .iter()
                .filter(|x| x.kind == RootKind::Snapshot && x.vdi == r.vdi && !x.deleted)
                .max_by_key(|x| x.created_ns)
            {
                self.latest.insert(r.vdi, (n.created_ns, n.uid));
            }
        }
        if r.kind == RootKind::Vdi && self.heads.get(&r.vdi) == Some(&i) {
            self.heads.remove(&r.vdi);
            // An older head left by a crash between a revert's two writes takes over.
            let next = records
                .iter()
                .enumerate()
                .filter(|(_, x)| x.kind == RootKind::Vdi && x.vdi == r.vdi && !x.deleted)
                .max_by_key(|(_, x)| x.generation)
                .map(|(j, _)| j);
            if let Some(j) = next {
                self.heads.insert(r.vdi, j);
                self.names.insert(display(&entries[j], &records[j]), j);
            }
        }
    }
}
