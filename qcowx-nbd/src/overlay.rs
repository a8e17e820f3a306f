//! `qcowx-nbd -s`: a throwaway overlay over the image, as `qemu-nbd --snapshot` makes
//! one. Writes go to a temporary qcow2 file whose backing file is the image, which is
//! only read (under a shared lock, so others may read it too); the temporary file is
//! removed when the [`TemporaryOverlay`] is dropped, at the server's exit.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use qcowx_core::{CreateOptions, IfExists, Image, OpenOptions, Result};

/// The temporary overlay file; removed on drop.
#[derive(Debug)]
pub struct TemporaryOverlay {
    path: PathBuf,
}

impl TemporaryOverlay {
    /// Creates an empty overlay of the qcow2 image `base` in `dir` (the same virtual
    /// size and cluster size, `base` as its backing file by absolute path) and opens
    /// it for writing.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    /// use qcowx_nbd::overlay::TemporaryOverlay;
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let base = dir.path().join("base.qcow2");
    /// let img = Image::create(&base, &CreateOptions::new(1 << 20))?;
    /// img.write_at(b"kept", 0)?;
    /// img.close()?;
    /// let (overlay, file) = TemporaryOverlay::create(&base, dir.path())?;
    /// overlay.write_at(b"gone", 0)?;
    /// let path = file.path().to_path_buf();
    /// drop(overlay);
    /// drop(file);
    /// assert!(!path.exists());
    /// let mut b = [0u8; 4];
    /// Image::open(&base)?.read_at(&mut b, 0)?;
    /// assert_eq!(&b, b"kept");
    /// # Ok(()) }
    /// ```
    pub fn create(base: &Path, dir: &Path) -> Result<(Image, TemporaryOverlay)> {
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        let (size, cluster_size) = {
            let img = OpenOptions::new().open(&base)?;
            (img.size(), img.cluster_size())
        };
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = dir.join(format!(
            "qcowx-nbd-snapshot.{}.{stamp:x}.qcow2",
            std::process::id()
        ));
        let mut opts = CreateOptions::new(size).if_exists(IfExists::Fail);
        opts.cluster_size = cluster_size;
        opts.backing_file = Some(base.display().to_string());
        opts.backing_format = Some("qcow2".into());
        let image = Image::create(&path, &opts)?;
        Ok((image, TemporaryOverlay { path }))
    }

    /// Where the overlay is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where temporary overlays go: `$TMPDIR`, else `/var/tmp` (as QEMU puts them).
    pub fn default_dir() -> PathBuf {
        std::env::var_os("TMPDIR")
            .filter(|d| !d.is_empty())
            .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from)
    }
}

impl Drop for TemporaryOverlay {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
