//! The object-store layout (`spec/remote.md`): the manifest of the snapshots pushed
//! under a prefix, the index of one stream object, and the header extension by which
//! an image names a snapshot in a store as its base. Bytes ⇄ types only; no I/O.
//! Every integer is big-endian; every structure carries a CRC-32C.
//!
//! The stream objects themselves are send/receive streams
//! ([`crate::format::stream`]), byte for byte.

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::format::stream::{RecordKind, MAX_DATA, MAX_STREAM_NAME, RECORD_HEADER_BYTES};

/// Magic of a manifest object: `QCOWXMAN`.
pub const MANIFEST_MAGIC: [u8; 8] = *b"QCOWXMAN";
/// Magic of an index object: `QCOWXIDX`.
pub const INDEX_MAGIC: [u8; 8] = *b"QCOWXIDX";
/// Version of the manifest, index and base extension this code writes and reads.
pub const REMOTE_VERSION: u32 = 1;
/// Most snapshots one manifest lists.
pub const MAX_MANIFEST_ENTRIES: usize = 16384;
/// Header extension type of a remote base (`qcxb`).
pub const EXT_REMOTE_BASE: u32 = 0x7163_7862;
/// Longest store URL or endpoint a base extension holds.
pub const MAX_REMOTE_NAME: usize = 1024;

/// Why manifest, index or base-extension bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is invalid: {why}")]
pub struct LayoutError {
    /// Which structure: `manifest`, `index` or `remote base extension`.
    pub what: &'static str,
    /// What is wrong.
    pub why: String,
}

fn bad(what: &'static str, why: impl Into<String>) -> LayoutError {
    LayoutError {
        what,
        why: why.into(),
    }
}

/// The fixed start of a manifest or an index (24 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawTableHead {
    magic: [u8; 8],
    version: U32,
    flags: U32,
    count: U32,
    /// CRC-32C of everything after the head.
    crc: U32,
}
const HEAD_BYTES: usize = 24;
const _: () = assert!(std::mem::size_of::<RawTableHead>() == HEAD_BYTES);

fn encode_table(magic: [u8; 8], count: usize, body: &[u8]) -> Vec<u8> {
    let head = RawTableHead {
        magic,
        version: REMOTE_VERSION.into(),
        flags: 0.into(),
        count: (count as u32).into(),
        crc: crc32c::crc32c(body).into(),
    };
    let mut out = Vec::with_capacity(HEAD_BYTES + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

/// Checks a table's head and returns its count and body.
fn decode_table<'a>(
    what: &'static str,
    magic: [u8; 8],
    bytes: &'a [u8],
    entry: usize,
    max: usize,
) -> Result<(usize, &'a [u8]), LayoutError> {
    let (head, body) = RawTableHead::read_from_prefix(bytes).map_err(|_| {
        bad(
            what,
            format!("{} bytes, shorter than its head", bytes.len()),
        )
    })?;
    if head.magic != magic {
        return Err(bad(what, format!("bad magic {:02x?}", head.magic)));
    }
    if head.version.get() != REMOTE_VERSION {
        return Err(bad(
            what,
            format!(
                "version {} (this qcowx reads {REMOTE_VERSION})",
                head.version.get()
            ),
        ));
    }
    if head.flags.get() != 0 {
        return Err(bad(what, "unknown flags"));
    }
    let count = head.count.get() as usize;
    if count > max {
        return Err(bad(what, format!("{count} entries (at most {max})")));
    }
    if body.len() != count * entry {
        return Err(bad(
            what,
            format!(
                "{} bytes of entries for {count} entries of {entry}",
                body.len()
            ),
        ));
    }
    let crc = crc32c::crc32c(body);
    if crc != head.crc.get() {
        return Err(bad(
            what,
            format!(
                "checksum mismatch (stored {:#010x}, computed {crc:#010x})",
                head.crc.get()
            ),
        ));
    }
    Ok((count, body))
}

/// One snapshot of a manifest (184 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawManifestEntry {
    uid: U64,
    from_uid: U64,
    virtual_size: U64,
    created_ns: U64,
    stream_len: U64,
    index_len: U64,
    cluster_size: U32,
    name_len: U16,
    reserved: U16,
    name: [u8; MAX_STREAM_NAME],
}
const MANIFEST_ENTRY_BYTES: usize = 184;
const _: () = assert!(std::mem::size_of::<RawManifestEntry>() == MANIFEST_ENTRY_BYTES);

