//! L1 and L2 tables: entry layouts, the read-only bit, and guest address geometry.
//!
//! # The read-only bit
//! Bit 63 of an L1 or L2 entry is QCOW2's `COPIED` flag. qcowx reads it as an ownership
//! bit: set means *writable in place* (the target is reachable from this root only, by
//! this one path); clear means *read-only* (the target may be shared; a write must copy
//! it first). A read-only L1 entry makes its whole L2 table read-only whatever the
//! table's own bits say. Every write path in [`crate::engine::image`] consults
//! [`L1Entry::writable`] and [`L2Entry::writable`] before writing in place; a copied
//! table always has bit 63 cleared on every entry ([`L2Entry::read_only`]).
//!
//! Entries keep their bits private: they are made by constructors ([`L1Entry::new`],
//! [`L2Entry::data`], [`L2Entry::zero`], ...) and read by accessors and
//! [`L2Entry::kind`], so the bit layout (the extended-L2 bitmap included) is known
//! here only.

use super::addr::HostOffset;

/// Bit 63: the cluster is writable in place (QCOW2's COPIED flag).
pub const WRITABLE: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Bits 9..=55: host offset of an L2 table or data cluster.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Number of subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;
/// A subcluster bitmap naming every subcluster.
pub const ALL_SUBCLUSTERS: u32 = u32::MAX;

/// The runs of consecutive subclusters in `mask`, as `(first, end)` subcluster
/// indexes, in order.
///
/// ```
/// use qcowx_core::format::tables::subcluster_runs;
///
/// let runs: Vec<_> = subcluster_runs(0b1110_0011).collect();
/// assert_eq!(runs, [(0, 2), (5, 8)]);
/// assert_eq!(subcluster_runs(u32::MAX).collect::<Vec<_>>(), [(0, 32)]);
/// ```
pub fn subcluster_runs(mask: u32) -> impl Iterator<Item = (u32, u32)> {
    let mut rest = mask;
    std::iter::from_fn(move || {
        if rest == 0 {
            return None;
        }
        let first = rest.trailing_zeros();
        let len = (rest >> first).trailing_ones();
        let end = first + len;
        rest &= if end >= 32 { 0 } else { u32::MAX << end };
        Some((first, end))
    })
}

pub use super::geometry::Geometry;

/// An L1 entry: a link to an L2 table.
///
/// ```
/// use qcowx_core::format::addr::HostOffset;
/// use qcowx_core::format::tables::{Geometry, L1Entry, Link};
///
/// let geo = Geometry { cluster_bits: 16, extended: false };
/// let e = L1Entry::new(HostOffset::new(0x5_0000), true);
/// assert_eq!(e.raw(), 0x8000_0000_0005_0000);
/// assert_eq!((e.l2_offset(), e.writable()), (Some(HostOffset::new(0x5_0000)), true));
/// let ro = e.read_only();
/// assert!(!ro.writable() && ro.same_table(e));
/// assert_eq!(ro.link(&geo), Link::Table { table: HostOffset::new(0x5_0000), writable: false });
/// assert_eq!(ro.link(&geo).table(), Some(HostOffset::new(0x5_0000)));
/// assert_eq!(L1Entry::from_raw(0).link(&geo), Link::None);
/// let unaligned = L1Entry::from_raw(0x5_0200);
/// assert!(unaligned.is_malformed(&geo));
/// assert_eq!(unaligned.link(&geo).table(), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(u64);

impl L1Entry {
    /// The entry stored as `word`.
    pub const fn from_raw(word: u64) -> L1Entry {
        L1Entry(word)
    }
    /// The entry as stored.
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// Whether two entries link the same L2 table (or both none), whatever their
    /// writable bits.
    pub fn same_table(self, other: L1Entry) -> bool {
        self.0 & OFFSET_MASK == other.0 & OFFSET_MASK
    }

