//! Small writes into large page-cache folios.
//!
//! Linux caches a file in folios of up to 2 MiB when it was written or read in large
//! pieces (`cp`, readahead, QEMU's own large writes). On a file system that tracks a
//! folio's blocks with buffer heads (ext4), a buffered `pwrite` walks every block of
//! the folio it lands in, not only the ones it changes: a 4 KiB overwrite into a
//! 2 MiB folio costs about ten times one into a 4 KiB page (measured on Linux 6.18,
//! ext4: 12–17 µs against 1.5), and writes to one file are serialized by its inode
//! lock, so the walk caps a server's small overwrites however many cores it has.
//!
//! Before the first small write into a stretch of the file ([`REGION`] bytes), the
//! storage has the kernel split the large folio under the written pages into 4 KiB
//! pages, which only the kernel can do: it maps those pages (`MADV_POPULATE_READ`,
//! only when they are already cached: nothing is read from the disk for this) and
//! marks them cold (`MADV_COLD`), which splits a large folio the range covers only in
//! part. The pages stay cached and keep their bytes and their dirty state; only how
//! the kernel groups them changes. The pages mapped count towards the mapping's
//! periodic release ([`super::MAP_RELEASE_BYTES`]), so resident memory does not grow.
//! Every step is a hint: where one fails (another kernel, a folio another process
//! maps, a folio under writeback) the write goes ahead and costs what it cost
//! before. Each stretch is tried once per open (a `mincore` and the two `madvise`
//! calls: about 27 µs for a 128 KiB folio split, more where the kernel has to shoot
//! down the folio's mappings on another CPU, 5 µs where the pages are 4 KiB already);
//! one whose written pages were not cached is not tried again, as a write there makes
//! pages of its own size.
//!
//! Why not write through the mapping instead: the first store into a clean folio of
//! a shared mapping makes the whole folio dirty (`block_page_mkwrite`), so a flush
//! would write back up to 2 MiB per 4 KiB written.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use memmap2::Mmap;

/// Writes shorter than this split the folios under them first; longer ones cover
/// enough of a folio that its walk costs little per byte.
pub(super) const SMALL_WRITE: usize = 64 << 10;

/// The stretch of the file one split attempt stands for. Folios are naturally
/// aligned, so a stretch lies within one large folio or holds several smaller ones,
/// of which the one under the write is split; those left are at most 64 KiB, whose
/// walk (16 blocks) costs well under a microsecond. (A copy made by `cp` is cached in
/// 128 KiB folios on Linux 6.18's ext4, a file read back sequentially in folios
/// growing to 2 MiB.)
pub(super) const REGION: u64 = 128 << 10;

thread_local! {
    /// Nanoseconds this thread spent splitting folios since [`take_split_time`].
    static SPLIT_NS: Cell<u64> = const { Cell::new(0) };
}

/// The time the calling thread spent splitting page-cache folios before small writes
/// (see the module's documentation) since it last asked, and starts counting again.
/// The split is a one-off cost per stretch of the file, paid inside the first small
/// write there, and CPU work, not a wait for the disk: a caller that times its writes
/// to tell page-cache speed from disk speed (the NBD server's choice of running small
/// requests on its reading thread) leaves it out.
///
/// ```
/// use qcowx_core::storage::{take_split_time, FileStorage, Storage};
/// use qcowx_core::LockMode;
///
/// let dir = tempfile::tempdir().unwrap();
/// let f = FileStorage::create(dir.path().join("a.img"), LockMode::Exclusive).unwrap();
/// f.write_at(&[1; 1 << 20], 0).unwrap();
/// let _ = take_split_time();
/// f.write_at(&[2; 4096], 4096).unwrap(); // the first small write into its stretch
/// let spent = take_split_time();
/// assert!(spent < std::time::Duration::from_secs(1));
/// assert_eq!(take_split_time(), std::time::Duration::ZERO, "counted once");
/// ```
pub fn take_split_time() -> Duration {
    Duration::from_nanos(SPLIT_NS.with(|c| c.replace(0)))
}