/// A snapshot in the store: its stream object, relative to `from_uid` (0: a full one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    /// The snapshot's identity (the stream's `to_uid`).
    pub uid: u64,
    /// The base of its stream (0: a full stream).
    pub from_uid: u64,
    /// Its virtual size.
    pub virtual_size: u64,
    /// Its creation time, ns since the Unix epoch.
    pub created_ns: u64,
    /// Bytes of its stream object.
    pub stream_len: u64,
    /// Bytes of its index object.
    pub index_len: u64,
    /// The sending image's cluster size.
    pub cluster_size: u32,
    /// Its name.
    pub name: String,
}

/// The manifest: every snapshot pushed under a prefix, in push order.
///
/// ```
/// use qcowx_core::format::remote::{Manifest, ManifestEntry};
///
/// let entry = |uid, from_uid, name: &str| ManifestEntry {
///     uid,
///     from_uid,
///     virtual_size: 1 << 20,
///     created_ns: 0,
///     stream_len: 256,
///     index_len: 24,
///     cluster_size: 65536,
///     name: name.into(),
/// };
/// // A full stream, an incremental one on it, then "mon" pushed again in full.
/// let entries = vec![entry(5, 0, "mon"), entry(6, 5, "tue"), entry(7, 0, "mon")];
/// let m = Manifest { entries };
/// let bytes = m.encode();
/// assert_eq!(Manifest::decode(&bytes).unwrap(), m);
/// let mut damaged = bytes.clone();
/// damaged[30] ^= 1;
/// assert!(Manifest::decode(&damaged).is_err(), "checksum mismatch");
/// let orphan = Manifest { entries: vec![entry(6, 5, "tue")] };
/// assert!(Manifest::decode(&orphan.encode()).is_err(), "its base is not listed");
///
/// assert_eq!(m.by_name("mon").unwrap().uid, 7, "the newest of that name");
/// assert_eq!(m.by_uid(6).unwrap().name, "tue");
/// assert!(m.by_uid(8).is_none());
/// let chain: Vec<u64> = m.chain(6).unwrap().iter().map(|e| e.uid).collect();
/// assert_eq!(chain, [5, 6], "the full stream first");
/// assert!(m.chain(8).is_none());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// The snapshots.
    pub entries: Vec<ManifestEntry>,
}

