//! Persistent dirty bitmaps, kept as QEMU keeps them (see `format::bitmap`).
//!
//! - Every open reads the directory while auto-clear bit 0 says the extension is
//!   consistent; a writable open also reads every consistent bitmap's data into
//!   memory, then sets the in-use flag of every bitmap in the directory (in place,
//!   durably, before any guest write), so that a crash leaves them inconsistent.
//! - Every write, zero write and discard of the default VDI marks every enabled
//!   bitmap at its entry point ([`Image::mark_bitmaps`]).
//! - A clean close writes each bitmap's data and table to new clusters, then a new
//!   directory, commits them with one header write (the extension's 24 bytes in place,
//!   or the header area rewritten within one sector when the extension is added or
//!   dropped), and releases the old clusters. Every cluster allocated or released is
//!   counted in the session's refcount record, as any other.
//! - A bitmap that was already in use when the image was opened (a crash, or a
//!   program still holding it) is kept as it is, flagged inconsistent: it can only be
//!   removed, as in QEMU.

use crate::error::{Error, Result};
use crate::format::addr::HostOffset;
use crate::format::bitmap::{self, BitmapsExt, DirEntry, FLAG_AUTO, FLAG_IN_USE};
use crate::format::extensions::{EXT_BITMAPS, EXT_FEATURE_NAMES};
use crate::format::header::Autoclear;
use crate::format::tables::{decode_words, encode_words};
use crate::storage::Storage;

use super::bitmap_set::{bit, set_bits, Bitmap, BitmapInfo, Bitmaps};
use super::image::*;

impl Image {
    fn bitmap_err(&self, source: bitmap::BitmapError) -> Error {
        Error::Bitmap {
            file: self.name.clone(),
            source,
        }
    }

    /// Reads the bitmap directory (and, with `data`, every consistent bitmap's data)
    /// if auto-clear bit 0 says the extension is consistent.
    pub(super) fn load_bitmaps(&self, data: bool) -> Result<()> {
        let mut st = self.lock_state()?;
        if st.header.autoclear & Autoclear::BITMAPS.bits() == 0 {
            return Ok(());
        }
        let Some(ext) = st.header.extensions.get(EXT_BITMAPS) else {
            return Ok(());
        };
        let cs = self.geo.cluster_size();
        let ext = BitmapsExt::parse(&ext.data, cs).map_err(|e| self.bitmap_err(e))?;
        let file_len = self
            .storage
            .len()
            .map_err(|e| self.io_err("stat", 0u64, e))?;
        if ext.directory_offset + ext.directory_size > file_len.next_multiple_of(cs) {
            return Err(self.bitmap_err(bitmap::BitmapError::Directory {
                offset: ext.directory_offset,
                why: "runs past the end of the file".into(),
            }));
        }
        let mut dir = vec![0u8; ext.directory_size as usize];
        self.storage
            .read_at(&mut dir, ext.directory_offset)
            .map_err(|e| self.io_err("read bitmap directory", ext.directory_offset, e))?;
        let entries = bitmap::parse_directory(&dir, &ext, st.header.size, cs, file_len)
            .map_err(|e| self.bitmap_err(e))?;
        let mut list = Vec::with_capacity(entries.len());
        let mut metadata = vec![(ext.directory_offset, ext.directory_size)];
        for entry in entries {
            if data {
                // What the overlap guard protects (only writers need it).
                metadata.extend(self.bitmap_clusters(&entry)?);
            }
            let inconsistent = entry.flags & FLAG_IN_USE != 0;
            let data = if data && !inconsistent {
                Some(self.read_bitmap_data(&entry, st.header.size)?)
            } else {
                None
            };
            list.push(Bitmap {
                entry,
                data,
                inconsistent,
            });
        }
        st.bitmaps = Bitmaps {
            list,
            on_disk: Some(ext),
            in_use_set: false,
            released: Vec::new(),
            metadata,
        };
        Ok(())
    }

