//! `std::io` adapters for a [`Disk`]: [`DiskCursor`] (`Read + Write + Seek`) and
//! [`DiskReader`] (`Read + Seek` only, for snapshots and other roots that must not be
//! written), so a VDI can be the source or destination of [`std::io::copy`] or of
//! any code written against the standard traits.

use std::io::{self, Read, Seek, SeekFrom, Write};

use super::Disk;

/// A [`Disk`] with a position, like a [`std::fs::File`] of the disk's size.
///
/// Reads stop at the end of the disk (`Ok(0)` there); writes are cut at the end of
/// the disk and a write at or past it returns `Ok(0)` (so `write_all` fails with
/// [`io::ErrorKind::WriteZero`]): a disk does not grow. [`Write::flush`] is
/// [`Disk::flush`]: completed writes become durable. Errors convert as
/// `From<qcowx_core::Error> for io::Error` says (a write to a read-only root is
/// `PermissionDenied`). Nothing is buffered; each call is one [`Disk::read_at`] or
/// [`Disk::write_at`].
///
/// ```
/// use std::io::{Read, Seek, SeekFrom, Write};
/// use std::sync::Arc;
/// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?);
/// let mut vdi = img.open_root(DEFAULT_VDI)?.cursor();
/// vdi.seek(SeekFrom::Start(4096))?;
/// vdi.write_all(b"hello")?;
/// vdi.flush()?;
/// vdi.seek(SeekFrom::Current(-5))?;
/// let mut got = [0u8; 5];
/// vdi.read_exact(&mut got)?;
/// assert_eq!(&got, b"hello");
///
/// // The handle underneath, and back.
/// assert_eq!(vdi.disk().name(), DEFAULT_VDI);
/// let disk = vdi.into_disk();
/// let mut all = Vec::new();
/// disk.reader().read_to_end(&mut all)?;
/// assert_eq!(all.len(), 1 << 20);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DiskCursor {
    disk: Disk,
    pos: u64,
}

/// A [`Disk`] with a position that can only be read: `Read + Seek`, like a file
/// opened read-only. For a snapshot ([`crate::Image::open_root`] of a snapshot name)
/// or any root whose reader must not write.
///
/// ```
/// use std::io::Read;
/// use std::sync::Arc;
/// use qcowx_core::{CreateOptions, Image, DEFAULT_VDI};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?);
/// img.write_at(&[7; 512], 0)?;
/// img.snapshot(DEFAULT_VDI, "before")?;
/// img.write_at(&[9; 512], 0)?;
/// let mut old = Vec::new();
/// img.open_root("before")?.reader().read_to_end(&mut old)?;
/// assert_eq!(old.len(), 1 << 20);
/// assert_eq!(&old[..512], &[7; 512]);
/// let reader = img.open_root("before")?.reader();
/// assert!(!reader.disk().is_writable());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct DiskReader {
    disk: Disk,
    pos: u64,
}

impl Disk {
    /// This disk as a `Read + Write + Seek` cursor at offset 0.
    pub fn cursor(self) -> DiskCursor {
        DiskCursor { disk: self, pos: 0 }
    }

    /// This disk as a `Read + Seek` reader at offset 0.
    pub fn reader(self) -> DiskReader {
        DiskReader { disk: self, pos: 0 }
    }
}

/// The new position for `from` on a disk of `size` bytes at `pos`.
fn seek_to(pos: u64, size: u64, from: SeekFrom) -> io::Result<u64> {
    let (base, delta) = match from {
        SeekFrom::Start(n) => return Ok(n),
        SeekFrom::End(d) => (size, d),
        SeekFrom::Current(d) => (pos, d),
    };
    base.checked_add_signed(delta).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "seek to a negative or overflowing position",
        )
    })
}

/// Reads at `*pos`, at most up to the end of the disk.
fn read(disk: &Disk, pos: &mut u64, buf: &mut [u8]) -> io::Result<usize> {
    let left = disk.size().saturating_sub(*pos);
    let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
    if n == 0 {
        return Ok(0);
    }
    disk.read_at(&mut buf[..n], *pos)?;
    *pos += n as u64;
    Ok(n)
}

impl Read for DiskCursor {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read(&self.disk, &mut self.pos, buf)
    }
}

impl Write for DiskCursor {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.disk.size().saturating_sub(self.pos);
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        if n == 0 {
            return Ok(0);
        }
        self.disk.write_at(&buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(self.disk.flush()?)
    }
}

impl Seek for DiskCursor {
    fn seek(&mut self, from: SeekFrom) -> io::Result<u64> {
        self.pos = seek_to(self.pos, self.disk.size(), from)?;
        Ok(self.pos)
    }
}

impl DiskCursor {
    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }
    /// The disk, giving up the position.
    pub fn into_disk(self) -> Disk {
        self.disk
    }
}

impl Read for DiskReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read(&self.disk, &mut self.pos, buf)
    }
}

impl Seek for DiskReader {
    fn seek(&mut self, from: SeekFrom) -> io::Result<u64> {
        self.pos = seek_to(self.pos, self.disk.size(), from)?;
        Ok(self.pos)
    }
}

impl DiskReader {
    /// The disk.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::sync::Arc;

    use crate::storage::MemStorage;
    use crate::{CreateOptions, Image, DEFAULT_VDI};

    fn image() -> Arc<Image> {
        Arc::new(
            Image::create_in(Arc::new(MemStorage::new()), &CreateOptions::new(1 << 20)).unwrap(),
        )
    }

    #[test]
    fn copy_in_and_out_stops_at_the_end_of_the_disk() {
        let img = image();
        let data: Vec<u8> = (0..(1u32 << 20) + 100).map(|i| (i % 251) as u8).collect();
        let mut vdi = img.open_root(DEFAULT_VDI).unwrap().cursor();
        let e = std::io::copy(&mut &data[..], &mut vdi).unwrap_err();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::WriteZero,
            "a disk does not grow"
        );
        assert_eq!(vdi.stream_position().unwrap(), 1 << 20);
        vdi.rewind().unwrap();
        let mut out = Vec::new();
        assert_eq!(std::io::copy(&mut vdi, &mut out).unwrap(), 1 << 20);
        assert_eq!(out, data[..1 << 20]);
        assert_eq!(vdi.read(&mut [0u8; 8]).unwrap(), 0);
        assert_eq!(vdi.seek(SeekFrom::End(-4)).unwrap(), (1 << 20) - 4);
        assert!(vdi.seek(SeekFrom::Current(-(1 << 21))).is_err());
    }

    #[test]
    fn size_is_a_number_like_the_images_and_outlives_the_root() {
        let img = image();
        img.snapshot(DEFAULT_VDI, "s").unwrap();
        let snap = img.open_root("s").unwrap();
        let size: u64 = snap.size();
        assert_eq!(size, img.size());
        img.delete_snapshot("s").unwrap();
        assert_eq!(snap.size(), 1 << 20);
        assert!(snap.read_at(&mut [0u8; 1], 0).is_err());
    }

    #[test]
    fn a_snapshot_reads_its_own_data_and_refuses_writes() {
        let img = image();
        img.write_at(&[1; 4096], 0).unwrap();
        img.snapshot(DEFAULT_VDI, "s").unwrap();
        img.write_at(&[2; 4096], 0).unwrap();
        let mut snap = img.open_root("s").unwrap().reader();
        let mut buf = [0u8; 4096];
        snap.read_exact(&mut buf).unwrap();
        assert_eq!(buf, [1; 4096]);
        let mut as_cursor = img.open_root("s").unwrap().cursor();
        let e = as_cursor.write(&[3; 512]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    }
}
