//! Writing a stream: the plan of records from the tree diff (or, for a full stream,
//! the snapshot's allocated extents), then the records themselves.

use std::io::Write;
use std::sync::Arc;

use super::{Mismatch, ResumeToken};
use crate::engine::{ExtentStatus, Image};
use crate::error::{Error, Result};
use crate::format::compress::likely_compressible;
use crate::format::remote::{Index, IndexEntry};
use crate::format::stream::*;
use crate::vdi::{RootInfo, RootKind};

/// What to send besides the snapshot.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Send only what changed since this snapshot (an incremental stream).
    pub from: Option<String>,
    /// Start where a stopped receive needs it ([`super::resume_token`]).
    pub resume: Option<ResumeToken>,
}

/// What [`send`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Records written (the end record included).
    pub records: u64,
    /// Guest bytes sent as data.
    pub data_bytes: u64,
    /// Guest bytes sent as zero or discard records.
    pub zero_bytes: u64,
    /// Bytes of stream written.
    pub stream_bytes: u64,
}

/// One record to send.
#[derive(Debug, Clone, Copy)]
struct Planned {
    kind: RecordKind,
    offset: u64,
    length: u64,
}

fn find_snapshot(image: &Image, name: &str) -> Result<RootInfo> {
    let roots = image.list()?;
    if roots
        .iter()
        .any(|r| r.kind == RootKind::Vdi && r.name == name)
    {
        return Err(Error::InvalidArgument(format!(
            "{}: '{name}' is a VDI, which changes as it is written: send a snapshot of it \
             (qcowx snapshot --vdi {name} FILE NAME)",
            image.file_name()
        )));
    }
    roots
        .into_iter()
        .find(|r| r.kind == RootKind::Snapshot && r.name == name)
        .ok_or_else(|| Error::NotFound {
            file: image.file_name().to_string(),
            what: "snapshot".into(),
            name: name.to_string(),
        })
}

/// Writes snapshot `snapshot` of `image` as a stream to `out` (see the module docs).
/// A VDI is sent by taking a snapshot of it first.
///
/// A full stream, then an incremental one, from one image into another.
///
/// ```
/// use std::sync::Arc;
/// use qcowx_core::stream::{receive, send, ReceiveOptions, SendOptions};
/// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let src = Arc::new(Image::create(dir.path().join("src.qcow2"), &CreateOptions::new(1 << 20))?);
/// src.write_at(&[1; 65536], 0)?;
/// src.snapshot(DEFAULT_VDI, "mon")?;
/// src.write_at(&[2; 65536], 65536)?;
/// src.snapshot(DEFAULT_VDI, "tue")?;
///
/// let mut full = Vec::new();
/// let sent = send(&src, "mon", &SendOptions::default(), &mut full)?;
/// assert_eq!(sent.data_bytes, 65536);
/// let mut since_mon = Vec::new();
/// let opts = SendOptions { from: Some("mon".into()), ..SendOptions::default() };
/// let sent = send(&src, "tue", &opts, &mut since_mon)?;
/// assert_eq!(sent.data_bytes, 65536, "only the cluster written since");
///
/// // The replica is created by the first receive.
/// let dst = dir.path().join("replica.qcow2");
/// receive(&dst, &mut &full[..], &ReceiveOptions::default())?;
/// let report = receive(&dst, &mut &since_mon[..], &ReceiveOptions::default())?;
/// assert!(report.incremental);
/// let replica = Arc::new(Image::open(&dst)?);
/// let mut buf = [0u8; 2];
/// replica.open_root("tue")?.read_at(&mut buf, 65535)?;
/// assert_eq!(buf, [1, 2]);
/// # Ok(()) }
/// ```
pub fn send(
    image: &Arc<Image>,
    snapshot: &str,
    opts: &SendOptions,
    out: &mut dyn Write,
) -> Result<SendReport> {
    send_records(image, snapshot, opts, out, &mut |_| {})
}

