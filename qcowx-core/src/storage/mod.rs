//! Storage: the byte-addressed file an image lives in.
//!
//! Every access the engine makes to the host file goes through [`Storage`], so tests can
//! substitute an in-memory file or a recording layer that simulates crashes.
//!
//! Two implementations live here: [`FileStorage`], a host file accessed with positional
//! reads and writes and protected by a QEMU-compatible image lock (see
//! [`crate::storage::lock`]), and [`MemStorage`], a growable in-memory buffer.

#[cfg(feature = "testing")]
pub mod crashsim;
mod deferred;
mod file;
mod holes;
mod iobuf;
pub mod lock;
mod mapping;
mod mem;
mod small_writes;
#[cfg(any(test, feature = "testing"))]
mod watched;

pub use deferred::{DeferredSync, WriteBehind, WRITE_BEHIND_BYTES};
pub use file::{FileStorage, OpenError, OpenMode, MAP_RELEASE_BYTES};
pub use holes::data_runs;
pub use iobuf::{io_buf, IoBuf, IO_ALIGN};
pub use mapping::{copy_mapped, resident};
pub use mem::MemStorage;
pub use small_writes::take_split_time;
#[cfg(any(test, feature = "testing"))]
pub use watched::{Access, Watched};

use std::io;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

/// A positional, thread-safe byte store holding one image file.
///
/// An embedder that keeps images somewhere other than a local file implements it and
/// opens the image with [`crate::Image::from_storage`] (or creates one with
/// [`crate::Image::create_in`]). Here, a storage that counts the syncs it is asked for:
///
/// ```
/// use std::io;
/// use std::path::Path;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use qcowx_core::storage::{MemStorage, Storage};
/// use qcowx_core::{CreateOptions, Image};
///
/// #[derive(Debug, Default)]
/// struct Counted {
///     inner: MemStorage,
///     syncs: AtomicU64,
/// }
///
/// impl Storage for Counted {
///     fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
///         self.inner.read_at(buf, offset)
///     }
///     fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
///         self.inner.write_at(buf, offset)
///     }
///     fn len(&self) -> io::Result<u64> {
///         self.inner.len()
///     }
///     fn set_len(&self, len: u64) -> io::Result<()> {
///         self.inner.set_len(len)
///     }
///     fn sync_data(&self) -> io::Result<()> {
///         self.syncs.fetch_add(1, Ordering::Relaxed);
///         self.inner.sync_data()
///     }
///     fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
///         self.inner.punch_hole(offset, len)
///     }
///     fn path(&self) -> Option<&Path> {
///         None
///     }
/// }
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let storage = Arc::new(Counted::default());
/// let img = Image::create_in(storage.clone(), &CreateOptions::new(1 << 20))?;
/// let before = storage.syncs.load(Ordering::Relaxed);
/// img.write_at(b"data", 0)?;
/// img.flush()?;
/// assert!(storage.syncs.load(Ordering::Relaxed) > before, "a flush syncs");
/// # Ok(()) }
/// ```
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
    /// Tells the storage that `[offset, offset + len)` of a mapping it handed out
    /// ([`Storage::mapping`]) has just been read. Every page read through a mapping
    /// stays in the process's resident memory until the mapping lets it go, so a
    /// storage that maps its file releases its pages from time to time (see
    /// [`MAP_RELEASE_BYTES`]); they stay in the page cache.
    fn mapped_read(&self, _offset: u64, _len: u64) {}
    /// A hint that `[offset, offset + len)` will be read soon: a storage backed by a
    /// file starts reading it into the page cache in the background, so a reader
    /// that names what it will need ahead of time keeps the device busy with several
    /// reads at once. Changes no data; a storage that cannot use the hint ignores it.
    fn will_need(&self, _offset: u64, _len: u64) {}
    /// Which parts of `[offset, offset+len)` hold data, as the file system reports them
    /// ([`data_runs`]: `(start, end, holds_data)`, tiling the range); a hole reads as
    /// zeros. `None` where the storage cannot tell, or would have to guess: a storage
    /// that keeps written bytes anywhere but in its file must not answer from the file.
    fn data_runs(&self, _offset: u64, _len: u64) -> Option<Vec<(u64, u64, bool)>> {
        None
    }
    /// The bytes of storage the file occupies (`st_blocks * 512`); `None` where the
    /// storage has no such measure.
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    /// Reserves storage for `[offset, offset+len)` without changing what it reads
    /// (`fallocate`), extending the file if needed. Only for ranges that read as zeros
    /// (a new image's data area): where the storage cannot reserve, zeros are written.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
}

