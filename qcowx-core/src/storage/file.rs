//! A host file: positional I/O, sync, hole punch, and the QEMU-compatible image lock.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::{Advice, Mmap, UncheckedAdvice};

use thiserror::Error;

use lock::{LockError, LockMode};

use super::small_writes::{SplitRegions, SMALL_WRITE};
use super::write_zeros;
use super::*;

/// How [`FileStorage::open`] opens an image file.
///
/// ```
/// use qcowx_core::storage::OpenMode;
/// use qcowx_core::LockMode;
///
/// assert_eq!((OpenMode::read_only().writable, OpenMode::read_only().lock), (false, LockMode::Shared));
/// assert_eq!(OpenMode::read_write().lock, LockMode::Exclusive);
/// let peek = OpenMode::read_only().with_lock(LockMode::ForceShare);
/// assert_eq!(peek.lock, LockMode::ForceShare);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpenMode {
    /// Open the file for writing as well as reading.
    pub writable: bool,
    /// The image lock to take. A writable file needs [`LockMode::Exclusive`] or
    /// [`LockMode::None`].
    pub lock: LockMode,
}

impl OpenMode {
    /// Read-only with a [`LockMode::Shared`] lock: fails while a writer uses the image.
    pub const fn read_only() -> OpenMode {
        OpenMode {
            writable: false,
            lock: LockMode::Shared,
        }
    }

    /// Read-write with a [`LockMode::Exclusive`] lock.
    pub const fn read_write() -> OpenMode {
        OpenMode {
            writable: true,
            lock: LockMode::Exclusive,
        }
    }

    /// The same mode with a different lock.
    pub const fn with_lock(self, lock: LockMode) -> OpenMode {
        OpenMode { lock, ..self }
    }
}

/// Why an image file could not be opened or created. Every variant carries the path.
///
/// Converts into an [`io::Error`] (lock conflicts become
/// [`io::ErrorKind::ResourceBusy`]) for callers that only deal in I/O errors.
///
/// ```
/// use qcowx_core::storage::{FileStorage, OpenError, OpenMode};
/// use qcowx_core::LockMode;
///
/// let path = std::path::Path::new("/nonexistent/a.qcow2");
/// let e = FileStorage::open(path, OpenMode::read_only()).unwrap_err();
/// assert_eq!(e.path(), path);
/// assert!(e.lock_error().is_none());
/// assert_eq!(std::io::Error::from(e).kind(), std::io::ErrorKind::NotFound);
/// // Writing under a shared lock is refused before the file is touched.
/// let e = FileStorage::open(path, OpenMode::read_write().with_lock(LockMode::Shared)).unwrap_err();
/// assert!(matches!(e, OpenError::WritableWithoutExclusiveLock { .. }));
/// ```
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The file could not be opened, created or truncated.
    #[error("cannot open {}: {source}", path.display())]
    Io {
        /// The file's path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The image lock could not be taken, usually because another process uses the
    /// image.
    #[error("{}: {source}", path.display())]
    Lock {
        /// The file's path.
        path: PathBuf,
        /// What conflicted or failed.
        #[source]
        source: LockError,
    },
    /// A writable file was requested with a lock mode that does not protect writers.
    #[error(
        "cannot open {} for writing with lock mode {mode:?}: writers need an exclusive \
         lock (or none)",
        path.display()
    )]
    WritableWithoutExclusiveLock {
        /// The file's path.
        path: PathBuf,
        /// The rejected lock mode.
        mode: LockMode,
    },
}

impl OpenError {
    /// The path of the file that could not be opened.
    pub fn path(&self) -> &Path {
        match self {
            OpenError::Io { path, .. }
            | OpenError::Lock { path, .. }
            | OpenError::WritableWithoutExclusiveLock { path, .. } => path,
        }
    }

