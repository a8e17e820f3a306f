//! The send/receive stream (`spec/stream.md`): a header, records in guest-offset
//! order, and an end record. Bytes ⇄ types only; no I/O. Every field is big-endian.
//!
//! Checksums: each record's `crc` is crc32c over its header bytes before `crc`
//! followed by its payload; the whole stream's checksum chains the record crcs
//! (see [`chain`]) from a seed made of the two snapshot identities, and the end
//! record carries it. A header's own `header_crc` covers the header bytes before it.

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Magic that starts a stream: `QCOWXSND`.
pub const STREAM_MAGIC: [u8; 8] = *b"QCOWXSND";
/// The stream format version this code writes and reads.
pub const STREAM_VERSION: u32 = 1;
/// Most guest bytes one data record covers; data records never cross a multiple of it.
pub const MAX_DATA: u64 = 1 << 20;
/// Longest snapshot name a stream carries.
pub const MAX_STREAM_NAME: usize = 128;

/// The stream header (216 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawStreamHeader {
    /// [`STREAM_MAGIC`].
    pub magic: [u8; 8],
    /// [`STREAM_VERSION`].
    pub version: U32,
    /// Zero (no flags are defined).
    pub flags: U32,
    /// Virtual size of the snapshot sent.
    pub virtual_size: U64,
    /// Cluster size of the sending image.
    pub cluster_size: U32,
    /// Bytes of `name` used.
    pub name_len: U16,
    /// Zero.
    pub reserved: U16,
    /// Identity of the snapshot the stream is relative to (0: a full stream).
    pub from_uid: U64,
    /// Identity of the snapshot sent (never 0).
    pub to_uid: U64,
    /// Creation time of the snapshot sent, nanoseconds since the Unix epoch.
    pub created_ns: U64,
    /// Sequence number of the first record in this stream (0 unless resumed).
    pub start_seq: U64,
    /// Guest offset of the first record in this stream (0 unless resumed).
    pub start_offset: U64,
    /// The whole-stream checksum state before the first record in this stream.
    pub start_crc: U32,
    /// Zero.
    pub reserved2: U32,
    /// Name of the snapshot sent, zero-padded.
    pub name: [u8; MAX_STREAM_NAME],
    /// crc32c of the header bytes before this field.
    pub header_crc: U32,
    /// Zero.
    pub reserved3: U32,
}

/// Bytes of [`RawStreamHeader`].
pub const STREAM_HEADER_BYTES: usize = 216;
const _: () = assert!(std::mem::size_of::<RawStreamHeader>() == STREAM_HEADER_BYTES);
const HEADER_CRC_COVERS: usize = std::mem::offset_of!(RawStreamHeader, header_crc);

/// A record header (40 bytes); a data record's payload follows it.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRecordHeader {
    /// [`RecordKind`] as a byte.
    pub kind: u8,
    /// Data records: 1 if the payload is one zstd frame, 0 if it is the bytes as is.
    pub compressed: u8,
    /// Zero.
    pub reserved: U16,
    /// Bytes of payload that follow (0 except for data records).
    pub payload_len: U32,
    /// Sequence number: 0 for the first record of the stream, then one more each.
    pub seq: U64,
    /// Guest offset the record starts at (end record: 0).
    pub offset: U64,
    /// Guest bytes it covers (end record: the number of records before it).
    pub length: U64,
    /// End record: the whole-stream checksum; otherwise zero.
    pub stream_crc: U32,
    /// crc32c of the bytes before this field, then of the payload.
    pub crc: U32,
}

/// Bytes of [`RawRecordHeader`].
pub const RECORD_HEADER_BYTES: usize = 40;
const _: () = assert!(std::mem::size_of::<RawRecordHeader>() == RECORD_HEADER_BYTES);
const RECORD_CRC_COVERS: usize = std::mem::offset_of!(RawRecordHeader, crc);

/// What a record says about its guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// The range holds the payload's bytes.
    Data,
    /// The range reads as zeros.
    Zero,
    /// The range was discarded (reads as zeros; the receiver may unmap it).
    Discard,
    /// The last record: the stream is complete.
    End,
}

impl RecordKind {
    pub(crate) fn byte(self) -> u8 {
        match self {
            RecordKind::Data => 1,
            RecordKind::Zero => 2,
            RecordKind::Discard => 3,
            RecordKind::End => 4,
        }
    }
    pub(crate) fn from_byte(b: u8) -> Option<RecordKind> {
        Some(match b {
            1 => RecordKind::Data,
            2 => RecordKind::Zero,
            3 => RecordKind::Discard,
            4 => RecordKind::End,
            _ => return None,
        })
    }
}

