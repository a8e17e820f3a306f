//! A [`Storage`] that records every write and sync, so tests can replay crashes.
//!
//! [`CrashStorage`] behaves like a file whose writes reach the disk only at
//! [`Storage::sync_data`]. Its history can be cut at any point: [`CrashStorage::image_at`]
//! returns what the disk could hold if power failed there — everything synced before
//! the cut, plus any subset of the writes issued since the last sync, applied in any
//! order, some of them torn at 512-byte sector boundaries. It can also fail writes on
//! demand to simulate a full disk or an I/O error.
//!
//! It exists for tests of qcowx's crash protocol and fault handling; it keeps the whole
//! history in memory, so use it with small images.

use std::io;
use std::path::Path;
use std::sync::Mutex;

use crate::storage::Storage;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
    Punch { offset: u64, len: u64 },
}

#[derive(Debug, Clone)]
enum Event {
    Op(Op),
    Sync,
}

#[derive(Debug, Default)]
struct Inner {
    live: Vec<u8>,
    history: Vec<Event>,
    writes: u64,
    fail_from: Option<(u64, i32)>,
}

/// An in-memory file with a crash-replayable history.
///
/// ```
/// use std::sync::Arc;
/// use qcowx_core::storage::crashsim::CrashStorage;
/// use qcowx_core::storage::{MemStorage, Storage};
/// use qcowx_core::{CreateOptions, Image, OpenOptions};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let disk = Arc::new(CrashStorage::new());
/// let img = Image::create_in(disk.clone(), &CreateOptions::new(1 << 20))?;
/// img.write_at(&[1; 4096], 0)?;
/// img.flush()?;
/// let flushed = disk.cut_points(); // history up to here is durable
/// img.write_at(&[2; 4096], 0)?; // not flushed: may or may not survive
/// let cuts = disk.cut_points();
/// std::mem::forget(img); // the power fails
///
/// // A crash at any point after the flush, whatever became of the unflushed write
/// // (lost, kept or torn), opens and reads the flushed data or the new data.
/// for cut in flushed..=cuts {
///     for seed in 0..4 {
///         let bytes = disk.image_at(cut, seed);
///         let mem = Arc::new(MemStorage::from_vec(bytes));
///         let img = Image::from_storage(mem, &OpenOptions::new().write(true))?;
///         let mut b = [0u8; 512];
///         img.read_at(&mut b, 0)?;
///         assert!(b == [1; 512] || b == [2; 512], "cut {cut}: {:?}", &b[..4]);
///     }
/// }
///
/// // Failing writes on demand: a full disk after two more writes.
/// let full = CrashStorage::from_vec(vec![0; 512]);
/// full.fail_writes(Some((2, 28)));
/// full.write_at(b"a", 0).unwrap();
/// full.write_at(b"b", 1).unwrap();
/// assert_eq!(full.write_at(b"c", 2).unwrap_err().raw_os_error(), Some(28));
/// assert_eq!(&full.to_vec()[..3], b"ab\0");
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct CrashStorage {
    inner: Mutex<Inner>,
}

/// A small deterministic PRNG (xorshift64*), so cuts are reproducible from a seed.
///
/// ```
/// use qcowx_core::storage::crashsim::Rng;
///
/// let (mut a, mut b) = (Rng::new(5), Rng::new(5));
/// assert_eq!(a.next_u64(), b.next_u64(), "the same seed, the same sequence");
/// assert!((0..100).all(|_| a.below(10) < 10));
/// ```
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

fn apply(disk: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if disk.len() < end {
                disk.resize(end, 0);
            }
            disk[*offset as usize..end].copy_from_slice(data);
        }
        Op::SetLen(len) => disk.resize(*len as usize, 0),
        Op::Punch { offset, len } => {
            let start = (*offset as usize).min(disk.len());
            let end = ((offset + len) as usize).min(disk.len());
            disk[start..end].fill(0);
        }
    }
}

impl CrashStorage {
    /// An empty file.
    pub fn new() -> CrashStorage {
        CrashStorage::default()
    }

