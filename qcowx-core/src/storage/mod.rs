//! Storage: the byte-addressed file an image lives in.
//!
//! Every access the engine makes to the host file goes through [`Storage`], so tests can
//! substitute an in-memory file or a recording layer that simulates crashes.
//!
//! Two implementations live here: [`FileStorage`], a host file accessed with positional
//! reads and writes and protected by a QEMU-compatible image lock (see
//! [`crate::storage::lock`]), and [`MemStorage`], a growable in-memory buffer.

pub mod crashsim;
pub mod lock;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use memmap2::Mmap;

use thiserror::Error;

use lock::{LockError, LockMode};

/// A positional, thread-safe byte store holding one image file.
// `len` is a fallible I/O query, not a collection size, so there is no `is_empty`.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`. Bytes past the end of the file read
    /// as zeros (callers that must not read past the end check [`Storage::len`] first).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// The current length of the file in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Deallocates `[offset, offset+len)` so it reads as zeros, keeping the file size.
    /// Falls back to writing zeros where the file system cannot punch holes.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The file's path, when it has one (for error messages).
    fn path(&self) -> Option<&Path>;
    /// Releases what the storage holds beyond the data (image locks) when the image
    /// is closed; the storage may still be dropped later.
    fn release(&self) -> io::Result<()> {
        Ok(())
    }
    /// A read-only shared mapping of the file covering at least `[0, end)`, if this
    /// storage can map its file and the file is at least `end` bytes long now.
    ///
    /// A mapping only stays safe to read below the file's length: the image never
    /// shrinks its file while data I/O holds the image's I/O gate, and callers read a
    /// mapping only under that gate (see `Image::read_mapped`).
    fn mapping(&self, _end: u64) -> Option<Arc<Mmap>> {
        None
    }
}

/// Whether every page under `map[offset..offset + len]` is in the page cache now, so
/// reading it will not wait for the disk (`mincore`). False if the range is outside
/// the mapping.
pub fn resident(map: &Mmap, offset: usize, len: usize) -> bool {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let Some(end) = offset.checked_add(len).filter(|&e| e <= map.len()) else {
        return false;
    };
    if len == 0 {
        return true;
    }
    let start = offset - offset % page;
    let mut vec = vec![0u8; (end - start).div_ceil(page)];
    // SAFETY: `[start, end)` lies inside the mapping (checked above) and starts on a
    // page boundary (the mapping does); `vec` has one byte per page of it.
    let r = unsafe {
        libc::mincore(
            map.as_ptr().add(start) as *mut libc::c_void,
            end - start,
            vec.as_mut_ptr(),
        )
    };
    r == 0 && vec.iter().all(|v| v & 1 == 1)
}

/// Size of the zero-filled chunks written when a hole cannot be punched.
const ZERO_CHUNK: usize = 1 << 20;

/// The end of `[offset, offset + len)`, or an `InvalidInput` error if it overflows.
fn range_end(offset: u64, len: u64) -> io::Result<u64> {
    offset.checked_add(len).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("byte range at offset {offset} with length {len} overflows"),
        )
    })
}

/// How [`FileStorage::open`] opens an image file.
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