/// Why stream bytes were refused. `at` is the byte position in the stream as read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The stream does not start with [`STREAM_MAGIC`].
    #[error("not a qcowx stream (magic {found:02x?})")]
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A version this code does not read.
    #[error("stream version {found} is not supported (this qcowx reads version {STREAM_VERSION})")]
    Version {
        /// The version in the header.
        found: u32,
    },
    /// The header's checksum does not match, or a field is invalid.
    #[error("stream header is damaged: {why}")]
    Header {
        /// What is wrong.
        why: String,
    },
    /// The stream ended early.
    #[error("stream truncated at byte {at} ({what})")]
    Truncated {
        /// Bytes read.
        at: u64,
        /// What was being read.
        what: &'static str,
    },
    /// A record's checksum does not match its bytes.
    #[error("record {seq} at stream byte {at}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    RecordChecksum {
        /// Its sequence number as stored.
        seq: u64,
        /// Where it starts.
        at: u64,
        /// crc in the record.
        stored: u32,
        /// crc of the bytes read.
        computed: u32,
    },
    /// A record is not the one expected next (missing, repeated or reordered).
    #[error("record at stream byte {at} is out of order: sequence {found}, expected {expected}")]
    OutOfOrder {
        /// Where it starts.
        at: u64,
        /// Its sequence number.
        found: u64,
        /// The number expected.
        expected: u64,
    },
    /// A record's fields are invalid.
    #[error("record {seq} at stream byte {at} is invalid: {why}")]
    Record {
        /// Its sequence number.
        seq: u64,
        /// Where it starts.
        at: u64,
        /// What is wrong.
        why: String,
    },
    /// The whole-stream checksum in the end record does not match.
    #[error("stream checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    StreamChecksum {
        /// In the end record.
        stored: u32,
        /// Of the records read.
        computed: u32,
    },
    /// Bytes follow the end record.
    #[error("bytes follow the end record at stream byte {at}")]
    TrailingBytes {
        /// Where they start.
        at: u64,
    },
}

/// The decoded header.
///
/// ```
/// use qcowx_core::format::stream::{seed, Position, StreamHeader};
///
/// let h = StreamHeader {
///     virtual_size: 1 << 30,
///     cluster_size: 65536,
///     from_uid: 0,
///     to_uid: 42,
///     created_ns: 1,
///     name: "nightly".into(),
///     start: Position { seq: 0, offset: 0, crc: seed(0, 42) },
/// };
/// let bytes = h.encode();
/// assert_eq!(&bytes[..8], b"QCOWXSND");
/// assert_eq!(StreamHeader::decode(&bytes).unwrap(), h);
/// let mut bad = bytes;
/// bad[20] ^= 1;
/// assert!(StreamHeader::decode(&bad).is_err(), "its checksum catches a flipped bit");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// Virtual size of the snapshot.
    pub virtual_size: u64,
    /// Cluster size of the sending image.
    pub cluster_size: u32,
    /// Base snapshot identity (0: full stream).
    pub from_uid: u64,
    /// Identity of the snapshot sent.
    pub to_uid: u64,
    /// Its creation time.
    pub created_ns: u64,
    /// Its name.
    pub name: String,
    /// Where this stream starts: record sequence number, guest offset and checksum state.
    pub start: Position,
}

/// A place in a stream: the next record's sequence number and guest offset, and the
/// whole-stream checksum of the records before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Sequence number of the next record.
    pub seq: u64,
    /// Guest offset at which the next record starts (or later).
    pub offset: u64,
    /// Whole-stream checksum state.
    pub crc: u32,
}

/// The whole-stream checksum's seed for a stream from `from_uid` to `to_uid`.
///
/// ```
/// use qcowx_core::format::stream::seed;
///
/// assert_ne!(seed(0, 42), seed(42, 0), "the direction matters");
/// ```
pub fn seed(from_uid: u64, to_uid: u64) -> u32 {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&to_uid.to_be_bytes());
    b[8..].copy_from_slice(&from_uid.to_be_bytes());
    crc32c::crc32c(&b)
}

