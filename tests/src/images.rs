//! Opening images through transient lock conflicts, block status classification and content comparison.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use qcowx_core::{Extent, ExtentStatus, Image, OpenOptions};

use crate::{convert_to_raw, error_text, qemu_map, MapExtent};

/// Chunk size used by the content comparisons (bounded memory).
pub const COMPARE_CHUNK: usize = 1 << 20;

/// How long [`open_retry`] and [`run_ok`](crate::run_ok) retry an image lock conflict.
///
/// Why a conflict can be transient: when any thread of the test binary spawns a
/// process, the child holds duplicates of all the binary's file descriptors until it
/// calls `exec` (close-on-exec closes them only then). Image locks are OFD locks, tied
/// to the open file description, so an image another test thread just closed can
/// still look locked for a moment. Tests that expect a lock conflict must not retry.
pub const LOCK_RETRY: Duration = Duration::from_secs(5);

/// Opens `path` with `opts`, retrying while the open fails with
/// [`qcowx_core::Error::Locked`], for up to [`LOCK_RETRY`]. Other errors (and the last
/// lock error) are returned.
pub fn open_retry(opts: &OpenOptions, path: &Path) -> qcowx_core::Result<Image> {
    let deadline = Instant::now() + LOCK_RETRY;
    loop {
        match opts.open(path) {
            Err(qcowx_core::Error::Locked { .. }) if Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Opens `path` read-only (see [`open_retry`]); panics on error.
pub fn open_ro(path: &Path) -> Image {
    open_retry(&OpenOptions::new(), path)
        .unwrap_or_else(|e| panic!("open {}: {}", path.display(), error_text(&e)))
}

/// Opens `path` read-write (see [`open_retry`]); panics on error.
pub fn open_rw(path: &Path) -> Image {
    open_retry(&OpenOptions::new().write(true), path)
        .unwrap_or_else(|e| panic!("open_rw {}: {}", path.display(), error_text(&e)))
}

/// What a guest byte is, independent of how a tool merges extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteClass {
    /// Data, found at this layer depth.
    Data(u32),
    /// Explicitly zero, recorded at this layer depth.
    Zero(u32),
    /// Not allocated anywhere in the chain (the depth is not compared: QEMU and qcowx
    /// count it differently when backing files are shorter than the overlay).
    Unallocated,
}

/// A run of bytes of one [`ByteClass`]: `(start, end, class)`, end exclusive.
pub type ClassRun = (u64, u64, ByteClass);

/// Classifies qcowx extents.
pub fn classify_block_status(extents: &[Extent]) -> Vec<ClassRun> {
    extents
        .iter()
        .map(|e| {
            let class = match e.status {
                // `qemu-img map` says `data` for both (with `zero` for the second).
                ExtentStatus::Data | ExtentStatus::AllocatedZero => ByteClass::Data(e.depth),
                ExtentStatus::Zero => ByteClass::Zero(e.depth),
                ExtentStatus::Unallocated => ByteClass::Unallocated,
            };
            (e.offset, e.offset + e.length, class)
        })
        .collect()
}

/// Classifies `qemu-img map` extents: not present → unallocated; data → data; else
/// zero.
pub fn classify_qemu_map(map: &[MapExtent]) -> Vec<ClassRun> {
    map.iter()
        .map(|m| {
            let class = if !m.present {
                ByteClass::Unallocated
            } else if m.data {
                ByteClass::Data(m.depth)
            } else {
                ByteClass::Zero(m.depth)
            };
            (m.start, m.start + m.length, class)
        })
        .collect()
}

/// Asserts that two classifications agree on every byte of `[0, size)` (both must
/// cover it exactly, in order, without gaps). `what` names the image in messages.
pub fn assert_same_classification(what: &str, ours: &[ClassRun], qemu: &[ClassRun], size: u64) {
    for (name, runs) in [("qcowx", ours), ("qemu", qemu)] {
        let mut pos = 0;
        for &(s, e, _) in runs {
            assert_eq!(
                s, pos,
                "{what}: {name} runs have a gap or overlap at {pos}: {runs:?}"
            );
            assert!(e > s, "{what}: {name} has an empty run at {s}");
            pos = e;
        }
        assert_eq!(
            pos, size,
            "{what}: {name} runs end at {pos}, disk size {size}"
        );
    }
    let (mut i, mut j, mut pos) = (0, 0, 0);
    while pos < size {
        let (_, ea, ca) = ours[i];
        let (_, eb, cb) = qemu[j];
        let end = ea.min(eb);
        assert_eq!(
            ca, cb,
            "{what}: bytes {pos}..{end} are {ca:?} for qcowx but {cb:?} for qemu-img map\n\
             qcowx: {ours:?}\nqemu: {qemu:?}"
        );
        pos = end;
        if ea == end {
            i += 1;
        }
        if eb == end {
            j += 1;
        }
    }
}

/// Compares `img.block_status` over the whole disk with `qemu-img map` of `path`.
pub fn assert_block_status_matches_qemu(img: &Image, path: &Path) {
    let size = img.size();
    let ours = img
        .block_status(0, size)
        .unwrap_or_else(|e| panic!("block_status of {}: {e}", path.display()));
    let qemu = qemu_map(path);
    assert_same_classification(
        &path.display().to_string(),
        &classify_block_status(&ours),
        &classify_qemu_map(&qemu),
        size,
    );
}

// ---- content comparison ---------------------------------------------------------------

/// The first offset where `a` and `b` differ (over the shorter of the two).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn hex_around(buf: &[u8], at: usize) -> String {
    let s = at.saturating_sub(8);
    let e = (at + 8).min(buf.len());
    buf[s..e]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Asserts that the whole virtual disk of `img` equals the raw file `raw` (which must
/// be exactly as long as the disk), reading both in [`COMPARE_CHUNK`] chunks.
pub fn assert_image_eq_file(img: &Image, raw: &Path) {
    let size = img.size();
    let file = File::open(raw).unwrap_or_else(|e| panic!("open {}: {e}", raw.display()));
    let raw_len = file.metadata().expect("stat raw file").len();
    assert_eq!(
        raw_len,
        size,
        "{}: raw file {} has {raw_len} bytes, the image's virtual size is {size}",
        img.file_name(),
        raw.display()
    );
    let mut ours = vec![0u8; COMPARE_CHUNK];
    let mut theirs = vec![0u8; COMPARE_CHUNK];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(COMPARE_CHUNK as u64) as usize;
        img.read_at(&mut ours[..n], pos)
            .unwrap_or_else(|e| panic!("qcowx read of {} at {pos}+{n}: {e}", img.file_name()));
        file.read_exact_at(&mut theirs[..n], pos)
            .unwrap_or_else(|e| panic!("read {} at {pos}: {e}", raw.display()));
        if let Some(d) = first_difference(&ours[..n], &theirs[..n]) {
            panic!(
                "{}: guest byte {} differs from {}: qcowx [{}] vs expected [{}] (from {})",
                img.file_name(),
                pos + d as u64,
                raw.display(),
                hex_around(&ours[..n], d),
                hex_around(&theirs[..n], d),
                (pos + d as u64).saturating_sub(8)
            );
        }
        pos += n as u64;
    }
}

/// Converts the qcow2 image at `path` with `qemu-img convert -O raw` into `scratch` and
/// asserts that `img` (normally the same image opened by qcowx) reads identically.
pub fn assert_image_matches_qemu(img: &Image, path: &Path, scratch: &Path) {
    let raw = scratch.join(format!(
        "{}.qemu.raw",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    ));
    let _ = std::fs::remove_file(&raw);
    convert_to_raw(path, &raw);
    assert_image_eq_file(img, &raw);
    let _ = std::fs::remove_file(&raw);
}

/// Asserts that the whole virtual disk of `img` equals `expected` (chunked reads).
pub fn assert_image_eq_bytes(img: &Image, expected: &[u8]) {
    let size = img.size();
    assert_eq!(
        size,
        expected.len() as u64,
        "{}: virtual size differs from the expected content",
        img.file_name()
    );
    let mut buf = vec![0u8; COMPARE_CHUNK];
    let mut pos = 0usize;
    while pos < expected.len() {
        let n = (expected.len() - pos).min(COMPARE_CHUNK);
        img.read_at(&mut buf[..n], pos as u64)
            .unwrap_or_else(|e| panic!("qcowx read of {} at {pos}+{n}: {e}", img.file_name()));
        if let Some(d) = first_difference(&buf[..n], &expected[pos..pos + n]) {
            panic!(
                "{}: guest byte {} differs: qcowx [{}] vs expected [{}] (from {})",
                img.file_name(),
                pos + d,
                hex_around(&buf[..n], d),
                hex_around(&expected[pos..pos + n], d),
                (pos + d).saturating_sub(8)
            );
        }
        pos += n;
    }
}