impl Manifest {
    /// The manifest's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.entries.len() * MANIFEST_ENTRY_BYTES);
        for e in &self.entries {
            let mut name = [0u8; MAX_STREAM_NAME];
            let n = e.name.len().min(MAX_STREAM_NAME);
            name[..n].copy_from_slice(&e.name.as_bytes()[..n]);
            let raw = RawManifestEntry {
                uid: e.uid.into(),
                from_uid: e.from_uid.into(),
                virtual_size: e.virtual_size.into(),
                created_ns: e.created_ns.into(),
                stream_len: e.stream_len.into(),
                index_len: e.index_len.into(),
                cluster_size: e.cluster_size.into(),
                name_len: (n as u16).into(),
                reserved: 0.into(),
                name,
            };
            body.extend_from_slice(raw.as_bytes());
        }
        encode_table(MANIFEST_MAGIC, self.entries.len(), &body)
    }

    /// Decodes and checks a manifest: head, checksum, then each entry (identities,
    /// names, sizes; a stream's base listed before it; no identity twice).
    pub fn decode(bytes: &[u8]) -> Result<Manifest, LayoutError> {
        const W: &str = "manifest";
        let (_, body) = decode_table(
            W,
            MANIFEST_MAGIC,
            bytes,
            MANIFEST_ENTRY_BYTES,
            MAX_MANIFEST_ENTRIES,
        )?;
        let mut entries: Vec<ManifestEntry> = Vec::new();
        for chunk in body.chunks_exact(MANIFEST_ENTRY_BYTES) {
            let raw =
                RawManifestEntry::read_from_bytes(chunk).map_err(|_| bad(W, "short entry"))?;
            let i = entries.len();
            let name = raw
                .name
                .get(..usize::from(raw.name_len.get()))
                .and_then(|b| std::str::from_utf8(b).ok())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad(W, format!("entry {i}: invalid name")))?;
            let e = ManifestEntry {
                uid: raw.uid.get(),
                from_uid: raw.from_uid.get(),
                virtual_size: raw.virtual_size.get(),
                created_ns: raw.created_ns.get(),
                stream_len: raw.stream_len.get(),
                index_len: raw.index_len.get(),
                cluster_size: raw.cluster_size.get(),
                name: name.to_string(),
            };
            if raw.reserved.get() != 0 {
                return Err(bad(W, format!("entry {i}: reserved field set")));
            }
            if e.uid < 2 || e.from_uid == 1 || e.uid == e.from_uid {
                return Err(bad(W, format!("entry {i}: invalid snapshot identity")));
            }
            if entries.iter().any(|o| o.uid == e.uid) {
                return Err(bad(W, format!("entry {i}: uid {:016x} twice", e.uid)));
            }
            if e.from_uid != 0 && !entries.iter().any(|o| o.uid == e.from_uid) {
                return Err(bad(
                    W,
                    format!(
                        "entry {i}: its base {:016x} is not listed before it",
                        e.from_uid
                    ),
                ));
            }
            if e.virtual_size == 0
                || !e.virtual_size.is_multiple_of(512)
                || e.virtual_size > crate::format::header::MAX_VIRTUAL_SIZE
            {
                return Err(bad(W, format!("entry {i}: invalid virtual size")));
            }
            entries.push(e);
        }
        Ok(Manifest { entries })
    }

    /// The snapshot named `name`, the newest if pushed twice under that name.
    pub fn by_name(&self, name: &str) -> Option<&ManifestEntry> {
        self.entries.iter().rev().find(|e| e.name == name)
    }

    /// The snapshot whose identity is `uid`.
    pub fn by_uid(&self, uid: u64) -> Option<&ManifestEntry> {
        self.entries.iter().find(|e| e.uid == uid)
    }

    /// The streams that rebuild snapshot `uid`, oldest (the full stream) first.
    /// `None` if `uid` or a base below it is not listed.
    pub fn chain(&self, uid: u64) -> Option<Vec<&ManifestEntry>> {
        let mut out = Vec::new();
        let mut at = uid;
        while at != 0 {
            // Bases are listed before their streams, so this walk ends.
            let e = self.by_uid(at)?;
            out.push(e);
            at = e.from_uid;
            if out.len() > self.entries.len() {
                return None;
            }
        }
        out.reverse();
        Some(out)
    }
}

/// One record of an index (40 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawIndexEntry {
    offset: U64,
    length: U64,
    object_offset: U64,
    stored_len: U32,
    crc: U32,
    kind: u8,
    compressed: u8,
    reserved: U16,
    reserved2: U32,
}
const INDEX_ENTRY_BYTES: usize = 40;
const _: () = assert!(std::mem::size_of::<RawIndexEntry>() == INDEX_ENTRY_BYTES);

/// Where one record of a stream object is, and what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Guest offset of its range.
    pub offset: u64,
    /// Guest bytes it covers.
    pub length: u64,
    /// Data, zero or discard.
    pub kind: RecordKind,
    /// Whether its payload is zstd-compressed.
    pub compressed: bool,
    /// Where the record (its 40-byte header) starts in the stream object.
    pub object_offset: u64,
    /// Bytes of the record in the object: header and payload.
    pub stored_len: u32,
    /// The record's crc (as in its header).
    pub crc: u32,
}