    /// The bitmap table of `entry`, each data cluster's offset checked.
    fn read_bitmap_table(&self, entry: &DirEntry) -> Result<Vec<u64>> {
        let cs = self.geo.cluster_size();
        let mut raw = vec![0u8; entry.table_size as usize * 8];
        self.storage
            .read_at(&mut raw, entry.table_offset)
            .map_err(|e| self.io_err("read bitmap table", entry.table_offset, e))?;
        let table = decode_words(&raw);
        let file_end = self
            .storage
            .len()
            .map_err(|e| self.io_err("stat", 0u64, e))?
            .next_multiple_of(cs);
        for (i, w) in table.iter().enumerate() {
            let off = w & bitmap::TABLE_OFFSET_MASK;
            let bad_reserved = w & !(bitmap::TABLE_OFFSET_MASK | bitmap::TABLE_ALL_ONES) != 0;
            if bad_reserved || (off != 0 && (!off.is_multiple_of(cs) || off + cs > file_end)) {
                return Err(Error::Corrupt {
                    file: self.name.clone(),
                    structure: "bitmap table",
                    offset: entry.table_offset + i as u64 * 8,
                    why: format!("entry {w:#x} of bitmap '{}' is invalid", entry.name),
                });
            }
        }
        Ok(table)
    }