/// The stretches of one file already split (one bit each), grown as writes reach
/// further into the file: 1 MiB for every TiB of file.
#[derive(Debug, Default)]
pub(super) struct SplitRegions {
    done: RwLock<Vec<AtomicU64>>,
}

impl SplitRegions {
    /// Whether stretch number `region` was already split.
    fn is_done(&self, region: u64) -> bool {
        let done = self.done.read().unwrap_or_else(|p| p.into_inner());
        let word = (region / 64) as usize;
        done.get(word)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (region % 64)) != 0)
    }

    fn mark(&self, region: u64) {
        let word = (region / 64) as usize;
        let bit = 1 << (region % 64);
        {
            let done = self.done.read().unwrap_or_else(|p| p.into_inner());
            if let Some(w) = done.get(word) {
                w.fetch_or(bit, Ordering::Relaxed);
                return;
            }
        }
        let mut done = self.done.write().unwrap_or_else(|p| p.into_inner());
        if done.len() <= word {
            done.resize_with(word + 1, AtomicU64::default);
        }
        done[word].fetch_or(bit, Ordering::Relaxed);
    }

    /// Whether a write of `[offset, end)` lands in a stretch not split yet (a
    /// read lock and a load or two: the test every small write makes).
    pub(super) fn pending(&self, offset: u64, end: u64) -> bool {
        end > offset && (offset / REGION..=(end - 1) / REGION).any(|r| !self.is_done(r))
    }

    /// Splits the large folios under `[offset, end)` of the file `map` maps (see
    /// the module's documentation) and marks the stretches it touches done. Does
    /// nothing where `map` does not reach.
    pub(super) fn split_before_write(&self, map: &Mmap, offset: u64, end: u64) {
        let page = super::mapping::page_size() as u64;
        let len = map.len() as u64;
        if end > len || offset >= end {
            return;
        }
        for r in offset / REGION..=(end - 1) / REGION {
            // The written pages within the stretch, cut at the end of the mapping.
            let (rs, re) = (r * REGION, ((r + 1) * REGION).min(len));
            let re = re - re % page;
            let ws = offset.max(rs);
            let ws = ws - ws % page;
            let we = end.min(re).next_multiple_of(page).min(re);
            let t0 = Instant::now();
            if ws < we && super::resident(map, ws as usize, (we - ws) as usize) {
                sys::split(map, ws as usize, (we - ws) as usize);
            }
            let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            SPLIT_NS.with(|c| c.set(c.get().saturating_add(ns)));
            self.mark(r);
        }
    }

    /// Marks the stretches under `[offset, end)` done.
    pub(super) fn mark_range(&self, offset: u64, end: u64) {
        if end > offset {
            for r in offset / REGION..=(end - 1) / REGION {
                self.mark(r);
            }
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod sys {
    use memmap2::Mmap;

    /// `madvise` on `[start, start + len)` of `map`; failures are ignored (hints).
    fn advise(map: &Mmap, start: usize, len: usize, advice: libc::c_int) {
        // SAFETY: the range lies inside the mapping (the caller checks) and starts on
        // a page boundary. The two advices used here change no byte of a shared
        // file mapping: POPULATE_READ faults pages in for reading, COLD moves them on
        // the kernel's reclaim lists (splitting a large folio to do so).
        unsafe {
            libc::madvise(map.as_ptr().add(start) as *mut libc::c_void, len, advice);
        }
    }

    /// Splits the large folios `[start, start + len)` covers only in part.
    pub(super) fn split(map: &Mmap, start: usize, len: usize) {
        advise(map, start, len, libc::MADV_POPULATE_READ);
        advise(map, start, len, libc::MADV_COLD);
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod sys {
    pub(super) fn split(_map: &memmap2::Mmap, _start: usize, _len: usize) {}
}
