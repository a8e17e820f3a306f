//! Header options an image can change in place: the backing file it names (as
//! `qemu-img rebase -u` and `amend -o backing_file=` change it), the lazy-refcounts
//! bit and the version (2 to 3). None touches a table or a data cluster.

use crate::error::{Error, Result};
use crate::format::extensions::{Extension, EXT_BACKING_FORMAT, EXT_FEATURE_NAMES};
use crate::format::header::{Header, Incompatible, V3_HEADER_LEN};
use crate::storage::Storage;

use super::image::*;

/// The longest backing file name QEMU accepts (`1023` bytes).
const MAX_BACKING_NAME: usize = 1023;

impl Image {
    /// Changes the backing file the header names, and its recorded format, without
    /// reading either file: what the image does not hold will be read from `file`
    /// from the next open on, so it must read as the old backing file did where this
    /// image (any of its VDIs and snapshots) reads through it (`qemu-img rebase -u`).
    /// `None` removes the backing file: unallocated clusters then read as zeros. This
    /// handle keeps reading through the backing file it opened.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image, OpenOptions};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.set_backing_file(Some("base.raw"), Some("raw"))?;
    /// img.close()?;
    /// let img = OpenOptions::new().open_backing(false).open(dir.path().join("a.qcow2"))?;
    /// let info = img.info()?;
    /// assert_eq!(info.backing_file.as_deref(), Some("base.raw"));
    /// assert_eq!(info.backing_format.as_deref(), Some("raw"));
    /// # Ok(()) }
    /// ```
    pub fn set_backing_file(&self, file: Option<&str>, format: Option<&str>) -> Result<()> {
        self.check_writable()?;
        if let Some(f) = format.filter(|f| !matches!(*f, "raw" | "qcow2")) {
            return Err(Error::InvalidArgument(format!(
                "{}: backing format '{f}' is not raw or qcow2",
                self.name
            )));
        }
        match file {
            Some("") => {
                return Err(Error::InvalidArgument(format!(
                    "{}: an empty backing file name (pass none to remove it)",
                    self.name
                )))
            }
            Some(f) if f.len() > MAX_BACKING_NAME || f.contains('\0') => {
                return Err(Error::InvalidArgument(format!(
                    "{}: backing file name of {} bytes: at most {MAX_BACKING_NAME}, no NUL",
                    self.name,
                    f.len()
                )))
            }
            None if format.is_some() => {
                return Err(Error::InvalidArgument(format!(
                    "{}: a backing format without a backing file",
                    self.name
                )))
            }
            _ => {}
        }
        let _structure = self.lock_structure();
        let mut st = self.lock_state()?;
        self.require_v3(&st.header, "changing the backing file")?;
        let mut h = st.header.clone();
        h.backing_file = file.map(str::to_string);
        match format {
            Some(f) => h.extensions.set(Extension {
                kind: EXT_BACKING_FORMAT,
                data: f.as_bytes().to_vec(),
            }),
            None => h.extensions.remove(EXT_BACKING_FORMAT),
        }
        self.write_header_area(&mut st, h)
    }

    /// Sets or clears the lazy-refcounts compatible bit (`qemu-img amend -o
    /// lazy_refcounts=on|off`). qcowx keeps refcounts the same way either way (see
    /// the format document); QEMU, with the bit set, may leave them stale while the
    /// dirty bit says so.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.set_lazy_refcounts(true)?;
    /// assert!(img.info()?.lazy_refcounts);
    /// img.set_lazy_refcounts(false)?;
    /// assert!(!img.info()?.lazy_refcounts);
    /// # Ok(()) }
    /// ```
    pub fn set_lazy_refcounts(&self, on: bool) -> Result<()> {
        self.check_writable()?;
        let _structure = self.lock_structure();
        let mut st = self.lock_state()?;
        self.require_v3(&st.header, "lazy refcounts")?;
        if (st.header.compatible & 1 != 0) == on {
            return Ok(());
        }
        let mut h = st.header.clone();
        h.compatible = if on {
            h.compatible | 1
        } else {
            h.compatible & !1
        };
        self.write_header_area(&mut st, h)
    }

    /// Rewrites a version 2 header as version 3 ([`super::OpenOptions::upgrade`]): no
    /// feature bits, 16-bit refcounts (the only width version 2 has), deflate
    /// compression, the header extensions and the backing file name kept and QEMU's
    /// feature name table added. One durable write of the header area; the tables
    /// are the same in both versions and stay as they are.
    pub(super) fn upgrade_header(&self) -> Result<()> {
        let _structure = self.lock_structure();
        let mut st = self.lock_state()?;
        if st.header.version >= 3 {
            return Ok(());
        }
        let mut h = st.header.clone();
        h.version = 3;
        h.incompatible = Incompatible::empty();
        h.compatible = 0;
        h.autoclear = 0;
        h.refcount_order = 4;
        h.header_length = V3_HEADER_LEN;
        h.compression_type = 0;
        h.unknown_fields.clear();
        h.extensions.set(super::create::feature_name_table());
        self.write_header_area(&mut st, h)
    }

    fn require_v3(&self, h: &Header, what: &str) -> Result<()> {
        if h.version < 3 {
            return Err(Error::Unsupported {
                file: self.name.clone(),
                what: format!("{what} in a version 2 image"),
            });
        }
        Ok(())
    }

    /// Writes header `h` (fixed fields, extensions, backing file name) over the
    /// header area, durably, and makes it the image's header. Refused, with nothing
    /// written, when it does not fit in the first cluster.
    pub(crate) fn write_header_area(&self, st: &mut State, mut h: Header) -> Result<()> {
        h.layout_backing();
        if h.area_bytes().is_none() {
            // The feature name table is informative: leave it out before giving up.
            h.extensions.remove(EXT_FEATURE_NAMES);
            h.layout_backing();
        }
        let area = h.area_bytes().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: the header, its extensions and the backing file name do not fit in one \
             {}-byte cluster",
                self.name,
                h.cluster_size()
            ))
        })?;
        // The old header stays valid until this one is written whole: the area grows
        // into bytes of the first cluster nothing else uses.
        self.storage
            .write_at(&area, 0)
            .and_then(|_| self.storage.sync_data())
            .map_err(|e| self.io_err("write header", 0u64, e))?;
        st.header = h;
        Ok(())
    }
}
