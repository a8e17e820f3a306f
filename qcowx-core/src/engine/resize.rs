//! Growing the virtual disk.

use crate::error::{Error, Result};
use crate::format::addr::HostOffset;
use crate::format::header::MAX_VIRTUAL_SIZE;
use crate::format::tables::encode_words;
use crate::storage::Storage;

use super::image::*;

impl Image {
    /// Grows the virtual disk to `new_size` bytes (rounded up to 512), growing the L1
    /// table when needed, and the persistent bitmaps with it (new bits clear; refused
    /// while one is inconsistent, or from a repair-mode handle, which does not load
    /// them). Shrinking is refused.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Error, Image};
    ///
    /// # fn main() -> Result<(), Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    /// img.write_at(b"kept", 0)?;
    /// img.resize(3 << 30)?;
    /// assert_eq!(img.size(), 3 << 30);
    /// img.write_at(b"far", (3 << 30) - 3)?;
    /// let mut buf = [0u8; 4];
    /// img.read_at(&mut buf, 0)?;
    /// assert_eq!(&buf, b"kept");
    /// assert!(matches!(img.resize(1 << 20), Err(Error::Unsupported { .. })));
    /// # Ok(()) }
    /// ```
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let new_size = new_size.next_multiple_of(512);
        let _structure = self.lock_structure();
        let r = self.resize_locked(new_size);
        if r.is_err() {
            // A resize cut short may leave a moved L1 table the header does not name.
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.stale {
                st.deltas.lose_exactness();
            }
            // The bitmaps cover the size the header still names.
            let size = st.header.size;
            let _ = self.fit_bitmaps(&mut st, size);
        }
        r
    }

    fn resize_locked(&self, new_size: u64) -> Result<()> {
        let mut st = self.lock_state()?;
        if new_size < st.header.size {
            return Err(Error::Unsupported {
                file: self.name.clone(),
                what: "shrinking an image".into(),
            });
        }
        if new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} is larger than the maximum {MAX_VIRTUAL_SIZE}"
            )));
        }
        let needed = self.geo.l1_entries_for(new_size);
        if needed * 8 > crate::format::header::MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "size {new_size} needs an L1 table larger than 32 MiB; use larger clusters"
            )));
        }
        self.fit_bitmaps(&mut st, new_size)?;
        if needed > u64::from(st.header.l1_size) {
            self.flush_locked(&mut st)?;
            self.mark_stale(&mut st)?;
            let clusters = self.geo.clusters_for(needed * 8);
            let at = st.alloc.contiguous(clusters).get();
            let mut l1 = self.root(&st, DEFAULT_ROOT)?.l1.clone();
            l1.resize(needed as usize, 0);
            let mut bytes = encode_words(&l1);
            bytes.resize((clusters * self.geo.cluster_size()) as usize, 0);
            self.storage
                .write_at(&bytes, at)
                .map_err(|e| self.io_err("write L1 table", at, e))?;
            self.sync()?;
            let r = self.root_mut(&mut st, DEFAULT_ROOT)?;
            r.l1 = l1;
            r.l1_offset = at;
            let (old_at, old_entries) = (st.header.l1_table_offset, st.header.l1_size);
            st.header.l1_size = needed as u32;
            st.header.l1_table_offset = at;
            // The active L1 table moves (its links stay): only its own clusters'
            // references move. The header commit below makes the move count.
            st.deltas
                .range(HostOffset::new(old_at), u64::from(old_entries) * 8, -1);
            st.deltas.range(HostOffset::new(at), needed * 8, 1);
        }
        let old_size = st.header.size;
        // The root grows now (so the zeroing below is in range); the header's size
        // only at the end, in the single-sector write that commits the resize.
        self.root_mut(&mut st, DEFAULT_ROOT)?.size = new_size;
        // Growing must not reveal a longer backing file's data past the old end: that
        // area reads zeros (QEMU writes zeros there too), durably before the header
        // makes the new size durable.
        let reveal_end = self.backing.as_ref().map_or(0, |b| b.size()).min(new_size);
        if reveal_end > old_size {
            drop(st);
            let zeroed = self.write_zeroes(old_size, reveal_end - old_size, false);
            st = self.lock_state()?;
            if let Err(e) = zeroed.and_then(|_| self.flush_locked(&mut st)) {
                self.root_mut(&mut st, DEFAULT_ROOT)?.size = old_size;
                return Err(e);
            }
        }
        st.header.size = new_size;
        self.write_header_fields(&st)?;
        self.sync()
    }
}
