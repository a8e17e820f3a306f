//! Reading a file through its mapping, safely: which pages are in the page cache
//! ([`resident`], so a lender can tell a read that would wait for the disk) and a copy
//! out of a mapping that turns a page gone from under it into an error
//! ([`copy_mapped`]). The mapping itself comes from [`super::Storage::mapping`]; a
//! server that lends mapped bytes to its clients (the NBD server's large reads)
//! copies whatever it cannot send at once with [`copy_mapped`].

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::Mmap;

/// Whether every page under `map[offset..offset + len]` is in the page cache now, so
/// reading it will not wait for the disk (`mincore`). False if the range is outside
/// the mapping.
///
/// ```
/// use qcowx_core::storage::{resident, FileStorage, Storage};
/// use qcowx_core::LockMode;
///
/// let dir = tempfile::tempdir().unwrap();
/// let f = FileStorage::create(dir.path().join("a.img"), LockMode::Exclusive).unwrap();
/// f.write_at(&[7; 8192], 0).unwrap();
/// let map = f.mapping(8192).expect("a file maps");
/// assert!(resident(&map, 0, 8192), "just written: in the page cache");
/// assert!(!resident(&map, 0, map.len() + 1), "outside the mapping");
/// ```
pub fn resident(map: &Mmap, offset: usize, len: usize) -> bool {
    let page = page_size();
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

/// The size of a memory page (`sysconf(_SC_PAGESIZE)`; 4 KiB if it cannot be read).
pub(super) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// Whether `process_vm_readv` may be used (cleared the first time the kernel or a
/// sandbox refuses it).
static VM_READV: AtomicBool = AtomicBool::new(true);

/// Copies `src` — bytes of a file mapping — into `dst` (as long as `src`) through the
/// kernel (`process_vm_readv` on this process), so that a page gone from under the
/// mapping (the file cut short by a process that ignores the image locks) makes this
/// one copy fail with `EFAULT` instead of killing the server with `SIGBUS`, as a
/// plain copy would. Where the call is refused (`ENOSYS`, `EPERM`), a plain copy.
///
/// ```
/// use qcowx_core::storage::{copy_mapped, FileStorage, Storage};
/// use qcowx_core::LockMode;
///
/// let dir = tempfile::tempdir().unwrap();
/// let f = FileStorage::create(dir.path().join("a.img"), LockMode::Exclusive).unwrap();
/// f.write_at(b"mapped bytes", 100).unwrap();
/// let map = f.mapping(112).expect("a file maps");
/// let mut out = [0u8; 12];
/// copy_mapped(&mut out, &map[100..112]).unwrap();
/// assert_eq!(&out, b"mapped bytes");
/// ```
pub fn copy_mapped(dst: &mut [u8], src: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < src.len() && VM_READV.load(Ordering::Relaxed) {
        let local = libc::iovec {
            iov_base: dst[done..].as_mut_ptr().cast(),
            iov_len: src.len() - done,
        };
        let remote = libc::iovec {
            iov_base: src[done..].as_ptr() as *mut libc::c_void,
            iov_len: src.len() - done,
        };
        // SAFETY: both ranges lie in this process: `local` in `dst`, writable for its
        // length; `remote` in `src`, only read, and faults there are reported, not
        // raised.
        let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
        if n > 0 {
            done += n as usize;
            continue;
        }
        if n == 0 {
            // No progress on a non-empty range: the next byte cannot be read.
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::ENOSYS | libc::EPERM) => VM_READV.store(false, Ordering::Relaxed),
            _ => return Err(e),
        }
    }
    dst[done..].copy_from_slice(&src[done..]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of a mapping whose file was cut short under it: the copy fails with
    /// EFAULT (a plain copy would kill the test process with SIGBUS); bytes still
    /// there copy as they are.
    #[test]
    fn copying_from_a_mapping_of_a_truncated_file_fails_without_a_signal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0x3cu8; 1 << 20]).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        // SAFETY: the test owns the file; the point is what happens when it shrinks.
        let map = unsafe { memmap2::Mmap::map(&file) }.expect("map");
        let mut dst = vec![0u8; 8192];
        copy_mapped(&mut dst, &map[..8192]).expect("copy");
        assert!(dst.iter().all(|&b| b == 0x3c));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(4096)
            .expect("truncate");
        assert!(
            VM_READV.load(Ordering::Relaxed),
            "process_vm_readv refused here: the copy would be a plain one"
        );
        let err = copy_mapped(&mut dst, &map[8192..16384]).expect_err("pages gone");
        assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
        copy_mapped(&mut dst[..4096], &map[..4096]).expect("first page still there");
    }
}