/// The whole-stream checksum after a record whose `crc` is `record_crc`.
///
/// ```
/// use qcowx_core::format::stream::{chain, seed};
///
/// let s = seed(1, 2);
/// assert_ne!(chain(chain(s, 10), 20), chain(chain(s, 20), 10), "order matters");
/// ```
pub fn chain(state: u32, record_crc: u32) -> u32 {
    crc32c::crc32c_append(state, &record_crc.to_be_bytes())
}

impl StreamHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; STREAM_HEADER_BYTES] {
        let mut name = [0u8; MAX_STREAM_NAME];
        let n = self.name.len().min(MAX_STREAM_NAME);
        name[..n].copy_from_slice(&self.name.as_bytes()[..n]);
        let mut raw = RawStreamHeader {
            magic: STREAM_MAGIC,
            version: STREAM_VERSION.into(),
            flags: 0.into(),
            virtual_size: self.virtual_size.into(),
            cluster_size: self.cluster_size.into(),
            name_len: (n as u16).into(),
            reserved: 0.into(),
            from_uid: self.from_uid.into(),
            to_uid: self.to_uid.into(),
            created_ns: self.created_ns.into(),
            start_seq: self.start.seq.into(),
            start_offset: self.start.offset.into(),
            start_crc: self.start.crc.into(),
            reserved2: 0.into(),
            name,
            header_crc: 0.into(),
            reserved3: 0.into(),
        };
        raw.header_crc = crc32c::crc32c(&raw.as_bytes()[..HEADER_CRC_COVERS]).into();
        let mut out = [0u8; STREAM_HEADER_BYTES];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Decodes and checks a header: magic, version, checksum, then the fields.
    pub fn decode(bytes: &[u8; STREAM_HEADER_BYTES]) -> Result<StreamHeader, StreamError> {
        let raw = RawStreamHeader::read_from_bytes(bytes).map_err(|_| StreamError::Header {
            why: "wrong length".into(),
        })?;
        if raw.magic != STREAM_MAGIC {
            return Err(StreamError::BadMagic { found: raw.magic });
        }
        if raw.version.get() != STREAM_VERSION {
            return Err(StreamError::Version {
                found: raw.version.get(),
            });
        }
        let bad = |why: &str| StreamError::Header { why: why.into() };
        if crc32c::crc32c(&bytes[..HEADER_CRC_COVERS]) != raw.header_crc.get() {
            return Err(bad("checksum mismatch"));
        }
        if raw.flags.get() != 0 {
            return Err(bad("unknown flags"));
        }
        if raw.reserved.get() != 0 || raw.reserved2.get() != 0 || raw.reserved3.get() != 0 {
            return Err(bad("reserved fields set"));
        }
        let cs = raw.cluster_size.get();
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(bad(
                "cluster size is not a power of two from 512 B to 2 MiB",
            ));
        }
        if raw.to_uid.get() < 2 || raw.from_uid.get() == 1 || raw.to_uid.get() == raw.from_uid.get()
        {
            return Err(bad("invalid snapshot identity"));
        }
        let n = usize::from(raw.name_len.get());
        let name = raw
            .name
            .get(..n)
            .and_then(|b| std::str::from_utf8(b).ok())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("invalid snapshot name"))?;
        let size = raw.virtual_size.get();
        if size == 0 || size % 512 != 0 || size > crate::format::header::MAX_VIRTUAL_SIZE {
            return Err(bad("virtual size is 0, not a multiple of 512 or past 2^56"));
        }
        if raw.start_offset.get() > raw.virtual_size.get() {
            return Err(bad("start offset past the disk"));
        }
        Ok(StreamHeader {
            virtual_size: raw.virtual_size.get(),
            cluster_size: cs,
            from_uid: raw.from_uid.get(),
            to_uid: raw.to_uid.get(),
            created_ns: raw.created_ns.get(),
            name: name.to_string(),
            start: Position {
                seq: raw.start_seq.get(),
                offset: raw.start_offset.get(),
                crc: raw.start_crc.get(),
            },
        })
    }
}

