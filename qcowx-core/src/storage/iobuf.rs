//! Page-aligned byte buffers for bulk reads.
//!
//! The kernel copies cached file data into a reader's buffer with `rep movsb`. On some
//! CPUs (the AMD EPYC these benches run on) that copy runs about five times slower
//! when the destination starts a few bytes (up to about 31) past the source's offset
//! within a page: each load from the page-cache page aliases a store just made (same
//! low 12 address bits), and waits for it. A page-cache page starts at offset 0, and
//! a large `Vec<u8>` from the system allocator starts 16 bytes into its mapping —
//! exactly that case: 4 MiB `pread`s of cached data run at 2.3 GB/s into such a
//! buffer and at 12 GB/s into a page-aligned one (measured here; `qemu-img` and `dd`
//! read into page-aligned buffers too). Buffers that whole clusters or chunks of
//! megabytes are read into are therefore [`IoBuf`]s.

use aligned_vec::{AVec, ConstAlign};

/// The alignment of an [`IoBuf`]: a page.
pub const IO_ALIGN: usize = 4096;

/// A growable byte buffer whose first byte is page-aligned (see the module
/// documentation); it derefs to `[u8]`.
///
/// ```
/// use qcowx_core::storage::{io_buf, IO_ALIGN};
///
/// let mut buf = io_buf(8192);
/// assert_eq!(buf.len(), 8192);
/// assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
/// buf.resize(1 << 20, 0);
/// assert_eq!(buf.as_ptr() as usize % IO_ALIGN, 0);
/// assert!(buf.iter().all(|&b| b == 0));
/// ```
pub type IoBuf = AVec<u8, ConstAlign<IO_ALIGN>>;

/// A new [`IoBuf`] of `len` zero bytes.
///
/// ```
/// use qcowx_core::storage::{io_buf, MemStorage, Storage};
///
/// let disk = MemStorage::from_vec(vec![7u8; 1 << 20]);
/// let mut buf = io_buf(64 << 10);
/// disk.read_at(&mut buf, 4096).unwrap();
/// assert!(buf.iter().all(|&b| b == 7));
/// ```
pub fn io_buf(len: usize) -> IoBuf {
    let mut buf = IoBuf::new(0);
    buf.resize(len, 0);
    buf
}