/// The index of one stream object: its records, in guest order.
///
/// ```
/// use qcowx_core::format::remote::{Index, IndexEntry};
/// use qcowx_core::format::stream::{RecordKind, RECORD_HEADER_BYTES, STREAM_HEADER_BYTES};
///
/// let head = RECORD_HEADER_BYTES as u64;
/// let data = IndexEntry {
///     offset: 0,
///     length: 4096,
///     kind: RecordKind::Data,
///     compressed: false,
///     object_offset: STREAM_HEADER_BYTES as u64,
///     stored_len: (head + 4096) as u32,
///     crc: 1,
/// };
/// let zero = IndexEntry {
///     offset: 4096,
///     length: 8192,
///     kind: RecordKind::Zero,
///     object_offset: data.object_offset + u64::from(data.stored_len),
///     stored_len: head as u32,
///     ..data
/// };
/// let index = Index { entries: vec![data, zero] };
/// let stream_len = zero.object_offset + 2 * head; // the zero record, then the end record
/// let bytes = index.encode();
/// assert_eq!(Index::decode(&bytes, 1 << 20, stream_len).unwrap(), index);
/// // A record past the stream object, a range past the disk, a damaged byte: refused.
/// assert!(Index::decode(&bytes, 1 << 20, zero.object_offset).is_err());
/// assert!(Index::decode(&bytes, 8192, stream_len).is_err());
/// let mut damaged = bytes.clone();
/// damaged[24] ^= 1;
/// assert!(Index::decode(&damaged, 1 << 20, stream_len).is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    /// The records (data, zero and discard; not the end record).
    pub entries: Vec<IndexEntry>,
}

/// Most entries an index of a disk of `virtual_size` bytes may have: one per 512
/// bytes (records never overlap), plus one.
///
/// ```
/// use qcowx_core::format::remote::{max_index_entries, Index};
///
/// assert_eq!(max_index_entries(1 << 20), 2049);
/// // A head that claims more entries is refused.
/// let mut bytes = Index::default().encode();
/// bytes[16..20].copy_from_slice(&2050u32.to_be_bytes());
/// assert!(Index::decode(&bytes, 1 << 20, 1 << 30).is_err());
/// ```
pub fn max_index_entries(virtual_size: u64) -> u64 {
    virtual_size / 512 + 1
}

/// Most bytes an index of a disk of `virtual_size` bytes may have.
///
/// ```
/// use qcowx_core::format::remote::{max_index_bytes, max_index_entries, Index};
///
/// // The head (an empty index), then 40 bytes per entry.
/// let head = Index::default().encode().len() as u64;
/// assert_eq!(max_index_bytes(1 << 20), head + 40 * max_index_entries(1 << 20));
/// ```
pub fn max_index_bytes(virtual_size: u64) -> u64 {
    HEAD_BYTES as u64 + max_index_entries(virtual_size) * INDEX_ENTRY_BYTES as u64
}

impl Index {
    /// The index's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.entries.len() * INDEX_ENTRY_BYTES);
        for e in &self.entries {
            let raw = RawIndexEntry {
                offset: e.offset.into(),
                length: e.length.into(),
                object_offset: e.object_offset.into(),
                stored_len: e.stored_len.into(),
                crc: e.crc.into(),
                kind: e.kind.byte(),
                compressed: u8::from(e.compressed),
                reserved: 0.into(),
                reserved2: 0.into(),
            };
            body.extend_from_slice(raw.as_bytes());
        }
        encode_table(INDEX_MAGIC, self.entries.len(), &body)
    }

    /// Decodes and checks the index of a stream object of `stream_len` bytes for a
    /// disk of `virtual_size` bytes: head and checksum, then each entry (kinds,
    /// lengths, ranges in guest order within the disk, records in object order
    /// within the object).
    pub fn decode(bytes: &[u8], virtual_size: u64, stream_len: u64) -> Result<Index, LayoutError> {
        const W: &str = "index";
        let max = usize::try_from(max_index_entries(virtual_size)).unwrap_or(usize::MAX);
        let (count, body) = decode_table(W, INDEX_MAGIC, bytes, INDEX_ENTRY_BYTES, max)?;
        let mut entries = Vec::with_capacity(count);
        let mut guest_end = 0u64;
        let mut object_end = crate::format::stream::STREAM_HEADER_BYTES as u64;
        for (i, chunk) in body.chunks_exact(INDEX_ENTRY_BYTES).enumerate() {
            let raw = RawIndexEntry::read_from_bytes(chunk).map_err(|_| bad(W, "short entry"))?;
            let fail = |why: &str| bad(W, format!("entry {i}: {why}"));
            let kind = match RecordKind::from_byte(raw.kind) {
                Some(k) if k != RecordKind::End => k,
                _ => return Err(fail("unknown record kind")),
            };
            if raw.compressed > 1 || raw.reserved.get() != 0 || raw.reserved2.get() != 0 {
                return Err(fail("reserved bits set"));
            }
            let e = IndexEntry {
                offset: raw.offset.get(),
                length: raw.length.get(),
                kind,
                compressed: raw.compressed == 1,
                object_offset: raw.object_offset.get(),
                stored_len: raw.stored_len.get(),
                crc: raw.crc.get(),
            };
            let end = e
                .offset
                .checked_add(e.length)
                .filter(|&end| e.length > 0 && end <= virtual_size && e.offset >= guest_end)
                .ok_or_else(|| fail("range off the disk or out of order"))?;
            let head = RECORD_HEADER_BYTES as u64;
            let stored = u64::from(e.stored_len);
            let ok_len = if kind == RecordKind::Data {
                e.length <= MAX_DATA
                    && e.offset / MAX_DATA == (end - 1) / MAX_DATA
                    && stored > head
                    && stored <= head + MAX_DATA
                    && (e.compressed || stored == head + e.length)
            } else {
                !e.compressed && stored == head
            };
            if !ok_len {
                return Err(fail("lengths do not fit its kind"));
            }
            let obj_end = e
                .object_offset
                .checked_add(stored)
                .filter(|&o| e.object_offset >= object_end && o <= stream_len)
                .ok_or_else(|| fail("record off the stream object or out of order"))?;
            guest_end = end;
            object_end = obj_end;
            entries.push(e);
        }
        Ok(Index { entries })
    }
}