    /// The L2 table's host offset, or `None` when unallocated.
    pub fn l2_offset(self) -> Option<HostOffset> {
        match self.0 & OFFSET_MASK {
            0 => None,
            o => Some(HostOffset::new(o)),
        }
    }
    /// Whether the L2 table may be written in place through this link.
    pub fn writable(self) -> bool {
        self.0 & WRITABLE != 0
    }
    /// A link to `offset`, writable or read-only.
    pub fn new(offset: HostOffset, writable: bool) -> L1Entry {
        L1Entry(offset.get() | if writable { WRITABLE } else { 0 })
    }
    /// The same link with bit 63 cleared.
    pub fn read_only(self) -> L1Entry {
        L1Entry(self.0 & !WRITABLE)
    }
    /// Bits that must be zero (QCOW2 reserves 1..=8 and 56..=62) or misalignment.
    pub fn is_malformed(self, geo: &Geometry) -> bool {
        let off = self.0 & OFFSET_MASK;
        self.0 & !(OFFSET_MASK | WRITABLE) != 0 || !off.is_multiple_of(geo.cluster_size())
    }
}

/// What one L1 entry links to.
///
/// ```
/// use qcowx_core::format::addr::HostOffset;
/// use qcowx_core::format::tables::Link;
///
/// let at = HostOffset::new(0x3_0000);
/// assert_eq!(Link::Table { table: at, writable: false }.table(), Some(at));
/// assert_eq!(Link::Malformed.table(), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// No L2 table: the range reads from the backing file, or as zeros.
    None,
    /// Reserved bits set or an unaligned offset: a damaged entry, never followed.
    Malformed,
    /// An L2 table at host offset `table`.
    Table {
        /// Host offset of the L2 table.
        table: HostOffset,
        /// Whether the table may be written in place through this link.
        writable: bool,
    },
}

impl Link {
    /// The table linked, if the link is well formed and names one.
    pub fn table(self) -> Option<HostOffset> {
        match self {
            Link::Table { table, .. } => Some(table),
            Link::None | Link::Malformed => None,
        }
    }
}

impl L1Entry {
    /// What the entry links to. The one classification every walk of a tree uses.
    pub fn link(self, geo: &Geometry) -> Link {
        if self.is_malformed(geo) {
            return Link::Malformed;
        }
        match self.l2_offset() {
            None => Link::None,
            Some(table) => Link::Table {
                table,
                writable: self.writable(),
            },
        }
    }
}

/// The L2 tables an L1 table links to, in L1 order: `(L1 index, entry, table offset)`.
/// Malformed entries are skipped; a walk that must report them matches
/// [`L1Entry::link`] itself.
///
/// ```
/// use qcowx_core::format::addr::HostOffset;
/// use qcowx_core::format::tables::{l2_tables, Geometry, L1Entry};
///
/// let geo = Geometry { cluster_bits: 16, extended: false };
/// let l1 = [0, L1Entry::new(HostOffset::new(0x3_0000), true).raw(), 0x3_0200 /* malformed */];
/// let tables: Vec<_> = l2_tables(&l1, &geo).map(|(i, _, at)| (i, at)).collect();
/// assert_eq!(tables, [(1, HostOffset::new(0x3_0000))]);
/// ```
pub fn l2_tables<'a>(
    l1: &'a [u64],
    geo: &'a Geometry,
) -> impl Iterator<Item = (usize, L1Entry, HostOffset)> + 'a {
    l1.iter().enumerate().filter_map(|(i, &w)| {
        let e = L1Entry(w);
        match e.link(geo) {
            Link::Table { table, .. } => Some((i, e, table)),
            Link::None | Link::Malformed => None,
        }
    })
}

/// The entries of an L2 table's words, in order: `(L2 index, entry)`.
///
/// ```
/// use qcowx_core::format::addr::HostOffset;
/// use qcowx_core::format::tables::{l2_entries, Geometry, L2Entry};
///
/// let geo = Geometry { cluster_bits: 16, extended: false };
/// let mut words = vec![0u64; 8192];
/// L2Entry::data(HostOffset::new(0x4_0000), &geo).put(&mut words, 5, &geo);
/// let used: Vec<usize> = l2_entries(&words, &geo).filter(|(_, e)| e.host().is_some()).map(|(j, _)| j).collect();
/// assert_eq!(used, [5]);
/// assert_eq!(l2_entries(&words, &geo).count(), 8192);
/// ```
pub fn l2_entries<'a>(
    words: &'a [u64],
    geo: &'a Geometry,
) -> impl Iterator<Item = (usize, L2Entry)> + 'a {
    (0..geo.l2_entries() as usize).map(move |j| (j, L2Entry::get(words, j, geo)))
}