/// [`send`], also returning the stream's index: where each record is in the stream
/// and what it says (for an object store, `spec/remote.md`).
///
/// ```
/// use std::sync::Arc;
/// use qcowx_core::format::remote::Index;
/// use qcowx_core::format::stream::{RecordHeader, RecordKind, RECORD_HEADER_BYTES};
/// use qcowx_core::stream::{send_indexed, SendOptions};
/// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let file = dir.path().join("a.qcow2");
/// let image = Arc::new(Image::create(file, &CreateOptions::new(4 << 20))?);
/// image.write_at(&[1; 65536], 0)?;
/// image.write_at(&[2; 65536], 2 << 20)?;
/// image.snapshot(DEFAULT_VDI, "mon")?;
///
/// let mut stream = Vec::new();
/// let (sent, index) = send_indexed(&image, "mon", &SendOptions::default(), &mut stream)?;
/// assert_eq!(sent.stream_bytes, stream.len() as u64);
/// // One entry per record but the end record, in guest order.
/// assert_eq!(index.entries.len() as u64, sent.records - 1);
/// let offsets: Vec<u64> = index.entries.iter().map(|e| e.offset).collect();
/// assert_eq!(offsets, [0, 2 << 20]);
/// for e in &index.entries {
///     // Each entry points at its record's header in the stream.
///     let at = e.object_offset as usize;
///     assert!(at + e.stored_len as usize <= stream.len());
///     let head = stream[at..at + RECORD_HEADER_BYTES].try_into().unwrap();
///     let rec = RecordHeader::decode(head, e.object_offset).unwrap();
///     assert_eq!(rec.kind, RecordKind::Data);
///     assert_eq!((rec.offset, rec.length, rec.crc), (e.offset, e.length, e.crc));
/// }
/// // Its bytes, as a store keeps them beside the stream, check against the stream.
/// let bytes = index.encode();
/// assert_eq!(Index::decode(&bytes, 4 << 20, stream.len() as u64).unwrap(), index);
/// # Ok(()) }
/// ```
pub fn send_indexed(
    image: &Arc<Image>,
    snapshot: &str,
    opts: &SendOptions,
    out: &mut dyn Write,
) -> Result<(SendReport, Index)> {
    let mut index = Index::default();
    let report = send_records(image, snapshot, opts, out, &mut |e| index.entries.push(e))?;
    Ok((report, index))
}

fn send_records(
    image: &Arc<Image>,
    snapshot: &str,
    opts: &SendOptions,
    out: &mut dyn Write,
    on_record: &mut dyn FnMut(IndexEntry),
) -> Result<SendReport> {
    let to = find_snapshot(image, snapshot)?;
    let from = match &opts.from {
        Some(f) => Some(find_snapshot(image, f)?),
        None => None,
    };
    let from_uid = from.as_ref().map_or(0, |f| f.uid);
    if let Some(f) = &from {
        if f.size != to.size {
            return Err(Error::InvalidArgument(format!(
                "{}: snapshot '{}' is {} bytes and '{}' {} bytes: an incremental stream needs \
                 equal sizes",
                image.file_name(),
                f.name,
                f.size,
                to.name,
                to.size
            )));
        }
    }
    let disk = image.open_root(snapshot)?;
    let plan = plan(
        image,
        &disk,
        from.as_ref().map(|f| f.name.as_str()),
        to.size,
    )?;

    let seed_crc = seed(from_uid, to.uid);
    let start = match &opts.resume {
        None => Position {
            seq: 0,
            offset: 0,
            crc: seed_crc,
        },
        Some(t) => check_token(image, t, &plan, from_uid, to.uid)?,
    };
    let header = StreamHeader {
        virtual_size: to.size,
        cluster_size: image.cluster_size() as u32,
        from_uid,
        to_uid: to.uid,
        created_ns: to.created_ns,
        name: to.name.clone(),
        start,
    };
    let mut report = SendReport::default();
    let io = |e: std::io::Error| Error::Io {
        file: "stream output".into(),
        op: "write stream",
        offset: 0,
        source: e,
    };
    let mut put = |bytes: &[u8], report: &mut SendReport| -> Result<()> {
        report.stream_bytes += bytes.len() as u64;
        out.write_all(bytes).map_err(io)
    };
    put(&header.encode(), &mut report)?;
    let mut crc = start.crc;
    let mut buf = crate::storage::io_buf(0);
    let mut ahead = ReadAhead {
        next: start.seq as usize,
        bytes: 0,
    };
    for (seq, p) in plan.iter().enumerate().skip(start.seq as usize) {
        ahead.advance(&disk, &plan, seq)?;
        let mut kind = p.kind;
        // The compressed frame, when the record is sent compressed.
        let mut frame: Option<Vec<u8>> = None;
        if kind == RecordKind::Data {
            buf.resize(p.length as usize, 0);
            disk.read_at(&mut buf, p.offset)?;
            ahead.bytes -= p.length;
            if buf.iter().all(|&b| b == 0) {
                kind = RecordKind::Zero;
            } else if worth_compressing(&buf) {
                frame = compress_data(&buf);
            }
        }
        let compressed = frame.is_some();
        let payload: &[u8] = match (&frame, kind) {
            (Some(f), _) => f,
            (None, RecordKind::Data) => &buf,
            _ => &[],
        };
        match kind {
            RecordKind::Data => report.data_bytes += p.length,
            _ => report.zero_bytes += p.length,
        }
        let rec = RecordHeader {
            kind,
            compressed,
            payload_len: payload.len() as u32,
            seq: seq as u64,
            offset: p.offset,
            length: p.length,
            stream_crc: 0,
            crc: 0,
        };
        let head = rec.encode(payload);
        let rec_crc = RecordHeader::computed_crc(&head, payload);
        crc = chain(crc, rec_crc);
        on_record(IndexEntry {
            offset: p.offset,
            length: p.length,
            kind,
            compressed,
            object_offset: report.stream_bytes,
            stored_len: (head.len() + payload.len()) as u32,
            crc: rec_crc,
        });
        put(&head, &mut report)?;
        put(payload, &mut report)?;
        report.records += 1;
    }
    let end = RecordHeader {
        kind: RecordKind::End,
        compressed: false,
        payload_len: 0,
        seq: plan.len() as u64,
        offset: 0,
        length: plan.len() as u64,
        stream_crc: crc,
        crc: 0,
    };
    put(&end.encode(&[]), &mut report)?;
    report.records += 1;
    out.flush().map_err(io)?;
    Ok(report)
}

