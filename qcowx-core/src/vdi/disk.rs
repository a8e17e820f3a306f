//! [`Disk`]: the handle for I/O on one VDI or snapshot of an open image.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;

/// A writable VDI or read-only snapshot of an open image, for I/O.
///
/// It shares the image (`Arc<Image>`); many handles can be used at once from many
/// threads. A handle to a deleted root fails with an error; a handle to a VDI follows
/// a revert to the VDI's new head. [`Disk::cursor`] and [`Disk::reader`] make it a
/// `std::io` reader and writer.
///
/// # Threads and concurrent I/O
///
/// `Disk` is `Send + Sync` and cheap to clone (it is an `Arc<Image>` and a root):
/// give each thread its own clone, or share one by reference. Concurrent requests
/// behave as [`Image`'s](Image#threads-and-concurrent-io) do: requests on ranges
/// that do not overlap are independent; a read overlapping a write in flight returns
/// each byte old or new; a returned request is seen by every later one, through any
/// handle. Handles on different roots never see each other's writes (a fork's
/// writes do not reach the VDI it was forked from), even when the roots still share
/// clusters.
///
/// The operations, on one VDI:
///
/// ```
/// use std::sync::Arc;
/// use qcowx_core::{CreateOptions, ExtentStatus, Image, DEFAULT_VDI};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?);
/// let disk = img.open_root(DEFAULT_VDI)?;
/// assert_eq!((disk.name(), disk.is_writable(), disk.size()), (DEFAULT_VDI, true, 1 << 20));
/// assert!(Arc::ptr_eq(disk.image(), &img));
///
/// disk.write_at(&[0xab; 8192], 65536)?;
/// let mut buf = [0u8; 8192];
/// disk.read_at(&mut buf, 65536)?;
/// assert_eq!(buf, [0xab; 8192]);
///
/// // Where the data is: the first cluster holds none, the second does.
/// let status = disk.block_status(0, 2 * 65536)?;
/// assert_eq!(status[0].status, ExtentStatus::Unallocated);
/// assert_eq!(status.last().unwrap().status, ExtentStatus::Data);
///
/// // Zero part of the data, then discard the whole cluster.
/// disk.write_zeroes(65536, 4096, false)?;
/// disk.read_at(&mut buf, 65536)?;
/// assert_eq!((buf[0], buf[4095], buf[4096]), (0, 0, 0xab));
/// disk.discard(65536, 65536)?;
/// disk.read_at(&mut buf, 65536)?;
/// assert_eq!(buf, [0; 8192]);
///
/// disk.flush()?; // durable from here on
///
/// // As std::io types: `cursor()` reads and writes, `reader()` only reads.
/// use std::io::{Read, Write};
/// disk.clone().cursor().write_all(b"via io")?;
/// let mut head = [0u8; 6];
/// disk.clone().reader().read_exact(&mut head)?;
/// assert_eq!(&head, b"via io");
///
/// // The same bytes without a copy, where the storage can lend them.
/// disk.write_at(b"mapped", 0)?;
/// let lent = disk.read_mapped(0, 6, |slices| slices.iter().flat_map(|s| s.to_vec()).collect::<Vec<u8>>())?;
/// if let Some(bytes) = lent {
///     assert_eq!(bytes, b"mapped");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Disk {
    pub(super) image: Arc<Image>,
    pub(super) root: RootId,
    pub(super) name: String,
    pub(super) writable: bool,
    /// The root's size when last read, for [`Disk::size`] once the root is gone.
    pub(super) last_size: AtomicU64,
}

impl Clone for Disk {
    fn clone(&self) -> Disk {
        Disk {
            image: Arc::clone(&self.image),
            root: self.root,
            name: self.name.clone(),
            writable: self.writable,
            last_size: AtomicU64::new(self.last_size.load(Ordering::Relaxed)),
        }
    }
}