/// Fixed part of the remote base extension (32 bytes); the endpoint and the store
/// URL follow it.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawRemoteBase {
    version: U32,
    url_len: U16,
    endpoint_len: U16,
    uid: U64,
    cache_bytes: U64,
    reserved: U32,
    crc: U32,
}
const BASE_FIXED: usize = 32;
const _: () = assert!(std::mem::size_of::<RawRemoteBase>() == BASE_FIXED);

/// An image's base in an object store: the header extension [`EXT_REMOTE_BASE`].
///
/// ```
/// use qcowx_core::format::remote::RemoteBase;
///
/// let base = RemoteBase {
///     url: "s3://images/golden".into(),
///     endpoint: "http://127.0.0.1:9000".into(),
///     uid: 77,
///     cache_bytes: 1 << 30,
/// };
/// let data = base.encode();
/// assert_eq!(RemoteBase::decode(&data).unwrap(), base);
/// let mut damaged = data.clone();
/// *damaged.last_mut().unwrap() ^= 1; // a byte of the URL
/// assert!(RemoteBase::decode(&damaged).is_err(), "checksum mismatch");
/// assert!(RemoteBase::decode(&data[..data.len() - 1]).is_err(), "truncated");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBase {
    /// The store: `s3://BUCKET/PREFIX`.
    pub url: String,
    /// The endpoint recorded when the image was made (`http://host:port`; may be
    /// empty), used unless another is given when opening.
    pub endpoint: String,
    /// Identity of the base snapshot.
    pub uid: u64,
    /// Bound of the local cache of what was read, in bytes.
    pub cache_bytes: u64,
}

