//! Receiving a stream: checked against the image, written into a hidden staging VDI,
//! committed as a snapshot with the sender's identity once it all verified.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use super::progress::{sync_dir, Progress};
use super::{Mismatch, ResumeToken};
use crate::engine::{CreateOptions, Image, OpenOptions};
use crate::error::{Error, Result};
use crate::format::stream::*;
use crate::vdi::staging::{staging_name, Given};
use crate::vdi::{Disk, RootInfo};

/// How to receive.
#[derive(Debug, Clone, Default)]
pub struct ReceiveOptions {
    /// Name the snapshot this instead of the sender's name.
    pub name: Option<String>,
    /// Make progress durable after this many guest bytes applied (0: 32 MiB).
    pub checkpoint_bytes: u64,
}

/// What [`receive`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveReport {
    /// The received snapshot.
    pub snapshot: RootInfo,
    /// Whether the image file was created.
    pub created: bool,
    /// Records applied in this run.
    pub applied: u64,
    /// Records already applied by an earlier run that stopped, checked and skipped.
    pub skipped: u64,
    /// Whether the stream was an incremental one.
    pub incremental: bool,
}

fn stream_err(file: &Path, source: StreamError) -> Error {
    Error::Stream {
        file: file.display().to_string(),
        source,
    }
}

fn mismatch(file: &Path, source: Mismatch) -> Error {
    Error::StreamMismatch {
        file: file.display().to_string(),
        source,
    }
}

/// Counts what was read, for error positions.
struct Counted<'a> {
    inner: &'a mut dyn Read,
    at: u64,
}

impl Counted<'_> {
    /// Reads exactly `buf.len()` bytes; a short read is [`StreamError::Truncated`].
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> std::result::Result<(), ReadFail> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => {
                    return Err(ReadFail::Stream(StreamError::Truncated {
                        at: self.at + done as u64,
                        what,
                    }))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadFail::Io(e)),
            }
        }
        self.at += buf.len() as u64;
        Ok(())
    }
}

enum ReadFail {
    Stream(StreamError),
    Io(std::io::Error),
}

fn read_fail(file: &Path, f: ReadFail) -> Error {
    match f {
        ReadFail::Stream(s) => stream_err(file, s),
        ReadFail::Io(e) => Error::Io {
            file: "stream input".into(),
            op: "read stream",
            offset: 0,
            source: e,
        },
    }
}

/// The resume token of the receive in progress in the image at `path`, if any.
///
/// A receive cut short leaves its progress; the token tells the sender where to start,
/// [`abort`] drops it.
///
/// ```
/// use std::sync::Arc;
/// use qcowx_core::stream::{abort, progress_path, receive, resume_token, send, ReceiveOptions, SendOptions};
/// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let src = Arc::new(Image::create(dir.path().join("src.qcow2"), &CreateOptions::new(8 << 20))?);
/// let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
/// src.write_at(&data, 0)?;
/// src.snapshot(DEFAULT_VDI, "s")?;
/// let mut stream = Vec::new();
/// send(&src, "s", &SendOptions::default(), &mut stream)?;
///
/// let dst = dir.path().join("dst.qcow2");
/// let opts = ReceiveOptions { checkpoint_bytes: 1 << 20, ..ReceiveOptions::default() };
/// let cut = &stream[..stream.len() * 3 / 4];
/// assert!(receive(&dst, &mut &cut[..], &opts).is_err());
/// assert!(progress_path(&dst).exists());
/// let token = resume_token(&dst)?.expect("a receive in progress");
/// assert!(token.next.seq > 0);
///
/// // Send from the token, and the receive completes.
/// let rest = SendOptions { resume: Some(token), ..SendOptions::default() };
/// let mut tail = Vec::new();
/// send(&src, "s", &rest, &mut tail)?;
/// assert!(tail.len() < stream.len());
/// receive(&dst, &mut &tail[..], &opts)?;
/// assert_eq!(resume_token(&dst)?, None);
/// assert!(!abort(&dst)?, "nothing left to abort");
/// # Ok(()) }
/// ```
pub fn resume_token(path: &Path) -> Result<Option<ResumeToken>> {
    Ok(Progress::load(path)?.map(|p| p.token()))
}