/// Writes zeros over `[offset, offset+len)` of `s`, [`ZERO_CHUNK`] bytes at a time.
pub(crate) fn write_zeros<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> io::Result<()> {
    let end = range_end(offset, len)?;
    let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut pos = offset;
    while pos < end {
        let n = (end - pos).min(ZERO_CHUNK as u64) as usize;
        s.write_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
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

/// A shared storage is a storage (so a wrapper such as `Watched` can wrap an
/// `Arc<dyn Storage>`).
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
    fn mapped_read(&self, offset: u64, len: u64) {
        (**self).mapped_read(offset, len)
    }
    fn will_need(&self, offset: u64, len: u64) {
        (**self).will_need(offset, len)
    }
    fn data_runs(&self, offset: u64, len: u64) -> Option<Vec<(u64, u64, bool)>> {
        (**self).data_runs(offset, len)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        (**self).allocated_bytes()
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).allocate(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::lock::Permission;
    use lock::LockMode;
    use std::sync::Mutex;

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
        let before = s.inner.to_vec();
        assert!(s.write_at(b"x", 666).is_err());
        assert!(
            s.inner.to_vec() == before,
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

    /// The resident memory (kB) of the mapping that starts at `addr`, from
    /// /proc/self/smaps.
    #[cfg(target_os = "linux")]
    fn mapping_rss_kb(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        assert!(lines.next().is_some(), "mapping {addr:x} not in smaps");
        lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("Rss of the mapping")
    }

    /// Reading a file through its mapping, telling the storage as the engine does,
    /// keeps the mapping's resident pages within `MAP_RELEASE_BYTES` (plus one read)
    /// however much is read; the bytes read stay right.
    #[cfg(target_os = "linux")]
    #[test]
    fn reads_through_the_mapping_do_not_make_it_resident() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create(dir.path().join("img"), LockMode::None).unwrap();
        let chunk = 1usize << 20;
        let total = 4 * MAP_RELEASE_BYTES as usize;
        for i in 0..total / chunk {
            s.write_at(&vec![i as u8; chunk], (i * chunk) as u64)
                .unwrap();
        }
        let map = s.mapping(total as u64).expect("a mapping");
        let mut peak = 0;
        for i in 0..total / chunk {
            let bytes = &map[i * chunk..(i + 1) * chunk];
            // One byte of every page, read as a send from the mapping would.
            let sum: u64 = bytes
                .iter()
                .step_by(4096)
                .map(|&b| u64::from(std::hint::black_box(b)))
                .sum();
            assert_eq!(sum, (chunk / 4096) as u64 * u64::from(i as u8));
            s.mapped_read((i * chunk) as u64, chunk as u64);
            peak = peak.max(mapping_rss_kb(map.as_ptr() as usize));
        }
        let bound = (MAP_RELEASE_BYTES + chunk as u64) / 1024;
        assert!(
            peak <= bound,
            "the mapping held {peak} kB after reading {} MiB through it (bound {bound} kB)",
            total >> 20
        );
    }

    /// Threads reading through the mapping while others make it give its pages back
    /// always see the file's bytes, and the file keeps them.
    #[test]
    fn reads_through_the_mapping_stay_right_while_it_gives_pages_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create(dir.path().join("img"), LockMode::None).unwrap();
        let chunk = 256usize << 10;
        let chunks = 64;
        for i in 0..chunks {
            s.write_at(&vec![i as u8 ^ 0x5a; chunk], (i * chunk) as u64)
                .unwrap();
        }
        let map = s.mapping((chunks * chunk) as u64).expect("a mapping");
        std::thread::scope(|scope| {
            for t in 0..4usize {
                let (s, map) = (&s, &map);
                scope.spawn(move || {
                    for k in 0..(4 * MAP_RELEASE_BYTES as usize / chunk) {
                        let i = (k * 7 + t * 13) % chunks;
                        let bytes = &map[i * chunk..(i + 1) * chunk];
                        assert!(
                            bytes.iter().step_by(512).all(|&b| b == i as u8 ^ 0x5a),
                            "chunk {i} read wrong"
                        );
                        s.mapped_read((i * chunk) as u64, chunk as u64);
                    }
                });
            }
        });
        let mut back = vec![0u8; chunk];
        for i in 0..chunks {
            s.read_at(&mut back, (i * chunk) as u64).unwrap();
            assert!(
                back.iter().all(|&b| b == i as u8 ^ 0x5a),
                "chunk {i} on file"
            );
        }
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

    /// A wrapper (an `Arc`, `DeferredSync`, `Watched`) answers what the file it
    /// wraps answers: where data lies, how much is stored, reservations, and its
    /// mapping (which lent reads use; not through `Watched`, whose hook sees every
    /// read).
    #[test]
    fn wrappers_ask_the_file_about_holes_and_space() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            let f = FileStorage::create(dir.path().join(name), LockMode::None).unwrap();
            f.write_at(&[1u8; 4096], 1 << 20).unwrap();
            f.set_len(4 << 20).unwrap();
            f
        };
        let plain = open("plain");
        let runs = plain.data_runs(0, 4 << 20).expect("a file knows its holes");
        assert!(
            runs.iter().any(|&(s, _, data)| data && s <= 1 << 20),
            "{runs:?}"
        );
        let used = plain.allocated_bytes().unwrap();
        let arc: Arc<dyn Storage> = Arc::new(open("arc"));
        let deferred = DeferredSync::with_write_behind(open("deferred"), WriteBehind::Off);
        let watched = Watched::new(open("watched"), |_| Ok(()));
        for (name, s) in [
            ("arc", &arc as &dyn Storage),
            ("deferred", &deferred),
            ("watched", &watched),
        ] {
            assert_eq!(s.data_runs(0, 4 << 20).as_ref(), Some(&runs), "{name}");
            match (name, s.mapping(4 << 20)) {
                // Bytes lent from a mapping would pass its hook by.
                ("watched", map) => assert!(map.is_none(), "watched maps"),
                (_, Some(map)) => assert_eq!(map[(1 << 20) + 100], 1, "{name}"),
                (_, None) => panic!("{name}: no mapping"),
            }
            assert_eq!(s.allocated_bytes(), Some(used), "{name}");
            s.allocate(2 << 20, 1 << 20).unwrap();
            assert!(s.allocated_bytes().unwrap() >= used + (1 << 20), "{name}");
            let mut b = [9u8; 16];
            s.read_at(&mut b, 2 << 20).unwrap();
            assert_eq!(b, [0; 16], "{name}: a reservation reads as zeros");
        }
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
        write_zeros(&s, 100, 2 * ZERO_CHUNK as u64).unwrap();
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