/// A table's links made read-only: every L1 word, or every L2 entry of `words` (a
/// copy of a table, whose links become read-only when it is copied).
///
/// ```
/// use qcowx_core::format::tables::{read_only_l1, WRITABLE};
///
/// assert_eq!(read_only_l1(&[WRITABLE | 0x3_0000, 0]), [0x3_0000, 0]);
/// ```
pub fn read_only_l1(l1: &[u64]) -> Vec<u64> {
    l1.iter().map(|&w| L1Entry(w).read_only().0).collect()
}

/// Clears bit 63 on every entry of an L2 table's words.
///
/// ```
/// use qcowx_core::format::tables::{make_l2_read_only, Geometry, WRITABLE};
///
/// let ext = Geometry { cluster_bits: 16, extended: true };
/// // Extended entries: (word, bitmap) pairs; only the words lose bit 63.
/// let mut words = [WRITABLE | 0x3_0000, WRITABLE | 1, WRITABLE | 0x4_0000, 0];
/// make_l2_read_only(&mut words, &ext);
/// assert_eq!(words, [0x3_0000, WRITABLE | 1, 0x4_0000, 0]);
/// ```
pub fn make_l2_read_only(words: &mut [u64], geo: &Geometry) {
    let step = if geo.extended { 2 } else { 1 };
    for w in words.iter_mut().step_by(step) {
        *w &= !WRITABLE;
    }
}

/// An L2 entry (the first 64 bits; extended entries carry a bitmap beside it).
///
/// ```
/// use qcowx_core::format::addr::HostOffset;
/// use qcowx_core::format::tables::{ClusterKind, Geometry, L2Entry};
///
/// let geo = Geometry { cluster_bits: 16, extended: false };
/// let host = HostOffset::new(0x7_0000);
/// let d = L2Entry::data(host, &geo);
/// assert_eq!((d.host(), d.writable(), d.is_compressed()), (Some(host), true, false));
/// assert_eq!(d.kind(&geo), Ok(ClusterKind::Data { host }));
/// assert!(!d.read_only().writable() && d.read_only().with_writable(true) == d);
/// assert_eq!(d.with_host(HostOffset::new(0x9_0000)).host(), Some(HostOffset::new(0x9_0000)));
/// assert_eq!((d.word(), d.bitmap()), (0x8000_0000_0007_0000, 0));
/// assert_eq!(L2Entry::from_raw(d.word(), 0), d);
///
/// assert_eq!(L2Entry::zero(&geo).kind(&geo), Ok(ClusterKind::Zero { host: None }));
/// let kept = L2Entry::zero_allocated(host, &geo);
/// assert_eq!(kept.kind(&geo), Ok(ClusterKind::Zero { host: Some(host) }));
/// let c = L2Entry::compressed(HostOffset::new(0x7_0123), 700, &geo);
/// assert!(c.is_compressed() && !c.writable());
/// assert!(matches!(c.kind(&geo), Ok(ClusterKind::Compressed { len, .. }) if len >= 700));
///
/// // In a table's words: standard entries take one word, extended ones two.
/// let mut words = vec![0u64; 8192];
/// d.put(&mut words, 3, &geo);
/// assert_eq!(L2Entry::get(&words, 3, &geo), d);
/// assert_eq!(L2Entry::get(&words, 9999, &geo), L2Entry::UNALLOCATED);
///
/// let ext = Geometry { cluster_bits: 16, extended: true };
/// let sub = L2Entry::subclusters(host, 0b0011, 0b0100);
/// assert_eq!(sub.kind(&ext), Ok(ClusterKind::Subclusters { host: Some(host), alloc: 0b0011, zero: 0b0100 }));
/// let zs = L2Entry::zero_subclusters(0b1);
/// assert_eq!(zs.kind(&ext), Ok(ClusterKind::Subclusters { host: None, alloc: 0, zero: 0b1 }));
/// let mut ext_words = vec![0u64; 8192];
/// sub.put(&mut ext_words, 1, &ext);
/// assert_eq!((ext_words[2], ext_words[3]), (sub.word(), sub.bitmap()));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry {
    /// The standard 64-bit descriptor.
    word: u64,
    /// The subcluster bitmap of an extended entry (0 otherwise): bits 0..32 allocated,
    /// bits 32..64 reads-as-zero.
    bitmap: u64,
}