/// Drops the receive in progress in the image at `path`: its staging VDI (collected
/// at once, so the snapshot table is as before the receive) and its progress.
/// Returns whether there was one.
///
/// ```
/// use std::sync::Arc;
/// use qcowx_core::stream::{abort, receive, resume_token, send, ReceiveOptions, SendOptions};
/// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let src = Arc::new(Image::create(dir.path().join("src.qcow2"), &CreateOptions::new(4 << 20))?);
/// let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
/// src.write_at(&data, 0)?;
/// src.snapshot(DEFAULT_VDI, "s")?;
/// let mut stream = Vec::new();
/// send(&src, "s", &SendOptions::default(), &mut stream)?;
///
/// let dst = dir.path().join("dst.qcow2");
/// let opts = ReceiveOptions { checkpoint_bytes: 1 << 20, ..ReceiveOptions::default() };
/// assert!(receive(&dst, &mut &stream[..stream.len() / 2], &opts).is_err());
/// assert!(resume_token(&dst)?.is_some());
/// assert!(abort(&dst)?);
/// assert_eq!(resume_token(&dst)?, None);
/// let names: Vec<String> = Image::open(&dst)?.list()?.into_iter().map(|r| r.name).collect();
/// assert_eq!(names, [DEFAULT_VDI]);
/// # Ok(()) }
/// ```
pub fn abort(path: &Path) -> Result<bool> {
    let Some(p) = Progress::load(path)? else {
        return Ok(false);
    };
    let image = OpenOptions::new().write(true).open(path)?;
    let staging = staging_name(p.to_uid);
    if image.has_vdi(&staging)? {
        image.delete_vdi(&staging)?;
        // Gone from the snapshot table too, as QEMU sees it (O(metadata)).
        image.gc()?;
    }
    image.close()?;
    Progress::remove(path)?;
    Ok(true)
}

/// Receives the stream `input` into the image at `path` (created, with the stream's
/// size and cluster size, when missing and the stream is a full one).
///
/// On any error the image's snapshots and VDIs are as they were; the records applied
/// so far stay in the hidden staging VDI, and the progress file says where to
/// resume (run again with the same stream, or ask the sender for a stream from
/// [`resume_token`]); [`abort`] drops them.
///
/// ```
/// use std::sync::Arc;
/// use qcowx_core::stream::{receive, send, ReceiveOptions, SendOptions};
/// use qcowx_core::{CreateOptions, Error, Image, DEFAULT_VDI};
///
/// # fn main() -> Result<(), Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let src = Arc::new(Image::create(dir.path().join("src.qcow2"), &CreateOptions::new(1 << 20))?);
/// src.write_at(b"payload", 0)?;
/// src.snapshot(DEFAULT_VDI, "s")?;
/// let mut stream = Vec::new();
/// send(&src, "s", &SendOptions::default(), &mut stream)?;
///
/// let dst = dir.path().join("dst.qcow2");
/// let opts = ReceiveOptions { name: Some("from-src".into()), ..ReceiveOptions::default() };
/// let report = receive(&dst, &mut &stream[..], &opts)?;
/// assert!(report.created && !report.incremental);
/// assert_eq!(report.snapshot.name, "from-src");
/// // The same snapshot twice is refused; the image is as it was.
/// let again = receive(&dst, &mut &stream[..], &opts).unwrap_err();
/// assert!(matches!(again, Error::StreamMismatch { .. }));
/// // A damaged stream is refused too.
/// let mut bad = stream.clone();
/// let mid = bad.len() / 2;
/// bad[mid] ^= 1;
/// assert!(receive(&dir.path().join("other.qcow2"), &mut &bad[..], &ReceiveOptions::default()).is_err());
/// # Ok(()) }
/// ```
pub fn receive(path: &Path, input: &mut dyn Read, opts: &ReceiveOptions) -> Result<ReceiveReport> {
    let mut r = Counted {
        inner: input,
        at: 0,
    };
    let mut hb = [0u8; STREAM_HEADER_BYTES];
    r.fill(&mut hb, "header").map_err(|f| read_fail(path, f))?;
    let h = StreamHeader::decode(&hb).map_err(|e| stream_err(path, e))?;
    let name = opts.name.clone().unwrap_or_else(|| h.name.clone());
    crate::vdi::validate_name(&name)?;

    let created = !path.exists();
    if created {
        if h.from_uid != 0 {
            return Err(mismatch(path, Mismatch::BaseMissing { uid: h.from_uid }));
        }
        create_image(path, &h)?;
    }
    let image = Arc::new(OpenOptions::new().write(true).open(path)?);
    let result = receive_into(&image, path, &mut r, &h, &name, opts);
    let closed = image.close();
    drop(image);
    if result.is_err() && created && Progress::load(path)?.is_none() {
        // Nothing to resume: the image this receive created goes too.
        let _ = std::fs::remove_file(path);
    }
    let mut report = result?;
    closed?;
    report.created = created;
    Ok(report)
}

