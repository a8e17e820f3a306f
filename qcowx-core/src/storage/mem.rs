//! An in-memory storage, for tests and scratch images.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::*;

/// An in-memory [`Storage`], for tests and scratch images.
///
/// It grows on demand up to [`MemStorage::MAX_LEN`]; writes or resizes beyond that,
/// ranges whose end overflows `u64`, and allocation failures are reported as I/O errors
/// rather than panics or aborts. The bytes are kept in pages of [`MemStorage::PAGE`]
/// taken when first written: ranges never written (and punched holes) take no memory
/// and read as zeros, and no single allocation grows with the file.
///
/// ```
/// use qcowx_core::storage::{MemStorage, Storage};
///
/// let mem = MemStorage::from_vec(b"abc".to_vec());
/// mem.write_at(b"Z", 5).unwrap(); // grows, the gap reads as zeros
/// assert_eq!(mem.to_vec(), b"abc\0\0Z");
/// assert_eq!(MemStorage::new().len().unwrap(), 0);
/// assert!(mem.set_len(MemStorage::MAX_LEN + 1).is_err());
/// // A sparse file: a byte written far out allocates one page.
/// let sparse = MemStorage::new();
/// sparse.write_at(b"!", 3 * MemStorage::PAGE as u64 + 7).unwrap();
/// assert_eq!(sparse.len().unwrap(), 3 * MemStorage::PAGE as u64 + 8);
/// assert_eq!(mem.into_vec().len(), 6);
/// ```
#[derive(Default)]
pub struct MemStorage {
    data: RwLock<Pages>,
}

/// The file's length and the pages written, by index. Bytes of a page past the
/// length are zeros.
#[derive(Default)]
struct Pages {
    len: u64,
    pages: BTreeMap<u64, Box<[u8]>>,
}

/// Calls `f(page index, offset in the page, offset from start, bytes)` for each piece
/// of `[start, end)`, in order.
fn pieces(start: u64, end: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
    let page = MemStorage::PAGE as u64;
    let mut at = start;
    while at < end {
        let (i, o) = (at / page, (at % page) as usize);
        let n = (MemStorage::PAGE - o).min((end - at) as usize);
        f(i, o, (at - start) as usize, n);
        at += n as u64;
    }
}

impl Pages {
    fn read(&self, buf: &mut [u8], offset: u64) {
        buf.fill(0);
        let end = (offset + buf.len() as u64).min(self.len);
        pieces(offset, end.max(offset), |i, o, from, n| {
            if let Some(p) = self.pages.get(&i) {
                buf[from..from + n].copy_from_slice(&p[o..o + n]);
            }
        });
    }

    fn write(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        // Pages are taken first, so a failure leaves the file as it was.
        let mut missing = Vec::new();
        pieces(offset, end, |i, _, _, _| {
            if !self.pages.contains_key(&i) {
                missing.push(i);
            }
        });
        for i in missing {
            self.pages.insert(i, MemStorage::zeroed_page()?);
        }
        pieces(offset, end, |i, o, from, n| {
            if let Some(p) = self.pages.get_mut(&i) {
                p[o..o + n].copy_from_slice(&buf[from..from + n]);
            }
        });
        self.len = self.len.max(end);
        Ok(())
    }

    /// Zeros `[start, end)`: whole pages are dropped.
    fn zero(&mut self, start: u64, end: u64) {
        pieces(start, end, |i, o, _, n| {
            if n == MemStorage::PAGE {
                self.pages.remove(&i);
            } else if let Some(p) = self.pages.get_mut(&i) {
                p[o..o + n].fill(0);
            }
        });
    }

    fn set_len(&mut self, len: u64) {
        if len < self.len {
            // What is cut off must read as zeros if the file grows again.
            let page = MemStorage::PAGE as u64;
            self.zero(len, self.len.min(len.next_multiple_of(page)));
            drop(self.pages.split_off(&len.div_ceil(page)));
        }
        self.len = len;
    }
}

impl MemStorage {
    /// The largest size a `MemStorage` can grow to: 1 TiB.
    pub const MAX_LEN: u64 = 1 << 40;

    /// The unit in which memory is taken: 64 KiB.
    pub const PAGE: usize = 64 << 10;

    /// An empty in-memory file.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// An in-memory file holding `data`.
    pub fn from_vec(data: Vec<u8>) -> MemStorage {
        let mut pages = BTreeMap::new();
        for (i, chunk) in data.chunks(MemStorage::PAGE).enumerate() {
            let mut p = vec![0u8; MemStorage::PAGE];
            p[..chunk.len()].copy_from_slice(chunk);
            pages.insert(i as u64, p.into_boxed_slice());
        }
        MemStorage {
            data: RwLock::new(Pages {
                len: data.len() as u64,
                pages,
            }),
        }
    }

    /// A copy of the current contents.
    pub fn to_vec(&self) -> Vec<u8> {
        let data = self.read();
        let mut out = vec![0u8; data.len as usize];
        data.read(&mut out, 0);
        out
    }

    /// The contents, consuming the storage.
    pub fn into_vec(self) -> Vec<u8> {
        self.to_vec()
    }

    // A panic while the lock was held cannot leave the pages in an unsafe state, so a
    // poisoned lock is simply used as is.
    fn read(&self) -> RwLockReadGuard<'_, Pages> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Pages> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks a new length against [`MemStorage::MAX_LEN`].
    fn checked_len(len: u64) -> io::Result<u64> {
        if len > MemStorage::MAX_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "in-memory storage cannot grow to {len} bytes (limit {})",
                    MemStorage::MAX_LEN
                ),
            ));
        }
        Ok(len)
    }

    fn no_memory(len: u64, e: std::collections::TryReserveError) -> io::Error {
        io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!("in-memory storage cannot grow to {len} bytes: {e}"),
        )
    }

    fn zeroed_page() -> io::Result<Box<[u8]>> {
        let mut p = Vec::new();
        p.try_reserve_exact(MemStorage::PAGE)
            .map_err(|e| MemStorage::no_memory(MemStorage::PAGE as u64, e))?;
        p.resize(MemStorage::PAGE, 0);
        Ok(p.into_boxed_slice())
    }
}

impl fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStorage")
            .field("len", &self.read().len)
            .finish()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        range_end(offset, buf.len() as u64)?;
        self.read().read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        MemStorage::checked_len(range_end(offset, buf.len() as u64)?)?;
        self.write().write(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.read().len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.write().set_len(MemStorage::checked_len(len)?);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = range_end(offset, len)?;
        let mut data = self.write();
        let size = data.len;
        data.zero(offset.min(size), end.min(size));
        Ok(())
    }

    fn path(&self) -> Option<&Path> {
        None
    }
}
