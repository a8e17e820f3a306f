//! Rebase: a new backing file under an image, with every root reading what it read
//! before (`qemu-img rebase` without `-u`).
//!
//! Where a VDI reads through the backing chain and the new backing file holds other
//! bytes, the old bytes are written into the VDI first; snapshots are read-only, so a
//! rebase that would change what a snapshot reads is refused before anything is
//! written. Only then does the header name the new file: a rebase cut short leaves
//! the old backing file named and the copied clusters reading as they did.

use std::path::PathBuf;
use std::sync::Arc;

use crate::engine::backing::{self, Layer};
use crate::engine::{Extent, ExtentStatus, Image, OpenOptions, STATUS_WINDOW};
use crate::error::{Error, Result};
use crate::storage::io_buf;
use crate::vdi::{Disk, RootKind};

/// What a rebase did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RebaseReport {
    /// Bytes written into VDIs to keep what they read.
    pub copied_bytes: u64,
}

impl Image {
    /// Makes `file` (with `format`, probed when `None`) the image's backing file, or
    /// drops the backing file with `None`, keeping what every VDI and snapshot reads:
    /// where a VDI reads through the old chain and the new file differs, the old bytes
    /// are written into the VDI. Refused, with nothing written, when a snapshot reads
    /// such a range (snapshots do not change), and when the image was opened without
    /// its backing file (nothing to compare with).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use qcowx_core::{CreateOptions, Image, OpenOptions};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// std::fs::write(dir.path().join("old.raw"), vec![7u8; 1 << 20]).unwrap();
    /// std::fs::write(dir.path().join("new.raw"), vec![0u8; 1 << 20]).unwrap();
    /// let mut opts = CreateOptions::new(1 << 20);
    /// opts.backing_file = Some("old.raw".into());
    /// opts.backing_format = Some("raw".into());
    /// Image::create(dir.path().join("a.qcow2"), &opts)?.close()?;
    ///
    /// let img = Arc::new(OpenOptions::new().write(true).open(dir.path().join("a.qcow2"))?);
    /// let report = img.rebase(Some("new.raw"), Some("raw"))?;
    /// assert_eq!(report.copied_bytes, 1 << 20); // all of old.raw differs from new.raw
    /// let mut buf = [0u8; 4];
    /// img.read_at(&mut buf, 0)?;
    /// assert_eq!(buf, [7; 4]);
    /// # Ok(()) }
    /// ```
    pub fn rebase(
        self: &Arc<Self>,
        file: Option<&str>,
        format: Option<&str>,
    ) -> Result<RebaseReport> {
        self.check_writable()?;
        if self.backing().is_none() && self.info()?.backing_file.is_some() {
            return Err(Error::InvalidArgument(format!(
                "{}: opened without its backing file: a rebase must read it",
                self.file_name()
            )));
        }
        let new: Option<Arc<dyn Layer>> = match file {
            None => None,
            Some(name) => {
                let chain: Vec<PathBuf> = self
                    .path()
                    .and_then(|p| std::fs::canonicalize(p).ok())
                    .into_iter()
                    .collect();
                Some(backing::open_chain(
                    self.file_name(),
                    self.path(),
                    name,
                    format,
                    &chain,
                    &OpenOptions::new(),
                )?)
            }
        };
        let roots = self.list()?;
        // First every snapshot, before anything is written.
        for r in roots.iter().filter(|r| r.kind == RootKind::Snapshot) {
            let disk = self.open_root(&r.name)?;
            if let Some(at) = differences(&disk, new.as_deref(), &mut |_, _| Ok(false))? {
                return Err(Error::Unsupported {
                    file: self.file_name().to_string(),
                    what: format!(
                        "a rebase that changes what snapshot '{}' reads (at guest offset \
                         {at:#x} the new backing file differs from the old chain; delete \
                         the snapshot, or change only the name)",
                        r.name
                    ),
                });
            }
        }
        let mut report = RebaseReport::default();
        for r in roots.iter().filter(|r| r.kind == RootKind::Vdi) {
            let disk = self.open_root(&r.name)?;
            differences(&disk, new.as_deref(), &mut |at, old: &[u8]| {
                disk.write_at(old, at)?;
                report.copied_bytes += old.len() as u64;
                Ok(true)
            })?;
        }
        self.flush()?;
        self.set_backing_file(file, format)?;
        Ok(report)
    }
}

/// Walks the ranges `disk` reads through its backing chain (or as unallocated),
/// cluster by cluster, and calls `differs(offset, old bytes)` where the new layer
/// (zeros for `None`) reads otherwise. Stops at the first difference `differs`
/// answers `false` for, returning its offset.
fn differences(
    disk: &Disk,
    new: Option<&dyn Layer>,
    differs: &mut dyn FnMut(u64, &[u8]) -> Result<bool>,
) -> Result<Option<u64>> {
    let size = disk.size();
    let cs = disk.image().cluster_size();
    let (mut old, mut fresh) = (io_buf(cs as usize), io_buf(cs as usize));
    let mut window = 0;
    while window < size {
        let len = STATUS_WINDOW.min(size - window);
        let through: Vec<Extent> = disk
            .block_status(window, len)?
            .into_iter()
            .filter(|e| e.depth > 0 || e.status == ExtentStatus::Unallocated)
            .collect();
        for e in through {
            let mut at = e.offset;
            let end = e.offset + e.length;
            while at < end {
                let n = (cs - at % cs).min(end - at) as usize;
                disk.read_at(&mut old[..n], at)?;
                match new {
                    Some(l) => l.read_layer(&mut fresh[..n], at)?,
                    None => fresh[..n].fill(0),
                }
                if old[..n] != fresh[..n] && !differs(at, &old[..n])? {
                    return Ok(Some(at));
                }
                at += n as u64;
            }
        }
        window += len;
    }
    Ok(None)
}