/// A decoded record header (its payload is read separately, `payload_len` bytes).
///
/// ```
/// use qcowx_core::format::stream::{chain, seed, RecordHeader, RecordKind};
///
/// let payload = b"guest bytes";
/// let rec = RecordHeader {
///     kind: RecordKind::Data,
///     compressed: false,
///     payload_len: payload.len() as u32,
///     seq: 0,
///     offset: 65536,
///     length: payload.len() as u64,
///     stream_crc: 0,
///     crc: 0, // encode computes it
/// };
/// let bytes = rec.encode(payload);
/// let back = RecordHeader::decode(&bytes, 216).unwrap();
/// assert_eq!((back.kind, back.offset, back.payload_len), (RecordKind::Data, 65536, 11));
/// assert_eq!(back.crc, RecordHeader::computed_crc(&bytes, payload));
/// assert_ne!(back.crc, RecordHeader::computed_crc(&bytes, b"other bytes"));
/// // The whole-stream checksum: seeded by the two identities, chained record by record.
/// let state = chain(seed(0, 42), back.crc);
/// assert_ne!(state, seed(0, 42));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record is.
    pub kind: RecordKind,
    /// Whether the payload is a zstd frame.
    pub compressed: bool,
    /// Payload bytes that follow.
    pub payload_len: u32,
    /// Sequence number.
    pub seq: u64,
    /// Guest offset.
    pub offset: u64,
    /// Guest bytes covered (end record: the number of records before it).
    pub length: u64,
    /// End record: the whole-stream checksum.
    pub stream_crc: u32,
    /// The stored record checksum.
    pub crc: u32,
}

impl RecordHeader {
    /// The record's header bytes, with `crc` computed over them and `payload`.
    pub fn encode(&self, payload: &[u8]) -> [u8; RECORD_HEADER_BYTES] {
        let mut raw = RawRecordHeader {
            kind: self.kind.byte(),
            compressed: u8::from(self.compressed),
            reserved: 0.into(),
            payload_len: (payload.len() as u32).into(),
            seq: self.seq.into(),
            offset: self.offset.into(),
            length: self.length.into(),
            stream_crc: self.stream_crc.into(),
            crc: 0.into(),
        };
        raw.crc = record_crc(&raw.as_bytes()[..RECORD_CRC_COVERS], payload).into();
        let mut out = [0u8; RECORD_HEADER_BYTES];
        out.copy_from_slice(raw.as_bytes());
        out
    }

    /// Decodes a record header, checking only what needs no payload and no context:
    /// the kind, the reserved fields and the payload length cap. `at` is where it
    /// starts in the stream, for errors.
    pub fn decode(bytes: &[u8; RECORD_HEADER_BYTES], at: u64) -> Result<RecordHeader, StreamError> {
        let raw = RawRecordHeader::read_from_bytes(bytes).map_err(|_| StreamError::Truncated {
            at,
            what: "record header",
        })?;
        let seq = raw.seq.get();
        let bad = |why: String| StreamError::Record { seq, at, why };
        let kind = RecordKind::from_byte(raw.kind)
            .ok_or_else(|| bad(format!("unknown record kind {}", raw.kind)))?;
        if raw.compressed > 1 || raw.reserved.get() != 0 {
            return Err(bad("reserved bits set".into()));
        }
        let payload_len = raw.payload_len.get();
        let cap = if kind == RecordKind::Data {
            MAX_DATA
        } else {
            0
        };
        if u64::from(payload_len) > cap {
            return Err(bad(format!(
                "payload of {payload_len} bytes (at most {cap} for this kind)"
            )));
        }
        Ok(RecordHeader {
            kind,
            compressed: raw.compressed == 1,
            payload_len,
            seq,
            offset: raw.offset.get(),
            length: raw.length.get(),
            stream_crc: raw.stream_crc.get(),
            crc: raw.crc.get(),
        })
    }

    /// The checksum a record with header `bytes` and `payload` must carry.
    pub fn computed_crc(bytes: &[u8; RECORD_HEADER_BYTES], payload: &[u8]) -> u32 {
        record_crc(&bytes[..RECORD_CRC_COVERS], payload)
    }
}

fn record_crc(head: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(head), payload)
}