impl RemoteBase {
    /// The extension's data.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = RawRemoteBase {
            version: REMOTE_VERSION.into(),
            url_len: (self.url.len() as u16).into(),
            endpoint_len: (self.endpoint.len() as u16).into(),
            uid: self.uid.into(),
            cache_bytes: self.cache_bytes.into(),
            reserved: 0.into(),
            crc: 0.into(),
        };
        let mut tail = Vec::new();
        tail.extend_from_slice(self.endpoint.as_bytes());
        tail.extend_from_slice(self.url.as_bytes());
        let mut covered = raw.as_bytes()[..BASE_FIXED - 4].to_vec();
        covered.extend_from_slice(&tail);
        raw.crc = crc32c::crc32c(&covered).into();
        let mut out = raw.as_bytes().to_vec();
        out.extend_from_slice(&tail);
        out
    }

    /// Decodes and checks the extension's data.
    pub fn decode(data: &[u8]) -> Result<RemoteBase, LayoutError> {
        const W: &str = "remote base extension";
        let (raw, tail) = RawRemoteBase::read_from_prefix(data).map_err(|_| bad(W, "too short"))?;
        if raw.version.get() != REMOTE_VERSION {
            return Err(bad(W, format!("version {}", raw.version.get())));
        }
        let (ul, el) = (
            usize::from(raw.url_len.get()),
            usize::from(raw.endpoint_len.get()),
        );
        if ul > MAX_REMOTE_NAME || el > MAX_REMOTE_NAME || tail.len() != ul + el {
            return Err(bad(W, "lengths do not match its data"));
        }
        let mut covered = data[..BASE_FIXED - 4].to_vec();
        covered.extend_from_slice(tail);
        if crc32c::crc32c(&covered) != raw.crc.get() || raw.reserved.get() != 0 {
            return Err(bad(W, "checksum mismatch"));
        }
        let text = |b: &[u8]| {
            std::str::from_utf8(b)
                .map(str::to_string)
                .map_err(|_| bad(W, "a name is not UTF-8"))
        };
        let base = RemoteBase {
            endpoint: text(&tail[..el])?,
            url: text(&tail[el..])?,
            uid: raw.uid.get(),
            cache_bytes: raw.cache_bytes.get(),
        };
        if base.uid < 2 || base.url.is_empty() {
            return Err(bad(W, "no snapshot identity or store"));
        }
        Ok(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(uid: u64, from: u64) -> ManifestEntry {
        ManifestEntry {
            uid,
            from_uid: from,
            virtual_size: 1 << 20,
            created_ns: 1,
            stream_len: 300,
            index_len: 64,
            cluster_size: 65536,
            name: format!("s{uid}"),
        }
    }

    #[test]
    fn manifest_round_trips_and_gives_chains() {
        let m = Manifest {
            entries: vec![entry(5, 0), entry(6, 5), entry(7, 6)],
        };
        let b = m.encode();
        let d = Manifest::decode(&b).unwrap();
        assert_eq!(d, m);
        let chain: Vec<u64> = d.chain(7).unwrap().iter().map(|e| e.uid).collect();
        assert_eq!(chain, [5, 6, 7]);
        for i in 0..b.len() {
            let mut x = b.clone();
            x[i] ^= 1;
            assert!(Manifest::decode(&x).is_err(), "byte {i}");
        }
        let orphan = Manifest {
            entries: vec![entry(6, 5)],
        };
        assert!(Manifest::decode(&orphan.encode()).is_err());
    }

    #[test]
    fn index_checks_ranges_and_bounds() {
        let e = IndexEntry {
            offset: 0,
            length: 4096,
            kind: RecordKind::Data,
            compressed: true,
            object_offset: 216,
            stored_len: 100,
            crc: 9,
        };
        let z = IndexEntry {
            offset: 4096,
            length: 8192,
            kind: RecordKind::Zero,
            compressed: false,
            object_offset: 316,
            stored_len: 40,
            crc: 3,
        };
        let i = Index {
            entries: vec![e, z],
        };
        assert_eq!(Index::decode(&i.encode(), 1 << 20, 400).unwrap(), i);
        // Off the object, off the disk, overlapping.
        assert!(Index::decode(&i.encode(), 1 << 20, 350).is_err());
        assert!(Index::decode(&i.encode(), 8192, 400).is_err());
        let back = Index {
            entries: vec![z, e],
        };
        assert!(Index::decode(&back.encode(), 1 << 20, 400).is_err());
        // An absurd count is refused before anything is read.
        let mut huge = i.encode();
        huge[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Index::decode(&huge, 1 << 20, 400).is_err());
    }

    #[test]
    fn base_extension_round_trips() {
        let b = RemoteBase {
            url: "s3://bkt/golden".into(),
            endpoint: "http://127.0.0.1:9000".into(),
            uid: 77,
            cache_bytes: 1 << 30,
        };
        let d = b.encode();
        assert_eq!(RemoteBase::decode(&d).unwrap(), b);
        let mut x = d.clone();
        x[40] ^= 1;
        assert!(RemoteBase::decode(&x).is_err());
    }
}