/// What an L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// Not allocated here: read from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster (QCOW2's ZERO_ALLOC) if any.
    Zero {
        /// Preallocated host cluster.
        host: Option<HostOffset>,
    },
    /// Data at a host cluster.
    Data {
        /// Host offset of the cluster.
        host: HostOffset,
    },
    /// Compressed data.
    Compressed {
        /// Host offset of the compressed bytes.
        offset: HostOffset,
        /// Length in bytes (rounded up to the descriptor's 512-byte sectors).
        len: u64,
    },
    /// Extended entry with per-subcluster state.
    Subclusters {
        /// Host cluster, if any (none when no subcluster is allocated).
        host: Option<HostOffset>,
        /// Allocation bitmap (bit i: subcluster i has data at host).
        alloc: u32,
        /// Zero bitmap (bit i: subcluster i reads as zeros).
        zero: u32,
    },
}

impl L2Entry {
    /// An unallocated entry.
    pub const UNALLOCATED: L2Entry = L2Entry { word: 0, bitmap: 0 };

    /// The entry stored as `word` (and, on an extended-L2 image, `bitmap`).
    pub const fn from_raw(word: u64, bitmap: u64) -> L2Entry {
        L2Entry { word, bitmap }
    }
    /// The standard 64-bit descriptor as stored.
    pub const fn word(self) -> u64 {
        self.word
    }
    /// The subcluster bitmap as stored (0 on a standard image).
    pub const fn bitmap(self) -> u64 {
        self.bitmap
    }

    /// Whether the data cluster may be written in place through this link.
    pub fn writable(self) -> bool {
        self.word & WRITABLE != 0
    }
    /// The same entry with bit 63 cleared.
    pub fn read_only(self) -> L2Entry {
        L2Entry {
            word: self.word & !WRITABLE,
            bitmap: self.bitmap,
        }
    }
    /// The same entry with bit 63 set as `writable` says.
    pub fn with_writable(self, writable: bool) -> L2Entry {
        L2Entry {
            word: if writable {
                self.word | WRITABLE
            } else {
                self.word & !WRITABLE
            },
            bitmap: self.bitmap,
        }
    }
    /// The same standard entry (flags and subcluster bitmap kept) naming host cluster
    /// `host` instead.
    pub fn with_host(self, host: HostOffset) -> L2Entry {
        L2Entry {
            word: (self.word & !OFFSET_MASK) | (host.get() & OFFSET_MASK),
            bitmap: self.bitmap,
        }
    }
    /// Whether the entry is compressed.
    pub fn is_compressed(self) -> bool {
        self.word & COMPRESSED != 0
    }
    /// Host offset of a standard (not compressed) cluster, if any.
    pub fn host(self) -> Option<HostOffset> {
        if self.is_compressed() {
            return None;
        }
        match self.word & OFFSET_MASK {
            0 => None,
            o => Some(HostOffset::new(o)),
        }
    }
    /// A writable data entry for `host`, fully allocated.
    pub fn data(host: HostOffset, geo: &Geometry) -> L2Entry {
        L2Entry {
            word: host.get() | WRITABLE,
            bitmap: if geo.extended { 0xffff_ffff } else { 0 },
        }
    }
    /// A compressed entry: `len` bytes of compressed data at host byte offset `offset`
    /// (never writable in place; no subcluster bits on an extended-L2 image).
    pub fn compressed(offset: HostOffset, len: u64, geo: &Geometry) -> L2Entry {
        let offset = offset.get();
        let sectors = ((offset + len - 1) >> 9) - (offset >> 9);
        L2Entry {
            word: COMPRESSED | (sectors << geo.csize_shift()) | offset,
            bitmap: 0,
        }
    }
    /// A writable extended entry for host cluster `host` whose subclusters in `alloc`
    /// hold data there and those in `zero` read as zeros (the rest read from the
    /// backing file). The two sets must not meet; every subcluster allocated is
    /// [`L2Entry::data`].
    pub fn subclusters(host: HostOffset, alloc: u32, zero: u32) -> L2Entry {
        L2Entry {
            word: host.get() | WRITABLE,
            bitmap: u64::from(alloc) | (u64::from(zero & !alloc) << 32),
        }
    }

