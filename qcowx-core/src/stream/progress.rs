//! A receive's durable progress, in a small file beside the image
//! (`FILE.qcowx-recv`), and the resume token that tells a sender where to start.

use std::io::Write;
use std::path::{Path, PathBuf};

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::Mismatch;
use crate::error::{Error, Result};
use crate::format::stream::Position;

const PROGRESS_MAGIC: [u8; 8] = *b"QXRECV01";

/// The progress file (56 bytes, big-endian).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawProgress {
    magic: [u8; 8],
    to_uid: U64,
    from_uid: U64,
    seq: U64,
    offset: U64,
    stream_crc: U32,
    reserved: U32,
    reserved2: U32,
    crc: U32,
}
const _: () = assert!(std::mem::size_of::<RawProgress>() == 56);

/// Where a receive stopped: the stream it belongs to and the next record it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    pub(crate) to_uid: u64,
    pub(crate) from_uid: u64,
    pub(crate) next: Position,
}

/// The progress file of the image at `image`.
///
/// ```
/// use std::path::Path;
/// use qcowx_core::stream::progress_path;
///
/// assert_eq!(progress_path(Path::new("/vm/a.qcow2")), Path::new("/vm/a.qcow2.qcowx-recv"));
/// ```
pub fn progress_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".qcowx-recv");
    PathBuf::from(s)
}

fn io(path: &Path, op: &'static str, e: std::io::Error) -> Error {
    Error::Io {
        file: path.display().to_string(),
        op,
        offset: 0,
        source: e,
    }
}

impl Progress {
    /// Reads the progress file; `None` if there is none or it is damaged (a damaged
    /// one is never trusted: the receive starts again).
    pub(crate) fn load(image: &Path) -> Result<Option<Progress>> {
        let path = progress_path(image);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path, "read receive progress", e)),
        };
        let Ok(raw) = RawProgress::read_from_bytes(&bytes) else {
            return Ok(None);
        };
        let covers = std::mem::offset_of!(RawProgress, crc);
        if raw.magic != PROGRESS_MAGIC || crc32c::crc32c(&bytes[..covers]) != raw.crc.get() {
            return Ok(None);
        }
        Ok(Some(Progress {
            to_uid: raw.to_uid.get(),
            from_uid: raw.from_uid.get(),
            next: Position {
                seq: raw.seq.get(),
                offset: raw.offset.get(),
                crc: raw.stream_crc.get(),
            },
        }))
    }

    /// Writes the progress file durably: a new file synced, renamed over the old one,
    /// and the directory synced.
    pub(crate) fn save(&self, image: &Path) -> Result<()> {
        let mut raw = RawProgress {
            magic: PROGRESS_MAGIC,
            to_uid: self.to_uid.into(),
            from_uid: self.from_uid.into(),
            seq: self.next.seq.into(),
            offset: self.next.offset.into(),
            stream_crc: self.next.crc.into(),
            reserved: 0.into(),
            reserved2: 0.into(),
            crc: 0.into(),
        };
        let covers = std::mem::offset_of!(RawProgress, crc);
        raw.crc = crc32c::crc32c(&raw.as_bytes()[..covers]).into();
        let path = progress_path(image);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, "create", e))?;
        f.write_all(raw.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io(&tmp, "write receive progress", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, "rename receive progress", e))?;
        sync_dir(&path)
    }

    /// Removes the progress file (the receive finished or was dropped).
    pub(crate) fn remove(image: &Path) -> Result<()> {
        let path = progress_path(image);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path, "remove receive progress", e)),
        }
    }

    /// The token a sender resumes from.
    pub(crate) fn token(&self) -> ResumeToken {
        ResumeToken {
            to_uid: self.to_uid,
            from_uid: self.from_uid,
            next: self.next,
        }
    }
}

pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, "sync directory", e))
}

/// Where a sender should start a stream for a receive that stopped:
/// `1-TO-FROM-SEQ-OFFSET-CRC` (hexadecimal; see `spec/stream.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeToken {
    /// The snapshot being received.
    pub to_uid: u64,
    /// Its base (0: full stream).
    pub from_uid: u64,
    /// The first record the receiver needs.
    pub next: Position,
}

impl std::fmt::Display for ResumeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "1-{:016x}-{:016x}-{:x}-{:x}-{:08x}",
            self.to_uid, self.from_uid, self.next.seq, self.next.offset, self.next.crc
        )
    }
}

impl std::str::FromStr for ResumeToken {
    type Err = Error;
    fn from_str(s: &str) -> Result<ResumeToken> {
        let bad = |why: &str| Error::StreamMismatch {
            file: String::new(),
            source: Mismatch::Token {
                token: s.chars().take(100).collect(),
                why: why.to_string(),
            },
        };
        let parts: Vec<&str> = s.trim().split('-').collect();
        let [v, to, from, seq, off, crc] = parts[..] else {
            return Err(bad("expected 1-TO-FROM-SEQ-OFFSET-CRC"));
        };
        if v != "1" {
            return Err(bad("unknown token version"));
        }
        let hex = |x: &str| u64::from_str_radix(x, 16).map_err(|_| bad("not hexadecimal"));
        let crc = u32::from_str_radix(crc, 16).map_err(|_| bad("not hexadecimal"))?;
        Ok(ResumeToken {
            to_uid: hex(to)?,
            from_uid: hex(from)?,
            next: Position {
                seq: hex(seq)?,
                offset: hex(off)?,
                crc,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips() {
        let t = ResumeToken {
            to_uid: 0xabc,
            from_uid: 0,
            next: Position {
                seq: 17,
                offset: 1 << 30,
                crc: 0xdead_beef,
            },
        };
        assert_eq!(t.to_string().parse::<ResumeToken>().unwrap(), t);
        assert!("2-0-0-0-0-0".parse::<ResumeToken>().is_err());
        assert!("garbage".parse::<ResumeToken>().is_err());
    }
}