/// An image stored in a host file (or block device), accessed with `pread`/`pwrite`.
///
/// The image lock taken when opening is tied to this value's open file description and
/// is released when it is dropped.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writable: bool,
    lock: LockMode,
    /// The newest mapping of the file (see [`Storage::mapping`]); replaced by a
    /// larger one when a read needs bytes past its end.
    map: Mutex<Option<Arc<Mmap>>>,
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
        let storage = FileStorage {
            file,
            path: path.to_path_buf(),
            writable: mode.writable,
            lock: mode.lock,
            map: Mutex::new(None),
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
        let path = path.as_ref();
        check_writable_mode(path, true, lock)?;
        let io_err = |source| OpenError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        let storage = FileStorage {
            file,
            path: path.to_path_buf(),
            writable: true,
            lock,
            map: Mutex::new(None),
        };
        storage.take_lock()?;
        Storage::set_len(&storage, 0).map_err(io_err)?;
        Ok(storage)
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

    /// Zero-fills `[offset, end)` with ordinary writes, in bounded chunks.
    fn write_zeros(&self, offset: u64, end: u64) -> io::Result<()> {
        let total = end - offset;
        let chunk_len = usize::try_from(total).map_or(ZERO_CHUNK, |t| t.min(ZERO_CHUNK));
        let zeros = vec![0u8; chunk_len];
        let mut pos = offset;
        while pos < end {
            let n = usize::try_from(end - pos).map_or(chunk_len, |r| r.min(chunk_len));
            self.file.write_all_at(&zeros[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
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
        range_end(offset, buf.len() as u64)?;
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
        *slot = Some(Arc::clone(&map));
        Some(map)
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
            Err(e) if sys::is_unsupported(&e) => self.write_zeros(offset, end),
            Err(e) => Err(e),
        }
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn release(&self) -> io::Result<()> {
        crate::storage::lock::unlock_file(&self.file).map_err(io::Error::from)
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

    pub(super) fn is_unsupported(err: &io::Error) -> bool {
        err.kind() == io::ErrorKind::Unsupported
    }
}

/// An in-memory [`Storage`], for tests and scratch images.
///
/// It grows on demand up to [`MemStorage::MAX_LEN`]; writes or resizes beyond that,
/// ranges whose end overflows `u64`, and allocation failures are reported as I/O errors
/// rather than panics or aborts.
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
    fn read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
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

/// A file whose fdatasyncs are deferred: each `sync_data` is a no-op; the owner makes
/// one real fdatasync at the end ([`DeferredSync::sync_now`]), or none. For files that
/// are useless until complete: an import's output, benchmark fixtures.
///
/// So that the final fdatasync does not wait for every byte at once, writeback can be
/// started in the background ([`WriteBehind::Background`]): each time
/// [`WRITE_BEHIND_BYTES`] more have been written, a helper thread calls
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)` (which submits the dirty pages and may
/// block while the disk's queue is full), so the disk writes and the submission runs on
/// another core while the owner goes on copying.
#[derive(Debug)]
pub struct DeferredSync {
    file: FileStorage,
    /// Bytes written since writeback was last started.
    pending: std::sync::atomic::AtomicU64,
    write_behind: WriteBehind,
    /// The helper thread that starts writeback; without it (it could not be started)
    /// the writes start writeback themselves.
    flusher: Option<Flusher>,
}

/// Bytes a [`DeferredSync`] file takes between two starts of background writeback.
pub const WRITE_BEHIND_BYTES: u64 = 16 << 20;

/// Whether a [`DeferredSync`] file starts writeback while it is being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteBehind {
    /// Every [`WRITE_BEHIND_BYTES`], on a helper thread: for a file its owner will
    /// sync at the end.
    Background,
    /// Never: the kernel writes the pages back when it chooses (for a file that will
    /// not be synced by its owner).
    Off,
}

/// The helper thread of [`WriteBehind::Background`] and the channel that wakes it.
#[derive(Debug)]
struct Flusher {
    kick: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Flusher {
    /// Starts a thread that starts writeback of `file` each time it is kicked; `None`
    /// if the descriptor cannot be duplicated or the thread cannot be started (the
    /// writes then start writeback themselves).
    fn start(file: &File) -> Option<Flusher> {
        let file = file.try_clone().ok()?;
        // One pending kick is enough: a call covers every page dirty by then.
        let (kick, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("qcowx-writeback".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    start_writeback(&file);
                }
            })
            .ok()?;
        Some(Flusher { kick, thread })
    }
}

/// Starts writeback of the whole file's dirty pages without waiting for the disk. A
/// failure here only loses the overlap: the final fdatasync reports any write error.
fn start_writeback(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor the caller owns; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

impl DeferredSync {
    /// Wraps `file` with [`WriteBehind::Background`]; nothing is written or synced
    /// until the owner does.
    pub fn new(file: FileStorage) -> DeferredSync {
        DeferredSync::with_write_behind(file, WriteBehind::Background)
    }

    /// Wraps `file`, starting writeback as `write_behind` says.
    pub fn with_write_behind(file: FileStorage, write_behind: WriteBehind) -> DeferredSync {
        let flusher = match write_behind {
            WriteBehind::Background => Flusher::start(&file.file),
            WriteBehind::Off => None,
        };
        DeferredSync {
            file,
            pending: std::sync::atomic::AtomicU64::new(0),
            write_behind,
            flusher,
        }
    }

    /// The real fdatasync the deferred ones stand for.
    pub fn sync_now(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Drop for DeferredSync {
    fn drop(&mut self) {
        if let Some(Flusher { kick, thread }) = self.flusher.take() {
            drop(kick); // ends the thread's loop
            let _ = thread.join();
        }
    }
}

impl Storage for DeferredSync {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        self.file.write_at(buf, offset)?;
        if self.write_behind == WriteBehind::Off {
            return Ok(());
        }
        let before = self.pending.fetch_add(buf.len() as u64, Ordering::Relaxed);
        if before + buf.len() as u64 >= WRITE_BEHIND_BYTES
            && self
                .pending
                .compare_exchange(
                    before + buf.len() as u64,
                    0,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            match &self.flusher {
                // A kick already waiting covers these pages too.
                Some(f) => drop(f.kick.try_send(())),
                None => start_writeback(&self.file.file),
            }
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.punch_hole(offset, len)
    }
    fn path(&self) -> Option<&Path> {
        self.file.path()
    }
    fn release(&self) -> io::Result<()> {
        self.file.release()
    }
}

/// A shared storage is a storage (so a [`Watched`] can wrap an `Arc<dyn Storage>`).
impl<T: Storage + ?Sized> Storage for Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        (**self).sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).punch_hole(offset, len)
    }
    fn path(&self) -> Option<&Path> {
        (**self).path()
    }
    fn release(&self) -> io::Result<()> {
        (**self).release()
    }
    fn mapping(&self, end: u64) -> Option<Arc<Mmap>> {
        (**self).mapping(end)
    }
}

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
    // No `mapping`: bytes lent from one would pass the hook by.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::lock::Permission;

    fn exercise(s: &dyn Storage) {
        assert_eq!(s.len().unwrap(), 0);
        s.write_at(b"hello", 10).unwrap();
        assert_eq!(s.len().unwrap(), 15);
        let mut buf = [0xffu8; 20];
        s.read_at(&mut buf, 5).unwrap();
        assert_eq!(&buf[..5], &[0; 5]);
        assert_eq!(&buf[5..10], b"hello");
        assert_eq!(&buf[10..], &[0; 10], "past EOF reads as zeros");

        let mut far = [0xffu8; 8];
        s.read_at(&mut far, 1 << 50).unwrap();
        assert_eq!(far, [0; 8]);
        assert!(s.read_at(&mut far, u64::MAX - 2).is_err());
        assert!(s.write_at(b"x", u64::MAX).is_err());
        assert!(s.punch_hole(u64::MAX, 2).is_err());

        s.set_len(12).unwrap();
        assert_eq!(s.len().unwrap(), 12);
        let mut buf = [0xffu8; 4];
        s.read_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"he\0\0");
        s.set_len(1 << 16).unwrap();
        s.write_at(&[7u8; 100], 5000).unwrap();
        s.punch_hole(5010, 50).unwrap();
        let mut buf = [0u8; 100];
        s.read_at(&mut buf, 5000).unwrap();
        assert!(buf[..10].iter().all(|&b| b == 7));
        assert!(buf[10..60].iter().all(|&b| b == 0));
        assert!(buf[60..].iter().all(|&b| b == 7));

        // Holes past EOF do not extend the file.
        s.punch_hole((1 << 16) - 10, 1 << 20).unwrap();
        s.punch_hole(1 << 30, 1 << 20).unwrap();
        assert_eq!(s.len().unwrap(), 1 << 16);
        s.sync_data().unwrap();
    }

    #[test]
    fn watched_storage_shows_reads_and_writes_and_can_fail_them() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let s = Watched::new(MemStorage::new(), move |a| {
            log.lock().unwrap().push(a);
            match a {
                Access::Write { offset: 666, .. } => Err(io::ErrorKind::Other.into()),
                _ => Ok(()),
            }
        });
        exercise(&s);
        s.write_at(b"abc", 7).unwrap();
        let mut b = [0u8; 3];
        s.read_at(&mut b, 7).unwrap();
        assert_eq!(&b, b"abc");
        let before = s.inner.read().clone();
        assert!(s.write_at(b"x", 666).is_err());
        assert!(
            *s.inner.read() == before,
            "the refused write did not reach the storage"
        );
        let seen = seen.lock().unwrap();
        assert!(seen.ends_with(&[
            Access::Write { offset: 7, len: 3 },
            Access::Read { offset: 7, len: 3 },
            Access::Write {
                offset: 666,
                len: 1
            },
        ]));
        assert!(s.mapping(1).is_none(), "nothing is lent past the hook");
    }

    #[test]
    fn mem_storage_basics() {
        let s = MemStorage::new();
        exercise(&s);
        assert!(s.path().is_none());
        assert_eq!(s.to_vec().len(), 1 << 16);
        let s = MemStorage::from_vec(vec![1, 2, 3]);
        assert_eq!(s.len().unwrap(), 3);
        assert_eq!(s.into_vec(), vec![1, 2, 3]);
    }

    #[test]
    fn mem_storage_rejects_huge_sizes() {
        let s = MemStorage::new();
        let err = s.write_at(b"x", MemStorage::MAX_LEN).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(s.set_len(u64::MAX).is_err());
        assert!(s.set_len(MemStorage::MAX_LEN + 1).is_err());
        s.write_at(&[], u64::MAX).unwrap();
        assert_eq!(s.len().unwrap(), 0);
        assert!(format!("{s:?}").contains("len: 0"));
    }

    #[test]
    fn file_storage_basics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let s = FileStorage::create(&path, LockMode::Exclusive).unwrap();
        assert_eq!(s.path(), Some(path.as_path()));
        assert!(s.is_writable());
        assert_eq!(s.lock_mode(), LockMode::Exclusive);
        exercise(&s);
        drop(s);

        let s = FileStorage::open(&path, OpenMode::read_only()).unwrap();
        assert!(!s.is_writable());
        assert_eq!(s.len().unwrap(), 1 << 16);
        assert!(s.write_at(b"x", 0).is_err());
        assert!(s.file().metadata().unwrap().is_file());
    }

    #[test]
    fn deferred_sync_starts_writeback_as_it_goes() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let s =
            DeferredSync::new(FileStorage::create(dir.path().join("img"), LockMode::None).unwrap());
        exercise(&s);
        let chunk = vec![0x5au8; 1 << 20];
        let n = 2 * WRITE_BEHIND_BYTES / chunk.len() as u64 + 3;
        for i in 0..n {
            s.write_at(&chunk, i * chunk.len() as u64).unwrap();
            // Writeback was started (and the count reset) each time it reached the bound.
            assert!(s.pending.load(Ordering::Relaxed) < WRITE_BEHIND_BYTES);
        }
        assert_eq!(s.pending.load(Ordering::Relaxed), 3 << 20);
        // The writeback is started by the helper thread, which dropping the file ends.
        assert!(s.flusher.is_some());
        s.sync_data().unwrap();
        s.sync_now().unwrap();
        let mut back = vec![0u8; chunk.len()];
        s.read_at(&mut back, (n - 1) * chunk.len() as u64).unwrap();
        assert_eq!(back, chunk);
        drop(s);
    }

    #[test]
    fn deferred_sync_without_write_behind_leaves_the_pages_to_the_kernel() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let file = FileStorage::create(dir.path().join("img"), LockMode::None).unwrap();
        let s = DeferredSync::with_write_behind(file, WriteBehind::Off);
        assert!(s.flusher.is_none());
        exercise(&s);
        let chunk = vec![0xa5u8; 1 << 20];
        for i in 0..(WRITE_BEHIND_BYTES >> 20) + 1 {
            s.write_at(&chunk, i << 20).unwrap();
        }
        // Nothing counted, nothing started.
        assert_eq!(s.pending.load(Ordering::Relaxed), 0);
        let mut back = vec![0u8; chunk.len()];
        s.read_at(&mut back, WRITE_BEHIND_BYTES).unwrap();
        assert_eq!(back, chunk);
    }

    #[test]
    fn file_storage_zero_fill_fallback() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let s = FileStorage::create(&path, LockMode::None).unwrap();
        let data = vec![0xaau8; 3 * ZERO_CHUNK];
        s.write_at(&data, 0).unwrap();
        s.write_zeros(100, (2 * ZERO_CHUNK + 100) as u64).unwrap();
        let mut back = vec![0u8; data.len()];
        s.read_at(&mut back, 0).unwrap();
        assert!(back[..100].iter().all(|&b| b == 0xaa));
        assert!(back[100..2 * ZERO_CHUNK + 100].iter().all(|&b| b == 0));
        assert!(back[2 * ZERO_CHUNK + 100..].iter().all(|&b| b == 0xaa));
        assert_eq!(s.len().unwrap(), data.len() as u64);
    }

    #[test]
    fn create_does_not_truncate_a_locked_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let a = FileStorage::create(&path, LockMode::Exclusive).unwrap();
        a.write_at(b"precious", 0).unwrap();
        let err = FileStorage::create(&path, LockMode::Exclusive).unwrap_err();
        assert!(err.lock_error().is_some(), "{err}");
        assert_eq!(a.len().unwrap(), 8);
    }

    #[test]
    fn open_errors_carry_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing");
        let err = FileStorage::open(&path, OpenMode::read_only()).unwrap_err();
        assert_eq!(err.path(), path);
        assert!(err.to_string().contains("missing"), "{err}");
        let io: io::Error = err.into();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);

        let err = FileStorage::open(&path, OpenMode::read_write().with_lock(LockMode::Shared))
            .unwrap_err();
        assert!(matches!(
            err,
            OpenError::WritableWithoutExclusiveLock { .. }
        ));
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn two_opens_in_one_process_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let writer = FileStorage::create(&path, LockMode::Exclusive).unwrap();

        let err = FileStorage::open(&path, OpenMode::read_write()).unwrap_err();
        let lock_err = err.lock_error().expect("lock conflict");
        assert_eq!(lock_err.permission(), Some(Permission::Write));
        assert!(err.to_string().contains("img: image is locked"), "{err}");
        let io: io::Error = err.into();
        assert_eq!(io.kind(), io::ErrorKind::ResourceBusy);

        assert!(FileStorage::open(&path, OpenMode::read_only()).is_err());
        let forced =
            FileStorage::open(&path, OpenMode::read_only().with_lock(LockMode::ForceShare))
                .unwrap();
        drop(writer);

        let r1 = FileStorage::open(&path, OpenMode::read_only()).unwrap();
        let r2 = FileStorage::open(&path, OpenMode::read_only()).unwrap();
        assert!(FileStorage::open(&path, OpenMode::read_write()).is_err());
        drop((r1, r2, forced));
        FileStorage::open(&path, OpenMode::read_write()).unwrap();
    }
}