    /// An extended entry with no host cluster whose subclusters in `zero` read as
    /// zeros and the rest from the backing file.
    pub fn zero_subclusters(zero: u32) -> L2Entry {
        L2Entry {
            word: 0,
            bitmap: u64::from(zero) << 32,
        }
    }

    /// An entry that reads as zeros, with no host cluster.
    pub fn zero(geo: &Geometry) -> L2Entry {
        if geo.extended {
            L2Entry {
                word: 0,
                bitmap: 0xffff_ffff_0000_0000,
            }
        } else {
            L2Entry {
                word: ZERO,
                bitmap: 0,
            }
        }
    }

    /// A writable entry that reads as zeros and keeps its host cluster `host`
    /// (QCOW2's "zero, allocated"; on an extended-L2 image every subcluster zero).
    pub fn zero_allocated(host: HostOffset, geo: &Geometry) -> L2Entry {
        let host = host.get();
        if geo.extended {
            L2Entry {
                word: host | WRITABLE,
                bitmap: 0xffff_ffff_0000_0000,
            }
        } else {
            L2Entry {
                word: host | WRITABLE | ZERO,
                bitmap: 0,
            }
        }
    }

    /// Entry `idx` of an L2 table's words (an index past the table reads as
    /// unallocated). The one place the extended-L2 layout (word, then bitmap) is read.
    pub fn get(words: &[u64], idx: usize, geo: &Geometry) -> L2Entry {
        if geo.extended {
            L2Entry {
                word: words.get(idx * 2).copied().unwrap_or(0),
                bitmap: words.get(idx * 2 + 1).copied().unwrap_or(0),
            }
        } else {
            L2Entry {
                word: words.get(idx).copied().unwrap_or(0),
                bitmap: 0,
            }
        }
    }

    /// Stores the entry as entry `idx` of an L2 table's words (inside the table).
    pub fn put(self, words: &mut [u64], idx: usize, geo: &Geometry) {
        if geo.extended {
            words[idx * 2] = self.word;
            words[idx * 2 + 1] = self.bitmap;
        } else {
            words[idx] = self.word;
        }
    }

    /// Decodes the entry. `Err` carries a description of a malformed entry.
    pub fn kind(self, geo: &Geometry) -> Result<ClusterKind, &'static str> {
        if self.is_compressed() {
            if self.word & WRITABLE != 0 {
                return Err("compressed cluster has the COPIED flag set");
            }
            let shift = geo.csize_shift();
            let offset = self.word & ((1u64 << shift) - 1);
            let sectors =
                ((self.word & !COMPRESSED) >> shift) & ((1u64 << (geo.cluster_bits - 8)) - 1);
            let len = (sectors + 1) * 512 - (offset & 511);
            if offset == 0 {
                return Err("compressed cluster at host offset 0");
            }
            return Ok(ClusterKind::Compressed {
                offset: HostOffset::new(offset),
                len,
            });
        }
        let raw = self.word & OFFSET_MASK;
        if !raw.is_multiple_of(geo.cluster_size()) {
            return Err("data cluster offset is not cluster-aligned");
        }
        let host = (raw != 0).then_some(HostOffset::new(raw));
        if geo.extended {
            let alloc = self.bitmap as u32;
            let zero = (self.bitmap >> 32) as u32;
            if alloc & zero != 0 {
                return Err("subcluster both allocated and zero");
            }
            return Ok(match host {
                None if alloc != 0 => return Err("subclusters allocated without a host cluster"),
                None if zero == 0 => ClusterKind::Unallocated,
                Some(host) if alloc == 0xffff_ffff => ClusterKind::Data { host },
                _ if zero == 0xffff_ffff => ClusterKind::Zero { host },
                _ => ClusterKind::Subclusters { host, alloc, zero },
            });
        }
        if self.word & ZERO != 0 {
            return Ok(ClusterKind::Zero { host });
        }
        Ok(match host {
            None => ClusterKind::Unallocated,
            Some(host) => ClusterKind::Data { host },
        })
    }
}