    /// A file that starts (durably) with `data`.
    pub fn from_vec(data: Vec<u8>) -> CrashStorage {
        let s = CrashStorage::default();
        {
            let mut g = s.lock();
            g.history.push(Event::Op(Op::Write {
                offset: 0,
                data: data.clone(),
            }));
            g.history.push(Event::Sync);
            g.live = data;
        }
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of points the history can be cut at (`0..=cut_points()`).
    pub fn cut_points(&self) -> usize {
        self.lock().history.len()
    }

    /// The current contents, as reads see them.
    pub fn to_vec(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// Makes every write from now on, after `after` more successful ones, fail with
    /// the OS error `errno` (e.g. `libc::ENOSPC`, `libc::EIO`); `None` stops failing.
    pub fn fail_writes(&self, rule: Option<(u64, i32)>) {
        let mut g = self.lock();
        g.fail_from = rule.map(|(after, errno)| (g.writes + after, errno));
    }

    /// What the disk could hold after a crash just before history event `cut`: every
    /// event before the last sync preceding `cut` is durable; each write issued after
    /// that sync is independently lost, kept, or torn (a random subset of its 512-byte
    /// sectors kept), and the kept ones land in a random order.
    pub fn image_at(&self, cut: usize, seed: u64) -> Vec<u8> {
        let g = self.lock();
        let cut = cut.min(g.history.len());
        let mut disk = Vec::new();
        let mut pending: Vec<&Op> = Vec::new();
        for ev in &g.history[..cut] {
            match ev {
                Event::Op(op) => pending.push(op),
                Event::Sync => {
                    for op in pending.drain(..) {
                        apply(&mut disk, op);
                    }
                }
            }
        }
        let mut rng = Rng::new(seed);
        // Random order: Fisher-Yates.
        for i in (1..pending.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            pending.swap(i, j);
        }
        for op in pending {
            match rng.below(4) {
                0 => {}
                1 => {
                    if let Op::Write { offset, data } = op {
                        // Torn: keep a random subset of sectors.
                        for (k, chunk) in data.chunks(512).enumerate() {
                            if rng.below(2) == 0 {
                                apply(
                                    &mut disk,
                                    &Op::Write {
                                        offset: offset + k as u64 * 512,
                                        data: chunk.to_vec(),
                                    },
                                );
                            }
                        }
                    } else {
                        apply(&mut disk, op);
                    }
                }
                _ => apply(&mut disk, op),
            }
        }
        disk
    }
}

fn check_range(offset: u64, len: usize) -> io::Result<usize> {
    offset
        .checked_add(len as u64)
        .filter(|&e| e <= 1 << 36)
        .map(|e| e as usize)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.lock();
        buf.fill(0);
        if offset < g.live.len() as u64 {
            let start = offset as usize;
            let n = (g.live.len() - start).min(buf.len());
            buf[..n].copy_from_slice(&g.live[start..start + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = check_range(offset, buf.len())?;
        let mut g = self.lock();
        if let Some((from, errno)) = g.fail_from {
            if g.writes >= from {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        g.writes += 1;
        if g.live.len() < end {
            g.live.resize(end, 0);
        }
        g.live[offset as usize..end].copy_from_slice(buf);
        g.history.push(Event::Op(Op::Write {
            offset,
            data: buf.to_vec(),
        }));
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let n = check_range(len, 0)?;
        let mut g = self.lock();
        g.live.resize(n, 0);
        g.history.push(Event::Op(Op::SetLen(len)));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.lock().history.push(Event::Sync);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut g = self.lock();
        let start = (offset as usize).min(g.live.len());
        let end = (offset.saturating_add(len) as usize).min(g.live.len());
        g.live[start..end].fill(0);
        g.history.push(Event::Op(Op::Punch { offset, len }));
        Ok(())
    }

    fn path(&self) -> Option<&Path> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_keep_synced_writes() {
        let s = CrashStorage::new();
        s.write_at(&[1; 1024], 0).unwrap();
        s.sync_data().unwrap();
        s.write_at(&[2; 1024], 0).unwrap();
        let n = s.cut_points();
        for seed in 0..50 {
            let img = s.image_at(n, seed);
            // Every sector is either the synced or the unsynced version.
            for sector in img.chunks(512) {
                assert!(sector.iter().all(|&b| b == 1) || sector.iter().all(|&b| b == 2));
            }
        }
        assert_eq!(s.image_at(2, 0), vec![1; 1024]);
        assert!(s.image_at(0, 0).is_empty());
    }

    #[test]
    fn injected_failures() {
        let s = CrashStorage::new();
        s.fail_writes(Some((1, libc::ENOSPC)));
        s.write_at(&[1], 0).unwrap();
        let e = s.write_at(&[1], 1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        s.fail_writes(None);
        s.write_at(&[1], 1).unwrap();
    }
}
