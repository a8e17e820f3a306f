//! A storage that shows every read and write to a hook (for tests and tools that
//! watch an image's I/O, or fail it).

use std::io;
use std::path::Path;

use super::*;

/// A read or a write a [`Watched`] storage is about to pass on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `read_at`.
    Read {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: usize,
    },
    /// `write_at`.
    Write {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: usize,
    },
}

/// The hook of a [`Watched`] storage.
type Watch = Box<dyn Fn(Access) -> io::Result<()> + Send + Sync>;

/// A storage that shows every read and write to a hook before passing it to `inner`:
/// the hook may record it, hold it up, or fail it (its error is the call's). Every
/// other call goes straight to `inner`. For tests and tools that watch an image's
/// I/O.
pub struct Watched<S> {
    /// The storage the calls go to.
    pub inner: S,
    watch: Watch,
}

impl<S: Storage> Watched<S> {
    /// `inner`, with `watch` called before each read and write.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use std::sync::Arc;
    /// use qcowx_core::storage::{Access, MemStorage, Watched};
    /// use qcowx_core::{CreateOptions, Error, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let writes = Arc::new(AtomicUsize::new(0));
    /// let seen = writes.clone();
    /// let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    /// let fail = failing.clone();
    /// let storage = Watched::new(MemStorage::new(), move |a| {
    ///     if let Access::Write { .. } = a {
    ///         seen.fetch_add(1, Ordering::Relaxed);
    ///         if fail.load(Ordering::Relaxed) {
    ///             return Err(std::io::Error::from_raw_os_error(5)); // EIO
    ///         }
    ///     }
    ///     Ok(())
    /// });
    /// let img = Image::create_in(Arc::new(storage), &CreateOptions::new(1 << 20))?;
    /// img.write_at(&[1; 512], 0)?;
    /// assert!(writes.load(Ordering::Relaxed) > 0);
    /// failing.store(true, Ordering::Relaxed);
    /// assert!(matches!(img.write_at(&[1; 512], 65536), Err(Error::Io { .. })));
    /// # Ok(()) }
    /// ```
    pub fn new(
        inner: S,
        watch: impl Fn(Access) -> io::Result<()> + Send + Sync + 'static,
    ) -> Watched<S> {
        Watched {
            inner,
            watch: Box::new(watch),
        }
    }
}

impl<S: Storage> std::fmt::Debug for Watched<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S: Storage> Storage for Watched<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (self.watch)(Access::Read {
            offset,
            len: buf.len(),
        })?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (self.watch)(Access::Write {
            offset,
            len: buf.len(),
        })?;
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
    fn release(&self) -> io::Result<()> {
        self.inner.release()
    }
    fn will_need(&self, offset: u64, len: u64) {
        self.inner.will_need(offset, len)
    }
    fn data_runs(&self, offset: u64, len: u64) -> Option<Vec<(u64, u64, bool)>> {
        self.inner.data_runs(offset, len)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
    // No `mapping`: bytes lent from one would pass the hook by. No `allocate`: the
    // default writes zeros through `write_at`, past the hook.
}