/// Creates the image under a temporary name and renames it into place, so a receive
/// killed while creating leaves no half-made image.
fn create_image(path: &Path, h: &StreamHeader) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".qcowx-new");
    let tmp = std::path::PathBuf::from(tmp);
    let mut o = CreateOptions::new(h.virtual_size);
    o.cluster_size = u64::from(h.cluster_size);
    let img = Image::create(&tmp, &o)?;
    img.close()?;
    std::fs::rename(&tmp, path).map_err(|e| Error::Io {
        file: path.display().to_string(),
        op: "rename new image",
        offset: 0,
        source: e,
    })?;
    sync_dir(path)
}

fn receive_into(
    image: &Arc<Image>,
    path: &Path,
    r: &mut Counted<'_>,
    h: &StreamHeader,
    name: &str,
    opts: &ReceiveOptions,
) -> Result<ReceiveReport> {
    let staging = staging_name(h.to_uid);
    let saved = Progress::load(path)?;
    if let Some(p) = saved.filter(|p| p.to_uid != h.to_uid || p.from_uid != h.from_uid) {
        if image.has_vdi(&staging_name(p.to_uid))? {
            return Err(mismatch(path, Mismatch::OtherReceive { other: p.to_uid }));
        }
    }
    let saved = saved.filter(|p| p.to_uid == h.to_uid && p.from_uid == h.from_uid);

    // Already here: the last step of a receive that stopped (finish its cleanup), or
    // a stream received before.
    if let Some(have) = image.snapshot_by_uid(h.to_uid)? {
        if saved.is_some() {
            if image.has_vdi(&staging)? {
                image.delete_vdi(&staging)?;
            }
            Progress::remove(path)?;
            return Ok(ReceiveReport {
                snapshot: have,
                created: false,
                applied: 0,
                skipped: 0,
                incremental: h.from_uid != 0,
            });
        }
        return Err(mismatch(
            path,
            Mismatch::AlreadyReceived {
                uid: h.to_uid,
                name: have.name,
            },
        ));
    }
    if image.uid_taken(h.to_uid)? {
        return Err(mismatch(
            path,
            Mismatch::AlreadyReceived {
                uid: h.to_uid,
                name: String::new(),
            },
        ));
    }
    if image.name_in_use(name)? {
        return Err(mismatch(
            path,
            Mismatch::NameTaken {
                name: name.to_string(),
            },
        ));
    }
    let base = match h.from_uid {
        0 => None,
        uid => {
            let b = image
                .snapshot_by_uid(uid)?
                .ok_or_else(|| mismatch(path, Mismatch::BaseMissing { uid }))?;
            if b.size != h.virtual_size {
                return Err(mismatch(
                    path,
                    Mismatch::Size {
                        have: b.size,
                        stream: h.virtual_size,
                    },
                ));
            }
            Some(uid)
        }
    };
    let seed_pos = Position {
        seq: 0,
        offset: 0,
        crc: seed(h.from_uid, h.to_uid),
    };
    if h.start.seq == 0 && h.start != seed_pos {
        return Err(stream_err(
            path,
            StreamError::Header {
                why: "a stream from record 0 must start at offset 0 with the seed checksum".into(),
            },
        ));
    }
    let have = match saved {
        Some(p) if image.has_vdi(&staging)? => p.next,
        _ => seed_pos,
    };
    if h.start.seq > have.seq || (h.start.seq == have.seq && h.start != have) {
        let why = format!(
            "needs record {} (at guest offset {:#x}, checksum state {:08x})",
            have.seq, have.offset, have.crc
        );
        return Err(mismatch(
            path,
            Mismatch::Resume {
                stream_seq: h.start.seq,
                why,
            },
        ));
    }
    let progress = Progress {
        to_uid: h.to_uid,
        from_uid: h.from_uid,
        next: have,
    };
    if have.seq == 0 && image.has_vdi(&staging)? {
        // A staging VDI without progress: the leftover of a start cut before its
        // first progress write. Collected at once, so its name is free again.
        image.delete_vdi(&staging)?;
        image.gc()?;
    }
    let mut applier = Applier {
        image,
        staging: &staging,
        base,
        size: h.virtual_size,
        disk: None,
        path,
        progress,
        since: 0,
        every: if opts.checkpoint_bytes == 0 {
            32 << 20
        } else {
            opts.checkpoint_bytes
        },
    };
    let outcome = read_records(r, h, have, &mut applier);
    let (applied, skipped) = match outcome {
        Ok(counts) => counts,
        Err(e) => {
            if applier.disk.is_some() {
                // Keep what verified for a resume.
                let _ = applier.checkpoint();
            }
            return Err(e);
        }
    };
    let disk = applier.staged()?;
    disk.flush()?;
    let snapshot = image.commit_staging(
        &staging,
        name,
        Given {
            uid: h.to_uid,
            parent: h.from_uid,
            created_ns: h.created_ns,
        },
    )?;
    Progress::remove(path)?;
    Ok(ReceiveReport {
        snapshot,
        created: false,
        applied,
        skipped,
        incremental: h.from_uid != 0,
    })
}