/// Where the bytes of one piece of a guest cluster come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Host bytes at this offset.
    Host(HostOffset),
    /// Zeros.
    Zero,
    /// The backing file (or zeros without one).
    Backing,
    /// The cluster is compressed; decompress it, then take bytes at this in-cluster offset.
    Compressed {
        /// Host offset of the compressed bytes.
        offset: HostOffset,
        /// Their length.
        len: u64,
        /// Offset inside the decompressed cluster.
        at: u64,
    },
}

/// Splits `[in_off, in_off+len)` of a cluster of `kind` into pieces by source, calling
/// `f(len, source)` for each in order. Adjacent pieces of one source are merged.
///
/// ```
/// use qcowx_core::format::addr::HostOffset;
/// use qcowx_core::format::tables::{for_each_piece, ClusterKind, Geometry, Source};
///
/// let ext = Geometry { cluster_bits: 16, extended: true }; // 2 KiB subclusters
/// let kind = ClusterKind::Subclusters { host: Some(HostOffset::new(0x10_0000)), alloc: 0b001, zero: 0b010 };
/// let mut pieces = Vec::new();
/// for_each_piece(&ext, kind, 1024, 5120, |len, src| pieces.push((len, src)));
/// assert_eq!(
///     pieces,
///     [(1024, Source::Host(HostOffset::new(0x10_0400))), (2048, Source::Zero), (2048, Source::Backing)]
/// );
/// ```
pub fn for_each_piece(
    geo: &Geometry,
    kind: ClusterKind,
    in_off: u64,
    len: u64,
    mut f: impl FnMut(u64, Source),
) {
    match kind {
        ClusterKind::Unallocated => f(len, Source::Backing),
        ClusterKind::Zero { .. } => f(len, Source::Zero),
        ClusterKind::Data { host } => f(len, Source::Host(host + in_off)),
        ClusterKind::Compressed { offset, len: clen } => f(
            len,
            Source::Compressed {
                offset,
                len: clen,
                at: in_off,
            },
        ),
        ClusterKind::Subclusters { host, alloc, zero } => {
            let sub = geo.subcluster_size();
            let end = in_off + len;
            let mut pos = in_off;
            let mut pending: Option<(u64, Source)> = None;
            while pos < end {
                let i = (pos / sub) as u32;
                let stop = ((u64::from(i) + 1) * sub).min(end);
                let src = if let Some(host) = host.filter(|_| alloc & (1 << i) != 0) {
                    Source::Host(host + pos)
                } else if zero & (1 << i) != 0 {
                    Source::Zero
                } else {
                    Source::Backing
                };
                let n = stop - pos;
                pending = match pending {
                    Some((plen, psrc)) if continues(psrc, plen, src) => Some((plen + n, psrc)),
                    Some((plen, psrc)) => {
                        f(plen, psrc);
                        Some((n, src))
                    }
                    None => Some((n, src)),
                };
                pos = stop;
            }
            if let Some((plen, psrc)) = pending {
                f(plen, psrc);
            }
        }
    }
}

fn continues(prev: Source, prev_len: u64, next: Source) -> bool {
    match (prev, next) {
        (Source::Host(a), Source::Host(b)) => a + prev_len == b,
        (Source::Zero, Source::Zero) | (Source::Backing, Source::Backing) => true,
        _ => false,
    }
}

/// Decodes a big-endian table of 64-bit words.
///
/// ```
/// use qcowx_core::format::tables::{decode_words, encode_words};
///
/// let words = [1u64, 0x8000_0000_0003_0000];
/// let bytes = encode_words(&words);
/// assert_eq!(&bytes[..8], &[0, 0, 0, 0, 0, 0, 0, 1]); // big-endian
/// assert_eq!(decode_words(&bytes), words);
/// ```
pub fn decode_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
        .collect()
}

