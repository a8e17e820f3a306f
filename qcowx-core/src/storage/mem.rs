//! An in-memory storage, for tests and scratch images.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::*;

/// An in-memory [`Storage`], for tests and scratch images.
///
/// It grows on demand up to [`MemStorage::MAX_LEN`]; writes or resizes beyond that,
/// ranges whose end overflows `u64`, and allocation failures are reported as I/O errors
/// rather than panics or aborts.
///
/// ```
/// use qcowx_core::storage::{MemStorage, Storage};
///
/// let mem = MemStorage::from_vec(b"abc".to_vec());
/// mem.write_at(b"Z", 5).unwrap(); // grows, the gap reads as zeros
/// assert_eq!(mem.to_vec(), b"abc\0\0Z");
/// assert_eq!(MemStorage::new().len().unwrap(), 0);
/// assert!(mem.set_len(MemStorage::MAX_LEN + 1).is_err());
/// assert_eq!(mem.into_vec().len(), 6);
/// ```
#[derive(Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// The largest size a `MemStorage` can grow to: 1 TiB.
    pub const MAX_LEN: u64 = 1 << 40;

    /// An empty in-memory file.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// An in-memory file holding `data`.
    pub fn from_vec(data: Vec<u8>) -> MemStorage {
        MemStorage {
            data: RwLock::new(data),
        }
    }

    /// A copy of the current contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.read().clone()
    }

    /// The contents, consuming the storage.
    pub fn into_vec(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    // A panic while the lock was held cannot leave the Vec in an unsafe state, so a
    // poisoned lock is simply used as is.
    pub(super) fn read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Converts a new length to `usize`, enforcing [`MemStorage::MAX_LEN`].
    fn checked_len(len: u64) -> io::Result<usize> {
        let too_big = || {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "in-memory storage cannot grow to {len} bytes (limit {})",
                    MemStorage::MAX_LEN
                ),
            )
        };
        if len > MemStorage::MAX_LEN {
            return Err(too_big());
        }
        usize::try_from(len).map_err(|_| too_big())
    }

    fn resize(data: &mut Vec<u8>, len: usize) -> io::Result<()> {
        if len > data.len() {
            data.try_reserve_exact(len - data.len()).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    format!("in-memory storage cannot grow to {len} bytes: {e}"),
                )
            })?;
        }
        data.resize(len, 0);
        Ok(())
    }
}

impl fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStorage")
            .field("len", &self.read().len())
            .finish()
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        range_end(offset, buf.len() as u64)?;
        let data = self.read();
        // Bytes available at `offset`, if any; the rest reads as zeros.
        let avail = usize::try_from(offset)
            .ok()
            .and_then(|start| data.get(start..))
            .unwrap_or(&[]);
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = MemStorage::checked_len(range_end(offset, buf.len() as u64)?)?;
        let start = end - buf.len();
        let mut data = self.write();
        if end > data.len() {
            MemStorage::resize(&mut data, end)?;
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.read().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = MemStorage::checked_len(len)?;
        MemStorage::resize(&mut self.write(), len)
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = range_end(offset, len)?;
        let mut data = self.write();
        let size = data.len() as u64;
        let (start, end) = (offset.min(size), end.min(size));
        // Both are at most `data.len()`, so they fit in usize.
        let (start, end) = (start as usize, end as usize);
        data[start..end].fill(0);
        Ok(())
    }

    fn path(&self) -> Option<&Path> {
        None
    }
}