impl Disk {
    /// The image.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }
    /// The root's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Whether writes are allowed (VDIs on a writable image).
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    /// Virtual disk size in bytes, like [`Image::size`]. A handle whose root was
    /// deleted (or whose image was closed) reports the size it last saw; its I/O
    /// fails.
    pub fn size(&self) -> u64 {
        match self.image.root_size(self.root) {
            Ok(size) => {
                self.last_size.store(size, Ordering::Relaxed);
                size
            }
            Err(_) => self.last_size.load(Ordering::Relaxed),
        }
    }
    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.image.read_root(self.root, buf, offset)
    }
    /// Reads `buf.len()` bytes at `offset`, as [`Disk::read_at`], and calls
    /// `hole(offset, len)` for each part that reads as zeros with no data behind it,
    /// in order and merged: what [`Disk::block_status_from_tables`] would call `Zero`
    /// or `Unallocated`, found by the same look at the tables that finds the data
    /// (one pass where a read and a block status take two). For readers that skip
    /// holes, such as a server's sparse read replies.
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::sync::Arc;
    /// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
    /// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?);
    /// img.write_at(&[5; 4096], 65536)?;
    /// let disk = img.open_root(DEFAULT_VDI)?;
    /// let mut buf = vec![0xff; 3 * 65536];
    /// let mut holes = Vec::new();
    /// disk.read_sparse(&mut buf, 0, |o, l| holes.push((o, l)))?;
    /// assert_eq!(holes, [(0, 65536), (131072, 65536)]);
    /// assert!(buf[65536..69632].iter().all(|&b| b == 5));
    /// assert!(buf[..65536].iter().all(|&b| b == 0));
    /// # Ok(()) }
    /// ```
    pub fn read_sparse(
        &self,
        buf: &mut [u8],
        offset: u64,
        hole: impl FnMut(u64, u64),
    ) -> Result<()> {
        self.image.read_root_sparse(self.root, buf, offset, hole)
    }
    /// A hint that `[offset, offset+len)` will be read soon (see [`Image::prefetch`]).
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::sync::Arc;
    /// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
    /// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?);
    /// img.write_at(b"v1", 0)?;
    /// img.snapshot(DEFAULT_VDI, "s1")?;
    /// let snap = img.open_root("s1")?;
    /// snap.prefetch(0, 1 << 20)?;
    /// let mut buf = [0u8; 2];
    /// snap.read_at(&mut buf, 0)?;
    /// assert_eq!(&buf, b"v1");
    /// # Ok(()) }
    /// ```
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.image.prefetch_root(self.root, offset, len)
    }
    /// Lends `len` bytes at `offset` to `f` without copying them, or returns `None`
    /// (see [`Image::read_mapped`]).
    pub fn read_mapped<R>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&[std::io::IoSlice<'_>]) -> R,
    ) -> Result<Option<R>> {
        self.image.read_root_mapped(self.root, offset, len, f)
    }
    /// Writes `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.image.write_root(self.root, buf, offset)
    }
    /// Makes the range read as zeros (see [`Image::write_zeroes`]).
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.image
            .zero_range(self.root, offset, len, ZeroMode::Zero { unmap: may_unmap })
    }
    /// Discards whole clusters of the range (see [`Image::discard`]).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.image
            .zero_range(self.root, offset, len, ZeroMode::Discard)
    }
    /// Makes completed writes durable (for the whole image).
    pub fn flush(&self) -> Result<()> {
        self.image.flush()
    }
    /// Allocation status of a range (see [`Image::block_status`]).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.image.block_status_root(self.root, offset, len)
    }
    /// Allocation status of a range from the image's tables alone: as
    /// [`Disk::block_status`], except that data clusters are
    /// [`ExtentStatus::Data`](crate::ExtentStatus::Data) even where the file system
    /// holds a hole under them (they are not looked up there). Cheaper: for readers
    /// that use it only to skip reading what reads as zeros, such as a server's sparse
    /// read replies.
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::sync::Arc;
    /// use qcowx_core::{CreateOptions, ExtentStatus, Image, DEFAULT_VDI};
    /// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?);
    /// img.write_at(&[5; 4096], 65536)?;
    /// let disk = img.open_root(DEFAULT_VDI)?;
    /// let ext = disk.block_status_from_tables(0, 1 << 20)?;
    /// assert_eq!((ext[1].offset, ext[1].status), (65536, ExtentStatus::Data));
    /// assert_eq!(ext, disk.block_status(0, 1 << 20)?); // not metadata-preallocated
    /// # Ok(()) }
    /// ```
    pub fn block_status_from_tables(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.image.table_status_root(self.root, offset, len)
    }
}

impl Image {
    /// A handle for I/O on VDI `name` (writable when the image is) or snapshot `name`
    /// (read-only).
    ///
    /// ```
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::sync::Arc;
    /// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
    /// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?);
    /// img.write_at(b"v1", 0)?;
    /// img.snapshot(DEFAULT_VDI, "s1")?;
    /// let snap = img.open_root("s1")?;
    /// assert!(!snap.is_writable());
    /// assert!(snap.write_at(b"no", 0).is_err()); // snapshots are read-only
    /// # Ok(()) }
    /// ```
    pub fn open_root(self: &Arc<Self>, name: &str) -> Result<Disk> {
        let mut st = self.lock_state()?;
        let t = self.find_root(&st, name)?;
        let id = self.load_root(&mut st, t)?;
        let root = self.root(&st, id)?;
        let (writable, size) = (root.writable, root.size);
        Ok(Disk {
            image: Arc::clone(self),
            root: id,
            name: name.to_string(),
            writable,
            last_size: AtomicU64::new(size),
        })
    }
}
