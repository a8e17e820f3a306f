//! The one L1→L2 walk. Every whole-tree pass (the reference scan, check's bit-63
//! rules, the refcount apply and its room check, usage, relocation, reconcile, the
//! overlap map) reads links with [`crate::format::tables::l2_tables`] /
//! [`L1Entry::link`], tables with [`TableReader`] (straight from the file) or the L2
//! cache (when links not yet written back matter), and entries with
//! [`crate::format::tables::l2_entries`]. [`walk_tree`] strings the three together
//! for the common case: one root, its tables read from the file.
//!
//! The rules every walk shares, enforced here: a malformed L1 entry is never followed;
//! an L2 table that lies wholly past the end of the file is not read (the caller
//! decides whether that is damage); a table the file ends inside reads as zeros past
//! the end, as QEMU reads it.

use crate::error::{Error, Result};
use crate::format::addr::HostOffset;
use crate::format::tables::{decode_words, l2_entries, l2_tables, L1Entry, L2Entry};

use super::image::Image;

/// Reads L2 tables from the file into one reused buffer.
pub(crate) struct TableReader<'a> {
    img: &'a Image,
    raw: crate::storage::IoBuf,
    file_len: u64,
}

impl<'a> TableReader<'a> {
    /// A reader for `img`'s tables, as long as the file is now.
    pub(crate) fn new(img: &'a Image) -> Result<TableReader<'a>> {
        let file_len = img.storage.len().map_err(|e| img.io_err("stat", 0u64, e))?;
        Ok(TableReader {
            img,
            raw: crate::storage::io_buf(img.geo.cluster_size() as usize),
            file_len,
        })
    }

    /// Whether a table at `table` starts inside the file.
    pub(crate) fn inside(&self, table: HostOffset) -> bool {
        table.get() < self.file_len
    }

    /// The words of the L2 table at `table`, or `None` when it starts at or past the
    /// end of the file (a damaged link).
    pub(crate) fn read(&mut self, table: HostOffset) -> Result<Option<Vec<u64>>> {
        if !self.inside(table) {
            return Ok(None);
        }
        let n = (self.file_len - table.get()).min(self.raw.len() as u64) as usize;
        self.raw[n..].fill(0);
        self.img
            .storage
            .read_at(&mut self.raw[..n], table.get())
            .map_err(|e| self.img.io_err("read L2 table", table, e))?;
        Ok(Some(decode_words(&self.raw)))
    }
}

/// One step of [`walk_tree`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum Step {
    /// A well-formed link of L1 entry `index` to the L2 table at `table`; the visitor
    /// answers whether to read the table.
    Link {
        index: usize,
        entry: L1Entry,
        table: HostOffset,
    },
    /// Entry `index` of the table at `table`.
    Entry {
        table: HostOffset,
        index: usize,
        entry: L2Entry,
    },
}

/// Walks one tree, reading its tables from the file. `visit` sees each well-formed
/// link of `l1` and answers whether to descend into its table (its answer to other
/// steps is ignored); a table descended into is read and each of its entries that
/// is not all zero bits visited. A table past the end of the file is skipped.
pub(crate) fn walk_tree<E: From<Error>>(
    img: &Image,
    l1: &[u64],
    mut visit: impl FnMut(Step) -> std::result::Result<bool, E>,
) -> std::result::Result<(), E> {
    let geo = img.geo;
    let mut reader = TableReader::new(img)?;
    for (index, entry, table) in l2_tables(l1, &geo) {
        if !visit(Step::Link {
            index,
            entry,
            table,
        })? {
            continue;
        }
        let Some(words) = reader.read(table)? else {
            continue; // past the end of the file: the scan reports such links
        };
        // An entry of all zero bits (unallocated, no subcluster state) links nothing
        // and holds no bit 63: no visitor has anything to do with it.
        let linked = l2_entries(&words, &geo).filter(|(_, e)| e.word() != 0 || e.bitmap() != 0);
        for (index, entry) in linked {
            visit(Step::Entry {
                table,
                index,
                entry,
            })?;
        }
    }
    Ok(())
}