/// Encodes 64-bit words big-endian.
///
/// ```
/// use qcowx_core::format::tables::encode_words;
///
/// assert_eq!(encode_words(&[0x0102]), [0, 0, 0, 0, 0, 0, 1, 2]);
/// ```
pub fn encode_words(words: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 8);
    for w in words {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::addr::GuestOffset;

    #[test]
    fn compressed_descriptor_decodes() {
        let geo = Geometry {
            cluster_bits: 16,
            extended: false,
        };
        // offset 0x50200, 3 additional sectors
        let shift = geo.csize_shift();
        let e = L2Entry {
            word: COMPRESSED | (3 << shift) | 0x50200,
            bitmap: 0,
        };
        assert_eq!(
            e.kind(&geo),
            Ok(ClusterKind::Compressed {
                offset: HostOffset::new(0x50200),
                len: 4 * 512
            })
        );
    }

    #[test]
    fn subcluster_pieces_merge() {
        let geo = Geometry {
            cluster_bits: 16,
            extended: true,
        };
        let kind = ClusterKind::Subclusters {
            host: Some(HostOffset::new(0x10000)),
            alloc: 0b0011,
            zero: 0b0100,
        };
        let mut pieces = vec![];
        for_each_piece(&geo, kind, 0, 4 * 2048, |n, s| pieces.push((n, s)));
        assert_eq!(
            pieces,
            vec![
                (4096, Source::Host(HostOffset::new(0x10000))),
                (2048, Source::Zero),
                (2048, Source::Backing)
            ]
        );
    }

    #[test]
    fn walks_follow_only_well_formed_links() {
        let geo = Geometry {
            cluster_bits: 16,
            extended: false,
        };
        let l1 = [
            0,
            0x3_0000 | WRITABLE,
            0x4_0200,     // unaligned
            0x5_0000 | 2, // a reserved bit
            0x6_0000,
        ];
        let links: Vec<Link> = l1.iter().map(|&w| L1Entry(w).link(&geo)).collect();
        assert_eq!(links[0], Link::None);
        assert_eq!(
            links[1],
            Link::Table {
                table: HostOffset::new(0x3_0000),
                writable: true
            }
        );
        assert_eq!((links[2], links[3]), (Link::Malformed, Link::Malformed));
        let tables: Vec<(usize, u64)> =
            l2_tables(&l1, &geo).map(|(i, _, t)| (i, t.get())).collect();
        assert_eq!(tables, vec![(1, 0x3_0000), (4, 0x6_0000)]);
    }

    #[test]
    fn subcluster_masks_and_runs() {
        let geo = Geometry {
            cluster_bits: 16,
            extended: true,
        };
        // 2 KiB subclusters.
        assert_eq!(geo.subclusters_touched(4096, 4096), 0b1100);
        assert_eq!(geo.subclusters_touched(2047, 2), 0b11);
        assert_eq!(geo.subclusters_touched(0, 65536), ALL_SUBCLUSTERS);
        assert_eq!(geo.subclusters_covered(4095, 4098), 0b1100);
        assert_eq!(geo.subclusters_covered(1, 2046), 0);
        assert_eq!(geo.subclusters_covered(62 * 1024, 2048), 1 << 31);
        let runs: Vec<(u32, u32)> = subcluster_runs(0b1110_0110 | 1 << 31).collect();
        assert_eq!(runs, vec![(1, 3), (5, 8), (31, 32)]);
        assert_eq!(
            subcluster_runs(ALL_SUBCLUSTERS).collect::<Vec<_>>(),
            vec![(0, 32)]
        );
    }

    #[test]
    fn split_addresses() {
        let geo = Geometry {
            cluster_bits: 16,
            extended: false,
        };
        assert_eq!(geo.split(GuestOffset::new(0)), (0, 0));
        assert_eq!(
            geo.split(GuestOffset::new(65536 * 8192 + 65536 * 3 + 5)),
            (1, 3)
        );
    }
}