    /// The lock error, if opening failed because of the image lock.
    pub fn lock_error(&self) -> Option<&LockError> {
        match self {
            OpenError::Lock { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<OpenError> for io::Error {
    fn from(err: OpenError) -> io::Error {
        let kind = match &err {
            OpenError::Io { source, .. } => source.kind(),
            OpenError::Lock {
                source: LockError::Io { source, .. },
                ..
            } => source.kind(),
            OpenError::Lock { .. } => io::ErrorKind::ResourceBusy,
            OpenError::WritableWithoutExclusiveLock { .. } => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, err)
    }
}

/// Bytes read through a [`FileStorage`]'s mapping ([`Storage::mapped_read`]), and
/// mapped to split page-cache folios before small writes, after which the mapping
/// gives its pages back (`MADV_DONTNEED`: the process's page table
/// entries go, the page cache keeps the pages). Every page read through a mapping
/// counts in the process's resident memory until then, so without this a server that
/// lends its image's bytes grows by the size of everything it serves. Each read
/// counts as the 64 KiB windows it touches (a page fault maps the cached pages around
/// it too), so what the mapping holds stays within this much plus the reads in
/// flight. Releasing costs one `madvise` per this many bytes, and pages read again
/// fault back in from the page cache.
pub const MAP_RELEASE_BYTES: u64 = 16 << 20;

/// The span of the page cache a page fault may map around the faulting page (the
/// kernel's default `fault_around_bytes`).
const FAULT_AROUND: u64 = 64 << 10;

/// An image stored in a host file (or block device), accessed with `pread`/`pwrite`.
///
/// The image lock taken when opening is tied to this value's open file description and
/// is released when it is dropped.
///
/// ```
/// use qcowx_core::storage::{FileStorage, OpenMode, Storage};
/// use qcowx_core::LockMode;
///
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("raw.img");
/// let w = FileStorage::create_new(&path, LockMode::Exclusive).unwrap();
/// assert!(w.is_writable() && w.lock_mode() == LockMode::Exclusive);
/// w.write_at(b"bytes", 4096).unwrap();
/// assert_eq!(w.len().unwrap(), 4101);
/// assert_eq!(w.file().metadata().unwrap().len(), 4101);
/// // The exclusive image lock keeps other users out, as QEMU's does.
/// let busy = FileStorage::open(&path, OpenMode::read_only()).unwrap_err();
/// assert!(busy.lock_error().is_some_and(|l| l.is_conflict()));
/// assert!(FileStorage::create_new(&path, LockMode::None).is_err(), "it exists");
/// drop(w);
///
/// let r = FileStorage::open(&path, OpenMode::read_only()).unwrap();
/// let mut buf = [0u8; 5];
/// r.read_at(&mut buf, 4096).unwrap();
/// assert_eq!(&buf, b"bytes");
/// drop(r);
/// // create empties an existing file (once it holds the lock).
/// let again = FileStorage::create(&path, LockMode::Exclusive).unwrap();
/// assert_eq!(again.len().unwrap(), 0);
/// ```
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writable: bool,
    lock: LockMode,
    /// The newest mapping of the file (see [`Storage::mapping`]); replaced by a
    /// larger one when a read needs bytes past its end.
    map: Mutex<Option<Arc<Mmap>>>,
    /// Bytes read through the mapping since it last gave its pages back (see
    /// [`MAP_RELEASE_BYTES`]).
    mapped: AtomicU64,
    /// Stretches of the file whose large page-cache folios small writes have split.
    split: SplitRegions,
}

impl FileStorage {
    /// Opens an existing image file and takes the image lock of `mode.lock`.
    pub fn open(path: impl AsRef<Path>, mode: OpenMode) -> Result<FileStorage, OpenError> {
        let path = path.as_ref();
        check_writable_mode(path, mode.writable, mode.lock)?;
        let file = OpenOptions::new()
            .read(true)
            .write(mode.writable)
            .open(path)
            .map_err(|source| OpenError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        FileStorage::locked(file, path, mode.writable, mode.lock)
    }

    /// The storage of an open `file`, once it holds the image lock of `lock`.
    fn locked(
        file: File,
        path: &Path,
        writable: bool,
        lock: LockMode,
    ) -> Result<FileStorage, OpenError> {
        let storage = FileStorage {
            file,
            path: path.to_path_buf(),
            writable,
            lock,
            map: Mutex::new(None),
            mapped: AtomicU64::new(0),
            split: SplitRegions::default(),
        };
        storage.take_lock()?;
        Ok(storage)
    }

    /// Creates a new, empty image file for reading and writing, or empties an existing
    /// one, and takes the image lock of `lock` ([`LockMode::Exclusive`] or
    /// [`LockMode::None`]).
    ///
    /// The lock is taken before an existing file is truncated, so an image in use by
    /// another process is left untouched.
    pub fn create(path: impl AsRef<Path>, lock: LockMode) -> Result<FileStorage, OpenError> {
        let storage = FileStorage::create_keeping(path.as_ref(), lock)?;
        Storage::set_len(&storage, 0).map_err(|source| OpenError::Io {
            path: storage.path.clone(),
            source,
        })?;
        Ok(storage)
    }

    /// Creates a new, empty image file like [`FileStorage::create`], but fails with
    /// an [`OpenError::Io`] of kind [`io::ErrorKind::AlreadyExists`] if the file exists
    /// (`O_EXCL`): an existing file is never touched.
    pub fn create_new(path: impl AsRef<Path>, lock: LockMode) -> Result<FileStorage, OpenError> {
        FileStorage::open_for_create(path.as_ref(), lock, true)
    }

    /// Opens `path` for writing, creating it if missing, and takes the lock; an existing
    /// file keeps its bytes (the caller decides whether to replace them).
    pub(crate) fn create_keeping(path: &Path, lock: LockMode) -> Result<FileStorage, OpenError> {
        FileStorage::open_for_create(path, lock, false)
    }

    fn open_for_create(path: &Path, lock: LockMode, new: bool) -> Result<FileStorage, OpenError> {
        check_writable_mode(path, true, lock)?;
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        if new {
            options.create_new(true);
        } else {
            options.create(true).truncate(false);
        }
        let file = options.open(path).map_err(|source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        FileStorage::locked(file, path, true, lock)
    }

    fn take_lock(&self) -> Result<(), OpenError> {
        if !self.lock.takes_lock() {
            return Ok(());
        }
        lock::lock_file(&self.file, self.lock).map_err(|source| OpenError::Lock {
            path: self.path.clone(),
            source,
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the file was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The image lock taken when the file was opened.
    pub fn lock_mode(&self) -> LockMode {
        self.lock
    }

    /// The mapping a small write splits folios through (see `small_writes`): the
    /// current one if it reaches `end`, a new one only if there is none yet. Past
    /// the end of the mapping the file grew since it was mapped, written by this
    /// process in pages the size of its writes, so there is nothing to split and no
    /// reason to map the file again; nor past the end of the file (new pages) or in
    /// a file that does not map (a block device).
    fn mapping_for_split(&self, end: u64) -> Option<Arc<Mmap>> {
        let current = self.map.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match current {
            Some(map) => (map.len() as u64 >= end).then_some(map),
            None => self.mapping(end),
        }
    }
}

fn check_writable_mode(path: &Path, writable: bool, lock: LockMode) -> Result<(), OpenError> {
    if writable && matches!(lock, LockMode::Shared | LockMode::ForceShare) {
        return Err(OpenError::WritableWithoutExclusiveLock {
            path: path.to_path_buf(),
            mode: lock,
        });
    }
    Ok(())
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        range_end(offset, buf.len() as u64)?;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    // End of file: the rest reads as zeros.
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = range_end(offset, buf.len() as u64)?;
        if buf.len() < SMALL_WRITE && self.split.pending(offset, end) {
            match self.mapping_for_split(end) {
                Some(map) => {
                    self.split.split_before_write(&map, offset, end);
                    // The pages it mapped go back with those reads map.
                    self.mapped_read(offset, buf.len() as u64);
                }
                None => self.split.mark_range(offset, end),
            }
        }
        self.file.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        let meta = self.file.metadata()?;
        if meta.file_type().is_block_device() {
            // st_size is 0 for block devices; seeking to the end gives their size.
            // Only positional I/O is used, so moving the file position is harmless.
            use std::io::Seek;
            return (&self.file).seek(io::SeekFrom::End(0));
        }
        Ok(meta.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // A file already that long is left alone: on ext4 any truncate to zero, even
        // of an empty file, marks it for a flush of all its delayed allocations when
        // it is closed (`auto_da_alloc`, meant for programs that rewrite a file
        // without fsync), which would make closing a new image wait for the
        // submission of everything written to it.
        if self.file.metadata()?.len() == len {
            return Ok(());
        }
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn mapping(&self, end: u64) -> Option<Arc<Mmap>> {
        // Regular files only; one fstat per call keeps every byte handed out below
        // the file's current end (past it, a mapping faults with SIGBUS).
        let meta = self.file.metadata().ok()?;
        if !meta.is_file() || end > meta.len() || usize::try_from(meta.len()).is_err() {
            return None;
        }
        let mut slot = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = slot.as_ref().filter(|m| m.len() as u64 >= end) {
            return Some(Arc::clone(m));
        }
        // SAFETY: the mapping is read-only and shared. Its bytes can change under a
        // reader (other writes to the file), which only changes what a racing read
        // returns, as with pread; callers never read past the file's length (checked
        // above, and the image does not shrink its file while a mapped read holds
        // its I/O gate). Readers that outlive a remap keep the old mapping alive
        // through their Arc.
        let map = Arc::new(unsafe { Mmap::map(&self.file) }.ok()?);
        if (map.len() as u64) < end {
            return None;
        }
        // Page faults map at most the 64 KiB around them, never a whole 2 MiB folio at
        // once (where transparent huge pages are on for every mapping), so the bytes
        // `mapped_read` counts bound what the mapping holds (MAP_RELEASE_BYTES).
        let _ = map.advise(Advice::NoHugePage);
        *slot = Some(Arc::clone(&map));
        Some(map)
    }

    fn will_need(&self, offset: u64, len: u64) {
        sys::will_need(&self.file, offset, len);
    }

    fn mapped_read(&self, offset: u64, len: u64) {
        let start = offset - offset % FAULT_AROUND;
        let end = offset
            .saturating_add(len)
            .checked_next_multiple_of(FAULT_AROUND)
            .unwrap_or(u64::MAX);
        let span = end - start;
        if self.mapped.fetch_add(span, Ordering::Relaxed) + span < MAP_RELEASE_BYTES {
            return;
        }
        self.mapped.store(0, Ordering::Relaxed);
        let map = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Arc::clone);
        if let Some(map) = map {
            // SAFETY: the mapping is a shared mapping of a file: MADV_DONTNEED drops
            // only this process's page table entries for it, and the next access maps
            // the page cache's page again, with the same bytes (only private mappings
            // lose data this way). Readers racing with it fault the pages back in.
            // Mappings replaced by a larger one are unmapped when their last reader
            // drops them.
            let _ = unsafe { map.unchecked_advise(UncheckedAdvice::DontNeed) };
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = range_end(offset, len)?;
        // Never touch anything past the end of the file: it already reads as zeros, and
        // the zero-writing fallback must not extend the file.
        let end = end.min(self.len()?);
        if offset >= end {
            return Ok(());
        }
        match sys::punch_hole(&self.file, offset, end - offset) {
            Ok(()) => Ok(()),
            Err(e) if sys::is_unsupported(&e) => write_zeros(self, offset, end - offset),
            Err(e) => Err(e),
        }
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn release(&self) -> io::Result<()> {
        crate::storage::lock::unlock_file(&self.file).map_err(io::Error::from)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        Some(self.file.metadata().ok()?.blocks() * 512)
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        range_end(offset, len)?;
        match sys::allocate(&self.file, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if sys::is_unsupported(&e) => write_zeros(self, offset, len),
            Err(e) => Err(e),
        }
    }

    fn data_runs(&self, offset: u64, len: u64) -> Option<Vec<(u64, u64, bool)>> {
        let size = self.file.metadata().ok()?.len();
        super::holes::data_runs(&self.file, size, offset, len)
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    fn off_t(value: u64) -> io::Result<libc::off_t> {
        libc::off_t::try_from(value)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))
    }

    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`.
    pub(super) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = (off_t(offset)?, off_t(len)?);
        loop {
            // SAFETY: plain system call on a descriptor that `file` keeps open.
            let ret = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
            };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// `fallocate(0)`: reserves the range (extending the file), which reads as before.
    pub(super) fn allocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
        let (offset, len) = (off_t(offset)?, off_t(len)?);
        loop {
            // SAFETY: plain system call on a descriptor that `file` keeps open.
            let ret = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) };
            if ret == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// `posix_fadvise(POSIX_FADV_WILLNEED)`: the kernel starts reading the range into
    /// the page cache and returns at once. A failure only loses the hint.
    pub(super) fn will_need(file: &File, offset: u64, len: u64) {
        if let (Ok(offset), Ok(len)) = (off_t(offset), off_t(len)) {
            // SAFETY: plain system call on a descriptor that `file` keeps open.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED)
            };
        }
    }

    /// Whether `punch_hole` failed because the file system or kernel lacks support.
    pub(super) fn is_unsupported(err: &io::Error) -> bool {
        matches!(
            err.raw_os_error(),
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
        )
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod sys {
    use std::fs::File;
    use std::io;

    pub(super) fn punch_hole(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    pub(super) fn allocate(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    pub(super) fn will_need(_file: &File, _offset: u64, _len: u64) {}

    pub(super) fn is_unsupported(err: &io::Error) -> bool {
        err.kind() == io::ErrorKind::Unsupported
    }
}