    /// Reads a bitmap's data through its table (bounded by the checks of
    /// `format::bitmap::parse_directory`).
    fn read_bitmap_data(&self, entry: &DirEntry, disk_size: u64) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size() as usize;
        let len = bitmap::data_bytes(disk_size, entry.granularity_bits) as usize;
        let mut data = vec![0u8; len];
        for (i, w) in self.read_bitmap_table(entry)?.into_iter().enumerate() {
            let start = i * cs;
            let Some(chunk) = data.get_mut(start..(start + cs).min(len)) else {
                break;
            };
            let off = w & bitmap::TABLE_OFFSET_MASK;
            if off != 0 {
                self.storage
                    .read_at(chunk, off)
                    .map_err(|e| self.io_err("read bitmap data", off, e))?;
            } else if w & bitmap::TABLE_ALL_ONES != 0 {
                chunk.fill(0xff);
            }
        }
        Ok(data)
    }

    /// The clusters a bitmap's table and data occupy (offset, bytes).
    fn bitmap_clusters(&self, entry: &DirEntry) -> Result<Vec<(u64, u64)>> {
        let cs = self.geo.cluster_size();
        let mut out = vec![(
            entry.table_offset,
            (u64::from(entry.table_size) * 8).next_multiple_of(cs),
        )];
        for w in self.read_bitmap_table(entry)? {
            let off = w & bitmap::TABLE_OFFSET_MASK;
            if off != 0 {
                out.push((off, cs));
            }
        }
        Ok(out)
    }

    /// Sets the in-use flag of every bitmap in the directory, in place and durably
    /// (a writable open, before any guest write).
    pub(super) fn mark_bitmaps_in_use(&self) -> Result<()> {
        let mut st = self.lock_state()?;
        let Some(ext) = st.bitmaps.on_disk else {
            return Ok(());
        };
        let entries: Vec<DirEntry> = st.bitmaps.list.iter().map(|b| b.entry.clone()).collect();
        let mut dir = bitmap::encode_directory(&entries);
        for off in bitmap::flag_offsets(&entries) {
            let flags = u32::from_be_bytes(dir[off..off + 4].try_into().unwrap_or([0; 4]));
            dir[off..off + 4].copy_from_slice(&(flags | FLAG_IN_USE).to_be_bytes());
        }
        self.storage
            .write_at(&dir, ext.directory_offset)
            .map_err(|e| self.io_err("write bitmap directory", ext.directory_offset, e))?;
        self.sync()?;
        st.bitmaps.in_use_set = true;
        Ok(())
    }

    /// Marks `[offset, offset + len)` dirty in every enabled bitmap, if `root` is
    /// the default VDI (the disk the bitmaps describe).
    pub(crate) fn mark_bitmaps(&self, st: &mut State, root: RootId, offset: u64, len: u64) {
        if root != DEFAULT_ROOT || len == 0 {
            return;
        }
        for b in &mut st.bitmaps.list {
            let g = b.entry.granularity_bits;
            if let (Some(data), true) = (&mut b.data, b.entry.flags & FLAG_AUTO != 0) {
                set_bits(data, offset >> g, (offset + len - 1) >> g);
            }
        }
    }

    /// The image's bitmaps.
    ///
    /// ```
    /// use qcowx_core::{BitmapInfo, CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// assert!(img.bitmaps()?.is_empty());
    /// img.bitmap_add("backup", Some(65536), false)?;
    /// let expected = BitmapInfo {
    ///     name: "backup".into(),
    ///     granularity: 65536,
    ///     enabled: true,
    ///     in_use: false,
    /// };
    /// assert_eq!(img.bitmaps()?, [expected]);
    /// # Ok(()) }
    /// ```
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        Ok(self.lock_state()?.bitmaps.infos())
    }

    /// The bitmap `name`, loaded, for a change (refused when read-only or in use).
    fn with_bitmap<T>(&self, name: &str, f: impl FnOnce(&mut Bitmap) -> T) -> Result<T> {
        self.check_writable()?;
        let mut st = self.lock_state()?;
        let i = self.bitmap_index(&st, name)?;
        let b = &mut st.bitmaps.list[i];
        if b.inconsistent {
            return Err(self.inconsistent(name));
        }
        Ok(f(b))
    }

    fn bitmap_index(&self, st: &State, name: &str) -> Result<usize> {
        st.bitmaps.find(name).ok_or_else(|| Error::NotFound {
            file: self.name.clone(),
            what: "bitmap".into(),
            name: name.into(),
        })
    }

    fn inconsistent(&self, name: &str) -> Error {
        Error::InvalidArgument(format!(
            "{}: bitmap '{name}' is inconsistent (in use: a crash, or a program holding it); \
             it can only be removed",
            self.name
        ))
    }

    /// Adds an empty bitmap `name` covering `granularity` bytes per bit (a power of
    /// two from 512 B to 2 GiB; default: the cluster size), enabled unless
    /// `disabled`. Stored at the next clean close.
    ///
    /// An incremental backup: the bitmap records which granules were written since it was
    /// added (or last cleared), and survives a clean close as QEMU's persistent bitmaps do.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Error, Image};
    ///
    /// # fn main() -> Result<(), Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("a.qcow2");
    /// let img = Image::create(&path, &CreateOptions::new(1 << 20))?;
    /// img.bitmap_add("backup", None, false)?; // one bit per cluster (64 KiB)
    /// img.write_at(b"changed", 65536 + 100)?;
    /// img.close()?;
    ///
    /// let img = Image::open_rw(&path)?;
    /// assert_eq!(img.bitmap_dirty("backup")?, [(65536, 65536)]);
    /// assert!(matches!(img.bitmap_add("backup", None, false), Err(Error::AlreadyExists { .. })));
    /// # Ok(()) }
    /// ```
    pub fn bitmap_add(&self, name: &str, granularity: Option<u64>, disabled: bool) -> Result<()> {
        self.check_writable()?;
        bitmap::check_name(name).map_err(Error::InvalidArgument)?;
        let g = granularity.unwrap_or(self.geo.cluster_size());
        let bits = g.trailing_zeros() as u8;
        if !g.is_power_of_two()
            || !(bitmap::MIN_GRANULARITY_BITS..=bitmap::MAX_GRANULARITY_BITS).contains(&bits)
        {
            return Err(Error::InvalidArgument(format!(
                "granularity {g} is not a power of two from 512 to 2 GiB"
            )));
        }
        let mut st = self.lock_state()?;
        if st.bitmaps.find(name).is_some() {
            return Err(Error::AlreadyExists {
                file: self.name.clone(),
                what: "bitmap".into(),
                name: name.into(),
            });
        }
        if st.bitmaps.list.len() >= bitmap::MAX_BITMAPS as usize {
            return Err(Error::InvalidArgument(format!(
                "an image has at most {} bitmaps",
                bitmap::MAX_BITMAPS
            )));
        }
        let size = st.header.size;
        let bytes = bitmap::data_bytes(size, bits);
        let held: u64 = (st.bitmaps.list.iter())
            .map(|b| bitmap::data_bytes(size, b.entry.granularity_bits))
            .sum();
        if bytes > bitmap::MAX_DATA_BYTES || held + bytes > bitmap::MAX_TOTAL_DATA_BYTES {
            return Err(Error::InvalidArgument(format!(
                "a bitmap of {size} bytes at granularity {g} needs {bytes} bytes of data \
                 ({held} held already; at most {} each, {} in all): use a larger granularity",
                bitmap::MAX_DATA_BYTES,
                bitmap::MAX_TOTAL_DATA_BYTES
            )));
        }
        st.bitmaps.list.push(Bitmap {
            entry: DirEntry {
                table_offset: 0,
                table_size: bitmap::table_entries(size, bits, self.geo.cluster_size()) as u32,
                flags: if disabled { 0 } else { FLAG_AUTO },
                granularity_bits: bits,
                name: name.into(),
                extra: Vec::new(),
            },
            data: Some(vec![0u8; bytes as usize]),
            inconsistent: false,
        });
        Ok(())
    }

    /// Removes bitmap `name` (an inconsistent one too).
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Error, Image};
    ///
    /// # fn main() -> Result<(), Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.bitmap_add("old", None, false)?;
    /// img.bitmap_remove("old")?;
    /// assert!(img.bitmaps()?.is_empty());
    /// assert!(matches!(img.bitmap_remove("old"), Err(Error::NotFound { .. })));
    /// # Ok(()) }
    /// ```
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.check_writable()?;
        let mut st = self.lock_state()?;
        let i = self.bitmap_index(&st, name)?;
        let b = st.bitmaps.list.remove(i);
        if b.entry.table_offset != 0 {
            match self.bitmap_clusters(&b.entry) {
                Ok(c) => st.bitmaps.released.extend(c),
                // Unreadable: the clusters stay allocated (leaked), never reused.
                Err(_) => st.deltas.lose_exactness(),
            }
        }
        Ok(())
    }

    /// Makes every bitmap cover a disk grown to `new_size` bytes, as QEMU's resize
    /// does: the new bits are clear, each table grows to the new size, and the
    /// bitmaps are stored again at the close (this handle marked them in use at its
    /// open). Refused, with nothing changed, when a bitmap is inconsistent (in use
    /// before this handle opened the image: its data is not trusted, so it cannot be
    /// grown) or when the data would pass the bitmaps' size limits. Called under the
    /// state lock, before the header's size changes; called with the header's size
    /// after a resize that failed, it fits them back.
    pub(crate) fn fit_bitmaps(&self, st: &mut State, new_size: u64) -> Result<()> {
        if st.bitmaps.list.is_empty() {
            let bit = Autoclear::BITMAPS.bits();
            if st.header.extensions.has(EXT_BITMAPS) && st.header.autoclear & bit != 0 {
                // Bitmaps this handle did not load (a repair-mode open): they would
                // keep the old size.
                return Err(Error::Unsupported {
                    file: self.name.clone(),
                    what: "resizing an image with persistent bitmaps from a repair-mode \
                           open (open it for writing)"
                        .into(),
                });
            }
            return Ok(());
        }
        if let Some(b) = st.bitmaps.list.iter().find(|b| b.inconsistent) {
            return Err(Error::Unsupported {
                file: self.name.clone(),
                what: format!(
                    "resizing an image with the inconsistent bitmap '{}' (remove it first)",
                    b.entry.name
                ),
            });
        }
        let mut total = 0u64;
        for b in &st.bitmaps.list {
            let bytes = bitmap::data_bytes(new_size, b.entry.granularity_bits);
            total += bytes;
            if bytes > bitmap::MAX_DATA_BYTES || total > bitmap::MAX_TOTAL_DATA_BYTES {
                return Err(Error::InvalidArgument(format!(
                    "bitmap '{}' of a {new_size}-byte disk would need {bytes} bytes of data \
                     (at most {} each, {} in all): remove it or give it a larger granularity",
                    b.entry.name,
                    bitmap::MAX_DATA_BYTES,
                    bitmap::MAX_TOTAL_DATA_BYTES
                )));
            }
        }
        // Every bitmap's data in memory first (a read that fails changes nothing).
        let old_size = st.header.size;
        for i in 0..st.bitmaps.list.len() {
            if st.bitmaps.list[i].data.is_none() {
                let data = self.read_bitmap_data(&st.bitmaps.list[i].entry, old_size)?;
                st.bitmaps.list[i].data = Some(data);
            }
        }
        let cs = self.geo.cluster_size();
        for b in &mut st.bitmaps.list {
            let bits = b.entry.granularity_bits;
            if let Some(data) = &mut b.data {
                data.resize(bitmap::data_bytes(new_size, bits) as usize, 0);
            }
            b.entry.table_size = bitmap::table_entries(new_size, bits, cs) as u32;
        }
        Ok(())
    }

    /// Removes every persistent bitmap from the header, durably (the bitmaps
    /// extension and auto-clear bit 0 go), whether this handle loaded them or not (a
    /// repair-mode open does not). Their clusters are left to the caller's rebuild of
    /// the refcounts, which no longer finds them reachable: for a downgrade to
    /// version 2, which cannot hold bitmaps. Without bitmaps, writes nothing.
    pub(crate) fn drop_bitmaps(&self, st: &mut State) -> Result<()> {
        st.bitmaps = Bitmaps::default();
        let bit = Autoclear::BITMAPS.bits();
        if st.header.extensions.has(EXT_BITMAPS) || st.header.autoclear & bit != 0 {
            self.commit_bitmaps_ext(st, None)?;
        }
        Ok(())
    }

    /// Clears every bit of bitmap `name`.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.bitmap_add("backup", None, false)?;
    /// img.write_at(&[1; 512], 0)?;
    /// assert_eq!(img.bitmap_dirty("backup")?.len(), 1);
    /// img.bitmap_clear("backup")?; // after the backup copied those ranges
    /// assert!(img.bitmap_dirty("backup")?.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.with_bitmap(name, |b| {
            if let Some(d) = &mut b.data {
                d.fill(0);
            }
        })
    }

    /// Enables (tracks writes) or disables bitmap `name`.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.bitmap_add("b", None, true)?; // added disabled
    /// img.write_at(&[1; 512], 0)?;
    /// assert!(img.bitmap_dirty("b")?.is_empty(), "a disabled bitmap tracks nothing");
    /// img.bitmap_enable("b", true)?;
    /// img.write_at(&[1; 512], 65536)?;
    /// assert_eq!(img.bitmap_dirty("b")?, [(65536, 65536)]);
    /// assert!(img.bitmaps()?[0].enabled);
    /// # Ok(()) }
    /// ```
    pub fn bitmap_enable(&self, name: &str, enabled: bool) -> Result<()> {
        self.with_bitmap(name, |b| {
            b.entry.flags = (b.entry.flags & !FLAG_AUTO) | if enabled { FLAG_AUTO } else { 0 };
        })
    }

    /// Marks dirty in `target` every range dirty in `source`.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.bitmap_add("monday", None, false)?;
    /// img.write_at(&[1; 512], 0)?;
    /// img.bitmap_enable("monday", false)?;
    /// img.bitmap_add("tuesday", None, false)?;
    /// img.write_at(&[1; 512], 3 * 65536)?;
    /// img.bitmap_merge("monday", "tuesday")?;
    /// assert_eq!(img.bitmap_dirty("tuesday")?, [(0, 65536), (3 * 65536, 65536)]);
    /// assert_eq!(img.bitmap_dirty("monday")?, [(0, 65536)], "the source is unchanged");
    /// # Ok(()) }
    /// ```
    pub fn bitmap_merge(&self, source: &str, target: &str) -> Result<()> {
        let dirty = self.bitmap_dirty(source)?;
        self.bitmap_mark(target, &dirty)
    }

    /// Marks the ranges `(offset, length)` dirty in bitmap `name` (every granule they
    /// touch, clipped to the disk), enabled or not: how a bitmap of another image is
    /// merged in (`qemu-img bitmap --merge -b`, `convert --bitmaps`).
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.bitmap_add("copied", Some(4096), true)?;
    /// img.bitmap_mark("copied", &[(100, 10), (8192, 8192), (1 << 30, 512)])?;
    /// assert_eq!(img.bitmap_dirty("copied")?, [(0, 4096), (8192, 8192)]);
    /// # Ok(()) }
    /// ```
    pub fn bitmap_mark(&self, name: &str, ranges: &[(u64, u64)]) -> Result<()> {
        self.check_writable()?;
        let mut st = self.lock_state()?;
        let size = st.header.size;
        let i = self.bitmap_index(&st, name)?;
        if st.bitmaps.list[i].inconsistent {
            return Err(self.inconsistent(name));
        }
        if st.bitmaps.list[i].data.is_none() {
            let data = self.read_bitmap_data(&st.bitmaps.list[i].entry, size)?;
            st.bitmaps.list[i].data = Some(data);
        }
        let b = &mut st.bitmaps.list[i];
        let g = b.entry.granularity_bits;
        if let Some(data) = &mut b.data {
            for &(off, len) in ranges {
                let end = off.saturating_add(len).min(size);
                if off < end {
                    set_bits(data, off >> g, (end - 1) >> g);
                }
            }
        }
        Ok(())
    }

    /// The dirty ranges of bitmap `name` (offset, length), in order, each a whole
    /// number of granules clipped to the disk.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.bitmap_add("b", Some(4096), false)?;
    /// img.write_at(&[1; 10], 4090)?; // touches two 4 KiB granules
    /// img.write_at(&[1; 1], 65536)?;
    /// assert_eq!(img.bitmap_dirty("b")?, [(0, 8192), (65536, 4096)]);
    /// # Ok(()) }
    /// ```
    pub fn bitmap_dirty(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        self.bitmap_dirty_in(name, 0, u64::MAX)
    }

    /// The dirty ranges of bitmap `name` that meet `[offset, offset + len)`, clipped
    /// to it. A read-only handle reads the bitmap from the file on first use and keeps
    /// it (it cannot change under a read-only handle: writers hold the image lock).
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.bitmap_add("b", None, false)?;
    /// img.write_at(&[1; 3 * 65536], 0)?;
    /// // Only the part inside the window, clipped to it.
    /// assert_eq!(img.bitmap_dirty_in("b", 65536 + 512, 65536)?, [(65536 + 512, 65536)]);
    /// assert!(img.bitmap_dirty_in("b", 4 * 65536, 65536)?.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn bitmap_dirty_in(&self, name: &str, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut st = self.lock_state()?;
        let i = self.bitmap_index(&st, name)?;
        if st.bitmaps.list[i].inconsistent {
            return Err(self.inconsistent(name));
        }
        let size = st.header.size;
        if st.bitmaps.list[i].data.is_none() {
            let data = self.read_bitmap_data(&st.bitmaps.list[i].entry, size)?;
            st.bitmaps.list[i].data = Some(data);
        }
        let b = &st.bitmaps.list[i];
        let Some(data) = &b.data else {
            return Ok(Vec::new());
        };
        let end = offset.saturating_add(len).min(size);
        let g = b.entry.granularity_bits;
        let mut out: Vec<(u64, u64)> = Vec::new();
        if offset >= end {
            return Ok(out);
        }
        let mut i = offset >> g;
        let last = (end - 1) >> g;
        while i <= last {
            if i.is_multiple_of(8) && data.get((i / 8) as usize) == Some(&0) {
                i += 8;
                continue;
            }
            if bit(data, i) {
                let start = (i << g).max(offset);
                let stop = ((i + 1) << g).min(end);
                match out.last_mut() {
                    Some((o, l)) if *o + *l == start => *l = stop - *o,
                    _ => out.push((start, stop - start)),
                }
            }
            i += 1;
        }
        Ok(out)
    }

    /// Writes every bitmap this session holds to new clusters, commits the new
    /// directory with one header write and releases the old clusters (a clean
    /// close). Nothing to do when the bitmaps were neither opened for writing nor
    /// changed.
    pub(crate) fn store_bitmaps(&self, st: &mut State) -> Result<()> {
        let changed = st.bitmaps.list.iter().any(|b| b.entry.table_offset == 0)
            || st.bitmaps.list.len() != st.bitmaps.on_disk.map_or(0, |e| e.nb_bitmaps as usize);
        if !st.bitmaps.in_use_set && !changed {
            return Ok(());
        }
        if st.header.version < 3 {
            return Err(Error::Unsupported {
                file: self.name.clone(),
                what: "persistent bitmaps in a version 2 image".into(),
            });
        }
        self.mark_stale(st)?;
        let cs = self.geo.cluster_size();
        let mut release = std::mem::take(&mut st.bitmaps.released);
        let mut entries = Vec::with_capacity(st.bitmaps.list.len());
        let list = std::mem::take(&mut st.bitmaps.list);
        for b in &list {
            let Some(data) = &b.data else {
                entries.push(b.entry.clone());
                continue;
            };
            if b.entry.table_offset != 0 {
                release.extend(self.bitmap_clusters(&b.entry)?);
            }
            let mut table = vec![0u64; b.entry.table_size as usize];
            for (i, chunk) in data.chunks(cs as usize).enumerate() {
                if chunk.iter().all(|&x| x == 0) {
                    continue;
                }
                let at = st.alloc.cluster();
                let mut buf = chunk.to_vec();
                buf.resize(cs as usize, 0);
                self.storage
                    .write_at(&buf, at.get())
                    .map_err(|e| self.io_err("write bitmap data", at, e))?;
                st.deltas.range(at, cs, 1);
                if let Some(t) = table.get_mut(i) {
                    *t = at.get();
                }
            }
            let clusters = self.geo.clusters_for(table.len() as u64 * 8).max(1);
            let at = st.alloc.contiguous(clusters);
            let mut bytes = encode_words(&table);
            bytes.resize((clusters * cs) as usize, 0);
            self.storage
                .write_at(&bytes, at.get())
                .map_err(|e| self.io_err("write bitmap table", at, e))?;
            st.deltas.range(at, clusters * cs, 1);
            let mut e = b.entry.clone();
            e.table_offset = at.get();
            e.flags &= !FLAG_IN_USE;
            entries.push(e);
        }
        st.bitmaps.list = list;
        let new_ext = if entries.is_empty() {
            None
        } else {
            let dir = bitmap::encode_directory(&entries);
            let clusters = self.geo.clusters_for(dir.len() as u64);
            let at = st.alloc.contiguous(clusters);
            self.storage
                .write_at(&dir, at.get())
                .map_err(|e| self.io_err("write bitmap directory", at, e))?;
            st.deltas.range(at, clusters * cs, 1);
            Some(BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                directory_size: dir.len() as u64,
                directory_offset: at.get(),
            })
        };
        self.sync()?;
        self.commit_bitmaps_ext(st, new_ext)?;
        if let Some(old) = st.bitmaps.on_disk {
            release.push((
                old.directory_offset,
                old.directory_size.next_multiple_of(cs),
            ));
        }
        for (off, len) in release {
            st.deltas.range(HostOffset::new(off), len, -1);
            for c in (off..off + len).step_by(cs as usize) {
                st.alloc.free(HostOffset::new(c));
            }
        }
        for (b, e) in st.bitmaps.list.iter_mut().zip(entries) {
            b.entry = e;
        }
        st.bitmaps.on_disk = new_ext;
        st.bitmaps.in_use_set = false;
        Ok(())
    }

    /// Points the header at the new directory (or drops the extension and auto-clear
    /// bit 0 when there is none), durably: the extension's data in place when it
    /// exists, else the header area rewritten, within one sector.
    fn commit_bitmaps_ext(&self, st: &mut State, ext: Option<BitmapsExt>) -> Result<()> {
        let bit = Autoclear::BITMAPS.bits();
        let existing = st.header.extensions.get(EXT_BITMAPS).map(|e| e.data.len());
        if let (Some(ext), Some(24), true) = (ext, existing, st.header.autoclear & bit != 0) {
            if let Some(at) = st.header.extension_data_offset(EXT_BITMAPS) {
                let e = ext.to_extension();
                self.storage
                    .write_at(&e.data, at)
                    .map_err(|err| self.io_err("write header", at, err))?;
                self.sync()?;
                st.header.extensions.set(e);
                return Ok(());
            }
        }
        let mut h = st.header.clone();
        h.extensions.remove(EXT_BITMAPS);
        match ext {
            Some(ext) => {
                h.extensions.set(ext.to_extension());
                h.autoclear |= bit;
            }
            None => h.autoclear &= !bit,
        }
        h.layout_backing();
        if h.area_bytes().is_none_or(|a| a.len() > 512) {
            // Informative only (QEMU rewrites it at its next header update).
            h.extensions.remove(EXT_FEATURE_NAMES);
            h.layout_backing();
        }
        let Some(area) = h.area_bytes().filter(|a| a.len() <= 512) else {
            return Err(Error::Unsupported {
                file: self.name.clone(),
                what: "a header area too large to add the bitmaps extension in one sector".into(),
            });
        };
        self.storage
            .write_at(&area, 0)
            .map_err(|e| self.io_err("write header", 0u64, e))?;
        self.sync()?;
        st.header = h;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_bits_marks_exactly_the_range() {
        for (first, last) in [(0, 0), (3, 20), (8, 15), (7, 64), (0, 79)] {
            let mut d = vec![0u8; 10];
            set_bits(&mut d, first, last);
            for i in 0..80 {
                assert_eq!(
                    bit(&d, i),
                    (first..=last).contains(&i),
                    "{first}-{last} bit {i}"
                );
            }
        }
        let mut d = vec![0u8; 1];
        set_bits(&mut d, 4, 1000);
        assert_eq!(d, [0xf0]);
    }
}