/// The guest bytes of data record `rec` (whose crc verified) with payload `payload`,
/// into `out` (exactly `rec.length` bytes): checks that the range does not cross a
/// multiple of [`MAX_DATA`], then decompresses the payload or takes it as is. The one
/// decoder of data records: a receive and a read of a stream object use it.
///
/// ```
/// use qcowx_core::format::stream::{compress_data, record_data, RecordHeader, RecordKind};
///
/// let guest = vec![7u8; 65536];
/// let frame = compress_data(&guest).expect("smaller");
/// let rec = RecordHeader {
///     kind: RecordKind::Data,
///     compressed: true,
///     payload_len: frame.len() as u32,
///     seq: 0,
///     offset: 1 << 20,
///     length: guest.len() as u64,
///     stream_crc: 0,
///     crc: 0,
/// };
/// let mut out = Vec::new();
/// record_data(&rec, &frame, &mut out).unwrap();
/// assert_eq!(out, guest);
/// // A truncated frame, or a range across a 1 MiB boundary, is refused.
/// assert!(record_data(&rec, &frame[..frame.len() - 1], &mut out).is_err());
/// let across = RecordHeader { offset: (1 << 20) - 512, ..rec };
/// assert!(record_data(&across, &frame, &mut out).is_err());
/// ```
pub fn record_data(rec: &RecordHeader, payload: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let end = rec
        .offset
        .checked_add(rec.length)
        .filter(|_| rec.length > 0)
        .ok_or("empty or overflowing range")?;
    if rec.length > MAX_DATA || rec.offset / MAX_DATA != (end - 1) / MAX_DATA {
        return Err("data record crosses a 1 MiB boundary".into());
    }
    out.resize(rec.length as usize, 0);
    if rec.compressed {
        decompress_data(payload, out).map_err(|e| format!("payload does not decompress: {e}"))
    } else if payload.len() as u64 != rec.length {
        Err("payload length differs from the range's".into())
    } else {
        out.copy_from_slice(payload);
        Ok(())
    }
}

/// Compresses a data record's bytes: `Some(frame)` when that is smaller.
///
/// ```
/// use qcowx_core::format::stream::{compress_data, decompress_data};
///
/// let data = vec![9u8; 1 << 20];
/// let frame = compress_data(&data).expect("smaller");
/// let mut out = vec![0u8; data.len()];
/// decompress_data(&frame, &mut out).unwrap();
/// assert_eq!(out, data);
/// assert!(decompress_data(&frame[..frame.len() - 1], &mut out).is_err());
/// ```
pub fn compress_data(data: &[u8]) -> Option<Vec<u8>> {
    crate::format::compress::compress_zstd(data)
}

/// Decompresses a data record's frame into exactly `out.len()` bytes.
///
/// ```
/// use qcowx_core::format::stream::decompress_data;
///
/// assert!(decompress_data(b"not a zstd frame", &mut [0u8; 16]).is_err());
/// ```
pub fn decompress_data(frame: &[u8], out: &mut [u8]) -> Result<(), String> {
    crate::format::compress::decompress_zstd(frame, out).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> StreamHeader {
        StreamHeader {
            virtual_size: 1 << 30,
            cluster_size: 65536,
            from_uid: 7,
            to_uid: 9,
            created_ns: 5,
            name: "s1".into(),
            start: Position {
                seq: 0,
                offset: 0,
                crc: seed(7, 9),
            },
        }
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = header();
        let b = h.encode();
        assert_eq!(StreamHeader::decode(&b).unwrap(), h);
        for i in 0..STREAM_HEADER_BYTES {
            let mut d = b;
            d[i] ^= 0x10;
            assert!(StreamHeader::decode(&d).is_err(), "byte {i}");
        }
        let mut v = b;
        v[11] = 2;
        assert_eq!(
            StreamHeader::decode(&v),
            Err(StreamError::Version { found: 2 })
        );
    }

    #[test]
    fn header_refuses_sizes_a_receiver_cannot_hold() {
        for size in [0, 1000, 1 << 60] {
            let mut h = header();
            h.virtual_size = size;
            assert!(
                matches!(
                    StreamHeader::decode(&h.encode()),
                    Err(StreamError::Header { .. })
                ),
                "{size}"
            );
        }
    }

    #[test]
    fn record_round_trips_and_caps_payload() {
        let r = RecordHeader {
            kind: RecordKind::Data,
            compressed: false,
            payload_len: 3,
            seq: 4,
            offset: 65536,
            length: 3,
            stream_crc: 0,
            crc: 0,
        };
        let b = r.encode(b"abc");
        let d = RecordHeader::decode(&b, 0).unwrap();
        assert_eq!(d.crc, RecordHeader::computed_crc(&b, b"abc"));
        assert_ne!(d.crc, RecordHeader::computed_crc(&b, b"abd"));
        let mut big = b;
        big[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            RecordHeader::decode(&big, 0),
            Err(StreamError::Record { .. })
        ));
    }
}
