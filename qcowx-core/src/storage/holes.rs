//! Which parts of a file hold data, as the file system reports them (`SEEK_DATA` and
//! `SEEK_HOLE`): for a raw layer's holes, and for qcow2 data clusters whose host
//! range was never written (metadata preallocation), which read as zeros.

use std::fs::File;

/// The parts of `[offset, offset+len)` of `file` (of `size` bytes), in order and
/// tiling the range, each `(start, end, holds_data)`: a hole reads as zeros, and so
/// does everything past `size`. `None` when the file system cannot tell (then any of
/// it may hold data).
///
/// ```
/// use std::os::unix::fs::FileExt;
/// use qcowx_core::storage::data_runs;
///
/// let dir = tempfile::tempdir().unwrap();
/// let file = std::fs::File::create(dir.path().join("f")).unwrap();
/// file.set_len(8 << 20).unwrap(); // all hole
/// file.write_all_at(&[1; 4096], 4 << 20).unwrap();
/// if let Some(runs) = data_runs(&file, 8 << 20, 0, 8 << 20) {
///     // The runs tile the range; the written block holds data, the start does not.
///     assert_eq!((runs[0].0, runs.last().unwrap().1), (0, 8 << 20));
///     assert!(runs.iter().any(|&(s, e, data)| data && s <= 4 << 20 && (4 << 20) < e));
///     assert!(!runs[0].2);
/// }
/// ```
pub fn data_runs(file: &File, size: u64, offset: u64, len: u64) -> Option<Vec<(u64, u64, bool)>> {
    let end = offset.saturating_add(len);
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |start: u64, stop: u64, data: bool| {
        if stop <= start {
            return;
        }
        match out.last_mut() {
            Some(l) if l.2 == data && l.1 == start => l.1 = stop,
            _ => out.push((start, stop, data)),
        }
    };
    let inside = end.min(size);
    let mut pos = offset;
    while pos < inside {
        match seek(file, pos, SeekKind::Data) {
            SeekResult::Unsupported => return None,
            SeekResult::None => {
                push(pos, inside, false);
                pos = inside;
            }
            SeekResult::At(data) => {
                let data = data.max(pos);
                push(pos, data.min(inside), false);
                if data >= inside {
                    pos = inside;
                    continue;
                }
                let hole = match seek(file, data, SeekKind::Hole) {
                    SeekResult::At(h) => h.max(data + 1),
                    _ => inside,
                };
                push(data, hole.min(inside), true);
                pos = hole.min(inside);
            }
        }
    }
    push(inside.max(offset), end, false);
    Some(out)
}

enum SeekKind {
    Data,
    Hole,
}

enum SeekResult {
    At(u64),
    /// No data at or after the offset.
    None,
    Unsupported,
}

#[cfg(target_os = "linux")]
fn seek(file: &File, pos: u64, kind: SeekKind) -> SeekResult {
    use std::os::unix::io::AsRawFd;
    let Ok(off) = libc::off_t::try_from(pos) else {
        return SeekResult::Unsupported;
    };
    let whence = match kind {
        SeekKind::Data => libc::SEEK_DATA,
        SeekKind::Hole => libc::SEEK_HOLE,
    };
    // SAFETY: lseek on a valid descriptor has no memory-safety requirements. The file
    // position it moves is not used by positional reads (pread).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return SeekResult::At(r as u64);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => SeekResult::None,
        _ => SeekResult::Unsupported,
    }
}

#[cfg(not(target_os = "linux"))]
fn seek(_file: &File, _pos: u64, _kind: SeekKind) -> SeekResult {
    SeekResult::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn runs_tile_the_range_and_find_the_written_part() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f")).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 65536], 1 << 20).unwrap();
        f.sync_all().unwrap();
        let Some(runs) = data_runs(&f, 4 << 20, 0, 5 << 20) else {
            return; // a file system that cannot tell: nothing to check
        };
        let mut pos = 0;
        for &(s, e, _) in &runs {
            assert_eq!(s, pos);
            assert!(e > s);
            pos = e;
        }
        assert_eq!(pos, 5 << 20);
        let at = |x: u64| runs.iter().find(|r| r.0 <= x && x < r.1).unwrap().2;
        assert!(at(1 << 20) && at((1 << 20) + 65535));
        assert!(!at(0) && !at(3 << 20) && !at(4 << 20));
    }
}
