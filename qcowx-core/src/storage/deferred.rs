//! A file whose fdatasyncs are deferred to one at the end, with writeback started
//! in the background: for files that are useless until complete.

use std::fs::File;
use std::io;
use std::path::Path;

use super::*;

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
///
/// ```
/// use qcowx_core::storage::{DeferredSync, FileStorage, Storage, WriteBehind};
/// use qcowx_core::LockMode;
///
/// let dir = tempfile::tempdir().unwrap();
/// let out = DeferredSync::new(FileStorage::create(dir.path().join("out.img"), LockMode::Exclusive).unwrap());
/// out.write_at(&[1; 4096], 0).unwrap();
/// out.sync_data().unwrap(); // deferred: returns at once
/// out.sync_now().unwrap(); // the one real fdatasync
/// let lazy = DeferredSync::with_write_behind(
///     FileStorage::create(dir.path().join("scratch.img"), LockMode::Exclusive).unwrap(),
///     WriteBehind::Off,
/// );
/// lazy.write_at(&[2; 512], 0).unwrap();
/// assert_eq!(lazy.len().unwrap(), 512);
/// ```
#[derive(Debug)]
pub struct DeferredSync {
    file: FileStorage,
    /// Bytes written since writeback was last started.
    pub(super) pending: std::sync::atomic::AtomicU64,
    write_behind: WriteBehind,
    /// The helper thread that starts writeback; without it (it could not be started)
    /// the writes start writeback themselves.
    pub(super) flusher: Option<Flusher>,
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
pub(super) struct Flusher {
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
            WriteBehind::Background => Flusher::start(file.file()),
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
                None => start_writeback(self.file.file()),
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
    fn will_need(&self, offset: u64, len: u64) {
        self.file.will_need(offset, len)
    }
    fn mapping(&self, end: u64) -> Option<Arc<Mmap>> {
        self.file.mapping(end)
    }
    fn mapped_read(&self, offset: u64, len: u64) {
        self.file.mapped_read(offset, len)
    }
    // Writes go straight to the file (only the syncs wait), so the file answers.
    fn data_runs(&self, offset: u64, len: u64) -> Option<Vec<(u64, u64, bool)>> {
        self.file.data_runs(offset, len)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.file.allocated_bytes()
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.allocate(offset, len)
    }
}