/// Writes records into the staging VDI (made at the first record that verified)
/// and records progress durably.
struct Applier<'a> {
    image: &'a Arc<Image>,
    staging: &'a str,
    base: Option<u64>,
    size: u64,
    disk: Option<Disk>,
    path: &'a Path,
    progress: Progress,
    since: u64,
    every: u64,
}

impl Applier<'_> {
    /// The staging VDI, made (with its first progress) if this run has not yet.
    fn staged(&mut self) -> Result<Disk> {
        if let Some(d) = &self.disk {
            return Ok(d.clone());
        }
        if !self.image.has_vdi(self.staging)? {
            self.image
                .create_staging(self.staging, self.base, self.size)?;
            self.progress.save(self.path)?;
        }
        let d = self.image.open_root(self.staging)?;
        self.disk = Some(d.clone());
        Ok(d)
    }

    fn apply(&mut self, rec: &RecordHeader, data: &[u8], next: Position) -> Result<()> {
        let disk = self.staged()?;
        match rec.kind {
            RecordKind::Data => disk.write_at(data, rec.offset)?,
            RecordKind::Zero => disk.write_zeroes(rec.offset, rec.length, false)?,
            RecordKind::Discard => disk.write_zeroes(rec.offset, rec.length, true)?,
            RecordKind::End => {}
        }
        self.progress.next = next;
        self.since += rec.length.max(1 << 16);
        if self.since >= self.every {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Makes what was applied durable, then says so.
    fn checkpoint(&mut self) -> Result<()> {
        if let Some(d) = &self.disk {
            d.flush()?;
            self.progress.save(self.path)?;
        }
        self.since = 0;
        Ok(())
    }
}

/// Reads and checks every record, applying those at or after `have`; returns the
/// records applied and skipped.
fn read_records(
    r: &mut Counted<'_>,
    h: &StreamHeader,
    have: Position,
    applier: &mut Applier<'_>,
) -> Result<(u64, u64)> {
    let path = applier.path;
    let fail = |e: StreamError| stream_err(path, e);
    let mut expected = h.start.seq;
    let mut crc = h.start.crc;
    let mut end_of_last = h.start.offset;
    let (mut applied, mut skipped) = (0u64, 0u64);
    let mut payload = Vec::new();
    let mut data = Vec::new();
    loop {
        let at = r.at;
        let mut hb = [0u8; RECORD_HEADER_BYTES];
        r.fill(&mut hb, "record header")
            .map_err(|f| read_fail(path, f))?;
        let rec = RecordHeader::decode(&hb, at).map_err(fail)?;
        payload.resize(rec.payload_len as usize, 0);
        r.fill(&mut payload, "record payload")
            .map_err(|f| read_fail(path, f))?;
        let computed = RecordHeader::computed_crc(&hb, &payload);
        if computed != rec.crc {
            return Err(fail(StreamError::RecordChecksum {
                seq: rec.seq,
                at,
                stored: rec.crc,
                computed,
            }));
        }
        if rec.seq != expected {
            return Err(fail(StreamError::OutOfOrder {
                at,
                found: rec.seq,
                expected,
            }));
        }
        let bad = |why: String| {
            fail(StreamError::Record {
                seq: rec.seq,
                at,
                why,
            })
        };
        if rec.kind == RecordKind::End {
            if rec.length != rec.seq {
                return Err(bad(format!("end record counts {} records", rec.length)));
            }
            if rec.stream_crc != crc {
                return Err(fail(StreamError::StreamChecksum {
                    stored: rec.stream_crc,
                    computed: crc,
                }));
            }
            let mut one = [0u8; 1];
            if r.fill(&mut one, "end").is_ok() {
                return Err(fail(StreamError::TrailingBytes { at: r.at - 1 }));
            }
            return Ok((applied, skipped));
        }
        let end = rec
            .offset
            .checked_add(rec.length)
            .filter(|&e| e <= h.virtual_size && rec.length > 0)
            .ok_or_else(|| {
                bad(format!(
                    "range {:#x}+{:#x} is off the disk",
                    rec.offset, rec.length
                ))
            })?;
        if rec.offset < end_of_last || rec.stream_crc != 0 {
            return Err(bad(format!(
                "range at {:#x} goes back before {end_of_last:#x}",
                rec.offset
            )));
        }
        if rec.kind == RecordKind::Data {
            record_data(&rec, &payload, &mut data).map_err(bad)?;
        } else if rec.compressed {
            return Err(bad("only data records are compressed".into()));
        }
        end_of_last = end;
        crc = chain(crc, rec.crc);
        expected += 1;
        let next = Position {
            seq: expected,
            offset: end,
            crc,
        };
        if rec.seq < have.seq {
            skipped += 1;
            if next.seq == have.seq && next.crc != have.crc {
                return Err(mismatch(
                    path,
                    Mismatch::Resume {
                        stream_seq: h.start.seq,
                        why: "stopped in a different stream (its records differ)".into(),
                    },
                ));
            }
            continue;
        }
        applier.apply(&rec, &data, next)?;
        applied += 1;
    }
}
