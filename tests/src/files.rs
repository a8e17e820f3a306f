//! Temporary directories, raw file access and a storage with a size cap.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use qcowx_core::storage::{MemStorage, Storage};

use crate::TempDir;

/// A fresh temporary directory (removed when dropped).
pub fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("qcowx-tests-")
        .tempdir()
        .expect("create a temporary directory")
}

/// Reads `len` bytes of the file at `path` from `offset`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", path.display()));
    buf
}

/// Overwrites the bytes of the file at `path` at `offset` with `bytes`.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.write_all_at(bytes, offset)
        .unwrap_or_else(|e| panic!("patch {} at {offset}: {e}", path.display()));
}

/// The big-endian u32 of the file at `path` at `offset`.
pub fn be32(path: &Path, offset: u64) -> u32 {
    u32::from_be_bytes(read_at(path, offset, 4).try_into().expect("4 bytes"))
}

/// The big-endian u64 of the file at `path` at `offset`.
pub fn be64(path: &Path, offset: u64) -> u64 {
    u64::from_be_bytes(read_at(path, offset, 8).try_into().expect("8 bytes"))
}

/// Drops the clean pages of the file at `path` from the page cache (after syncing
/// it), so the next reads go to the disk.
pub fn evict_page_cache(path: &Path) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.sync_all().expect("sync");
    // SAFETY: a valid descriptor; POSIX_FADV_DONTNEED only drops cached pages.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

/// An in-memory [`Storage`] that refuses to grow past a cap (an I/O error instead).
///
/// Hostile images can link data at absurd host offsets; a plain
/// [`qcowx_core::storage::MemStorage`] would try to grow to match, so tests that write
/// to such images use this wrapper to keep memory bounded.
#[derive(Debug)]
pub struct CappedStorage {
    inner: MemStorage,
    cap: u64,
}

impl CappedStorage {
    /// A storage holding `data` that may grow to `cap` bytes.
    pub fn new(data: Vec<u8>, cap: u64) -> CappedStorage {
        CappedStorage {
            inner: MemStorage::from_vec(data),
            cap,
        }
    }

    fn check(&self, end: Option<u64>) -> std::io::Result<()> {
        match end {
            Some(e) if e <= self.cap => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("capped test storage: cannot grow past {} bytes", self.cap),
            )),
        }
    }
}

impl Storage for CappedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.check(offset.checked_add(buf.len() as u64))?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check(Some(len))?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn path(&self) -> Option<&Path> {
        None
    }
}