/// How far ahead of the record being read the sender names data records to the
/// disk ([`crate::Disk::prefetch`]): the reads of the changed clusters, scattered
/// over the file, then overlap instead of waiting one after another.
const READ_AHEAD_BYTES: u64 = 32 << 20;

/// The data records named to the disk ahead of the one being read.
struct ReadAhead {
    /// The first record not named yet.
    next: usize,
    /// Bytes of data records named and not read yet.
    bytes: u64,
}

impl ReadAhead {
    /// Names records from `seq` on until [`READ_AHEAD_BYTES`] are ahead.
    fn advance(&mut self, disk: &crate::Disk, plan: &[Planned], seq: usize) -> Result<()> {
        while self.next < plan.len() && (self.next <= seq || self.bytes < READ_AHEAD_BYTES) {
            let q = &plan[self.next];
            if q.kind == RecordKind::Data {
                disk.prefetch(q.offset, q.length)?;
                self.bytes += q.length;
            }
            self.next += 1;
        }
        Ok(())
    }
}

/// Whether compressing `data` may pay: short records are simply tried; longer ones
/// only when a sample suggests they shrink by about an eighth
/// ([`likely_compressible`]). Data that does not (already compressed or encrypted)
/// is sent as is, without spending the compressor's time on it.
fn worth_compressing(data: &[u8]) -> bool {
    data.len() <= 8192 || likely_compressible(data)
}

fn check_token(
    image: &Image,
    t: &ResumeToken,
    plan: &[Planned],
    from_uid: u64,
    to_uid: u64,
) -> Result<Position> {
    let bad = |why: String| Error::StreamMismatch {
        file: image.file_name().to_string(),
        source: Mismatch::Token {
            token: t.to_string(),
            why,
        },
    };
    if t.to_uid != to_uid || t.from_uid != from_uid {
        return Err(bad("it is for a stream of other snapshots".into()));
    }
    let seq = t.next.seq;
    // The token's offset is the end of the last record the receiver has.
    let end_before = match seq.checked_sub(1) {
        None => 0,
        Some(prev) => match usize::try_from(prev).ok().and_then(|p| plan.get(p)) {
            Some(p) => p.offset + p.length,
            None => return Err(bad(format!("the stream has {} records", plan.len()))),
        },
    };
    if end_before != t.next.offset {
        return Err(bad(format!(
            "record {seq} follows guest offset {end_before:#x}, not {:#x}",
            t.next.offset
        )));
    }
    Ok(t.next)
}

/// The records of a stream, in guest order: data records never cross a multiple of
/// [`MAX_DATA`]; zero and discard records cover whole runs.
fn plan(image: &Image, disk: &crate::Disk, from: Option<&str>, size: u64) -> Result<Vec<Planned>> {
    let backed = image.backing().is_some();
    let ranges: Vec<(u64, u64)> = match from {
        Some(f) => image
            .diff(f, disk.name())?
            .into_iter()
            .map(|r| (r.offset, r.length))
            .collect(),
        None => vec![(0, size)],
    };
    let mut out: Vec<Planned> = Vec::new();
    for (offset, length) in ranges {
        for e in disk.block_status(offset, length)? {
            let kind = match e.status {
                ExtentStatus::Data => RecordKind::Data,
                ExtentStatus::Unallocated if backed => RecordKind::Data,
                // A full stream starts from an empty disk: zeros need no record.
                _ if from.is_none() => continue,
                ExtentStatus::Zero | ExtentStatus::AllocatedZero => RecordKind::Zero,
                ExtentStatus::Unallocated => RecordKind::Discard,
            };
            if kind != RecordKind::Data {
                match out.last_mut() {
                    Some(p) if p.kind == kind && p.offset + p.length == e.offset => {
                        p.length += e.length
                    }
                    _ => out.push(Planned {
                        kind,
                        offset: e.offset,
                        length: e.length,
                    }),
                }
                continue;
            }
            let (mut at, end) = (e.offset, e.offset + e.length);
            while at < end {
                let next = ((at / MAX_DATA + 1) * MAX_DATA).min(end);
                match out.last_mut() {
                    // Extend the previous data record up to the boundary.
                    Some(p)
                        if p.kind == RecordKind::Data
                            && p.offset + p.length == at
                            && p.offset / MAX_DATA == at / MAX_DATA =>
                    {
                        p.length += next - at
                    }
                    _ => out.push(Planned {
                        kind,
                        offset: at,
                        length: next - at,
                    }),
                }
                at = next;
            }
        }
    }
    Ok(out)
}
