//! The image API: open, create, and positional I/O on the active layer.
//!
//! An [`Image`] is `Send + Sync`; every I/O method takes `&self`, so one open image
//! serves many threads. Metadata (the L1 table, the L2 cache, the allocator) lives
//! behind one mutex that is held only while mappings are looked up or changed; data
//! reads and in-place data writes happen outside it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use super::{Extent, ExtentStatus};
use crate::engine::alloc::Allocator;
use crate::engine::backing::{self, Layer};
use crate::engine::cache::L2Cache;
use crate::error::{Error, Result};
use crate::format::compress::CompressionType;
use crate::format::header::{Header, Incompatible};
use crate::format::tables::Geometry;
use crate::storage::Storage;

/// Facts about an image, as `qemu-img info` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// QCOW2 version (2 or 3).
    pub version: u32,
    /// `0.10` for version 2, `1.1` for version 3.
    pub compat: &'static str,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
    /// Backing format, if recorded.
    pub backing_format: Option<String>,
    /// The backing file name resolved against the image's folder.
    pub full_backing_filename: Option<String>,
    /// The dirty bit (refcounts stale).
    pub dirty: bool,
    /// The corrupt bit.
    pub corrupt: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Lazy refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// Length of the image file in bytes.
    pub file_length: u64,
    /// Snapshot table entries.
    pub snapshots: Vec<SnapshotInfo>,
    /// Persistent dirty bitmaps (empty when the bitmaps extension is absent or not
    /// consistent).
    pub bitmaps: Vec<super::BitmapInfo>,
    /// The snapshot in an object store this image reads its unallocated clusters
    /// from, when its header names one (`Err`: the extension is damaged, and why).
    pub remote_base: Option<std::result::Result<crate::format::remote::RemoteBase, String>>,
}

/// One snapshot table entry, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock.
    pub vm_clock_nsec: u64,
    /// VM state size.
    pub vm_state_size: u64,
    /// Virtual disk size at the snapshot, if recorded.
    pub disk_size: Option<u64>,
    /// The guest's instruction count, if recorded (QEMU's `icount`).
    pub icount: Option<u64>,
}

/// What a writable open found the image in, and what it did about it.
/// `#[non_exhaustive]`: later versions may tell more cases apart, so a match outside
/// the crate keeps a `_` arm (one that lists today's cases does not compile).
///
/// ```compile_fail
/// use qcowx_core::OpenState;
///
/// fn scanned(s: OpenState) -> bool {
///     match s {
///         OpenState::ReadOnly | OpenState::Clean => false,
///         OpenState::Reconciled | OpenState::Recovered | OpenState::Rebuilt => true,
///     }
/// }
/// # fn main() { let _ = scanned(OpenState::Clean); }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpenState {
    /// Opened read-only: nothing was checked or changed.
    ReadOnly,
    /// qcowx closed it cleanly and nothing that matters changed since (its clean-close
    /// stamp matched): opened without a scan.
    Clean,
    /// Closed cleanly by another program (or without a stamp): one scan of the
    /// metadata made sure no writable link reaches a shared cluster.
    Reconciled,
    /// Not closed cleanly (the dirty bit was set: a crash, or a writer with lazy
    /// refcounts): every refcount was rebuilt from a scan before anything else.
    Recovered,
    /// Closed cleanly by another program, but the scan found refcounts lower than the
    /// references (a damaged refcount table or block): every refcount was rebuilt
    /// before anything else, as for [`OpenState::Recovered`].
    Rebuilt,
}

impl OpenState {
    /// What a program serving the image should tell its operator, if anything.
    ///
    /// ```
    /// use qcowx_core::OpenState;
    ///
    /// assert_eq!(OpenState::Clean.describe(), None);
    /// assert!(OpenState::Recovered.describe().unwrap().contains("not closed cleanly"));
    /// ```
    pub fn describe(self) -> Option<&'static str> {
        match self {
            OpenState::Recovered => Some(
                "was not closed cleanly (dirty bit set): refcounts rebuilt from a scan of \
                 its metadata; every write flushed before the shutdown is kept",
            ),
            OpenState::Reconciled => Some(
                "was last written by another program: its metadata was scanned once \
                 (the next open after a clean close needs no scan)",
            ),
            OpenState::Rebuilt => Some(
                "had refcounts lower than its references (damaged refcount structures): \
                 every refcount was rebuilt from a scan of its metadata",
            ),
            OpenState::Clean | OpenState::ReadOnly => None,
        }
    }
}

/// Identifies a root (an L1 table) of the image. [`DEFAULT_ROOT`] is the default
/// VDI, QCOW2's active layer; other roots are snapshot table entries.
pub type RootId = u64;

/// The default VDI: the header's active L1 table.
pub const DEFAULT_ROOT: RootId = 0;

/// A root loaded for I/O: its L1 table and where it lives.
#[derive(Debug, Clone)]
pub(crate) struct Root {
    /// The L1 table, as the latest writes left it (links may not be on disk yet).
    pub(crate) l1: Vec<u64>,
    /// Where the L1 table lives in the file.
    pub(crate) l1_offset: u64,
    /// Dirty 512-byte sectors of the on-disk L1 table.
    pub(crate) dirty: BTreeSet<usize>,
    /// Virtual size of this root's disk.
    pub(crate) size: u64,
    /// Whether writes through this root are allowed (VDI heads, not snapshots).
    pub(crate) writable: bool,
}

/// Mutable metadata, behind [`Image::state`].
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) header: Header,
    /// Roots loaded for I/O; the default root is always present.
    pub(crate) roots: BTreeMap<RootId, Root>,
    pub(crate) cache: L2Cache,
    pub(crate) alloc: Allocator,
    /// We set the dirty bit: on-disk refcounts are stale until `deltas` is applied.
    pub(crate) stale: bool,
    /// The dirty bit was set when a repair-mode open took the image, which settles
    /// nothing: until refcounts are next written, what is stale is not this handle's
    /// own doing but what a crash or another writer left — damage a check reports.
    pub(crate) inherited_stale: bool,
    /// Refcount changes since the on-disk refcounts were last exact.
    pub(crate) deltas: super::RefDeltas,
    /// Why the last refcount write was a full rebuild rather than an apply of
    /// `deltas` (None: it was an apply, or there was none).
    pub(crate) last_rebuild: Option<&'static str>,
    /// The snapshot table's roots, qcowx's records of them and lookups over them.
    pub(crate) registry: crate::format::registry::Registry,
    pub(crate) closed: bool,
    /// What the open found and did.
    pub(crate) open_state: OpenState,
    /// Counts changes to in-memory L1 tables (with the cache's and the allocator's
    /// counters, tells gc whether anything changed while it scanned).
    pub(crate) l1_changes: u64,
    /// The image's metadata clusters, for [`Image::guard_write`].
    pub(crate) metadata: super::metadata_map::MetadataMap,
    /// The persistent dirty bitmaps.
    pub(crate) bitmaps: super::bitmap_set::Bitmaps,
    /// Whether the image looks metadata-preallocated (see
    /// [`Image::metadata_preallocated`]); `None` until a block status asks.
    pub(crate) metadata_preallocated: Option<bool>,
}

/// The I/O gate held exclusively: no data I/O is in flight (the proof some metadata
/// operations take, e.g. before the file may shrink).
pub(crate) type IoGate<'a> = std::sync::RwLockWriteGuard<'a, ()>;

/// A moment in the metadata's history: two equal values mean no link changed, no
/// cluster was allocated and none was freed in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Generation {
    l2: u64,
    l1: u64,
    end: u64,
    pending: usize,
}

impl State {
    pub(crate) fn generation(&self) -> Generation {
        Generation {
            l2: self.cache.changes(),
            l1: self.l1_changes,
            end: self.alloc.end(),
            pending: self.alloc.pending_len(),
        }
    }
}

/// An open QCOW2 image.
///
/// Reads and writes address the active layer (QCOW2's active L1 table). Drop closes
/// the image as [`Image::close`] does, ignoring errors; call `close` to see them.
///
/// # Threads and concurrent I/O
///
/// `Image` is `Send + Sync` and every method takes `&self`: share one open image
/// between threads with an `Arc<Image>` (which [`Image::open_root`] needs anyway)
/// rather than opening the file again (while a handle writes, another open of the
/// file, in this process or any other, is refused with [`Error::Locked`]). Requests
/// in flight at once behave as on a disk:
///
/// - requests on ranges that do not overlap never affect each other, also within one
///   cluster;
/// - a read that overlaps a write in flight returns, for each byte, either its old or
///   its new content (possibly some of each); two overlapping writes in flight leave
///   each byte as one of them wrote it. Nothing orders such requests: order them
///   yourself when it matters, as a guest does;
/// - a request that has returned is seen by every request that starts after it, in
///   any thread, and by every handle on the image ([`Disk`](crate::Disk)s share it);
///   it is durable once a later [`Image::flush`] returns;
/// - whatever runs concurrently, a read never returns bytes of another root or of a
///   freed cluster, and metadata is never left half-updated in memory: snapshot,
///   fork, delete, revert, resize and gc may run while other threads read and write.
///   A snapshot holds every write that returned before it was taken and none that
///   started after it returned; a write in flight meanwhile may be in it wholly,
///   cluster by cluster in part, or not at all, as on a disk snapshotted with a
///   request in flight.
///
/// ```
/// use std::sync::Arc;
/// use qcowx_core::{CreateOptions, Disk, Image};
///
/// fn send_sync<T: Send + Sync>() {}
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// send_sync::<Image>();
/// send_sync::<Disk>();
/// let dir = tempfile::tempdir().unwrap();
/// let img = Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?);
/// // Four threads write their own 4 KiB at once; none disturbs another.
/// std::thread::scope(|s| {
///     for t in 0..4u8 {
///         let img = &img;
///         s.spawn(move || img.write_at(&[t + 1; 4096], u64::from(t) * 4096).unwrap());
///     }
/// });
/// let mut buf = vec![0u8; 4 * 4096];
/// img.read_at(&mut buf, 0)?;
/// for t in 0..4usize {
///     assert!(buf[t * 4096..(t + 1) * 4096].iter().all(|&b| b == t as u8 + 1));
/// }
/// # Ok(()) }
/// ```
///
/// # Facts about an open image
///
/// ```
/// use qcowx_core::{CreateOptions, Image, OpenState};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("a.qcow2");
/// Image::create(&path, &CreateOptions::new(1 << 30))?.close()?;
/// let img = Image::open_rw(&path)?;
/// assert_eq!((img.size(), img.cluster_size()), (1 << 30, 65536));
/// assert!(img.is_writable());
/// assert_eq!(img.file_name(), path.display().to_string());
/// assert_eq!(img.path(), Some(path.as_path()));
/// assert!(img.backing().is_none());
/// assert_eq!(img.open_state(), OpenState::Clean);
/// assert_eq!(img.open_state().describe(), None); // nothing to tell an operator
/// assert_eq!(img.header().version, 3);
/// img.write_at(&[1; 512], 0)?;
/// assert!(img.pending_refcount_changes() > 0);
/// let info = img.info()?;
/// assert_eq!((info.virtual_size, info.compat, info.refcount_bits), (1 << 30, "1.1", 32));
/// assert!(info.snapshots.is_empty() && info.backing_file.is_none());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Image {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) name: String,
    pub(super) path: Option<PathBuf>,
    pub(crate) geo: Geometry,
    pub(super) compression: CompressionType,
    pub(super) writable: bool,
    pub(super) backing: Option<Arc<dyn Layer>>,
    pub(crate) state: Mutex<State>,
    /// Held shared by data I/O that uses a mapping looked up under `state`; taken
    /// exclusively before freed clusters become reusable.
    pub(super) io_gate: RwLock<()>,
    /// Held by operations that change the set of roots or where tables live
    /// (snapshot, fork, delete, revert, rename, resize, repair, close) and by gc for
    /// its whole run, so gc's scan sees a fixed set of roots while reads and writes
    /// go on. Lock order: `structure`, then `state`, then `io_gate`.
    pub(super) structure: Mutex<()>,
    /// Set by the first write or zeroing of the session: a session that changed the
    /// file may stamp it at close (see `Image::close`); one that did not leaves it as
    /// it was.
    pub(crate) wrote: std::sync::atomic::AtomicBool,
    /// Set when a write on metadata was refused (the image is then marked corrupt):
    /// why this handle changes nothing more — no data, no structure — until a
    /// repair. A leaf lock: taken alone, or inside `state`, never around another.
    pub(super) refused: Mutex<Option<String>>,
}

impl Image {
    // ---- small helpers ------------------------------------------------------------

    pub(crate) fn io_err(
        &self,
        op: &'static str,
        offset: impl Into<u64>,
        source: std::io::Error,
    ) -> Error {
        Error::io(self.name.clone(), op, offset.into(), source)
    }

    pub(crate) fn corrupt(
        &self,
        structure: &'static str,
        offset: impl Into<u64>,
        why: impl Into<String>,
    ) -> Error {
        Error::Corrupt {
            file: self.name.clone(),
            structure,
            offset: offset.into(),
            why: why.into(),
        }
    }

    pub(crate) fn lock_state(&self) -> Result<MutexGuard<'_, State>> {
        // A panic while holding the lock cannot leave half-applied metadata visible on
        // disk (links are written at flush), so a poisoned lock is still usable.
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closed {
            return Err(Error::Closed {
                file: self.name.clone(),
            });
        }
        Ok(st)
    }

    /// Excludes other structural operations and gc (see [`Image::structure`]'s field).
    pub(crate) fn lock_structure(&self) -> MutexGuard<'_, ()> {
        self.structure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The structure lock if no structural operation or gc holds it now.
    pub(crate) fn try_lock_structure(&self) -> Option<MutexGuard<'_, ()>> {
        match self.structure.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    pub(super) fn gate_read(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.io_gate.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for all data I/O in flight (callers hold the state lock, so no new I/O
    /// can look up a mapping meanwhile).
    pub(crate) fn io_gate_write(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.io_gate.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.storage
            .sync_data()
            .map_err(|e| self.io_err("fdatasync", 0u64, e))
    }

    pub(crate) fn root<'s>(&self, st: &'s State, root: RootId) -> Result<&'s Root> {
        st.roots.get(&root).ok_or_else(|| {
            Error::InvalidArgument(format!("{}: root {root} is not open", self.name))
        })
    }

    pub(super) fn root_mut<'s>(&self, st: &'s mut State, root: RootId) -> Result<&'s mut Root> {
        st.roots.get_mut(&root).ok_or_else(|| {
            Error::InvalidArgument(format!("{}: root {root} is not open", self.name))
        })
    }

    pub(super) fn check_range(
        &self,
        st: &State,
        root: RootId,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let size = self.root(st, root)?.size;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange {
                file: self.name.clone(),
                offset,
                len,
                size,
            }),
        }
    }

    /// The one check before anything that changes the image (data or structure): the
    /// handle is open for writing and no write on its metadata has been refused.
    /// After a refusal the image is marked corrupt; only [`Image::repair`] goes on
    /// (it checks [`Image::check_open_for_writing`]).
    pub(crate) fn check_writable(&self) -> Result<()> {
        self.check_open_for_writing()?;
        match self.refused_why() {
            None => Ok(()),
            Some(why) => Err(Error::ReadOnly {
                file: self.name.clone(),
                why,
            }),
        }
    }

    /// Whether the handle was opened for writing (a refusal since does not count).
    pub(crate) fn check_open_for_writing(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                file: self.name.clone(),
                why: "image is open read-only".into(),
            })
        }
    }

    /// Why this handle writes no more, if a write on metadata was refused.
    pub(crate) fn refused_why(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_refused(&self, why: Option<String>) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    pub(super) fn check_root_writable(&self, st: &State, root: RootId) -> Result<()> {
        self.check_writable()?;
        if self.root(st, root)?.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                file: self.name.clone(),
                why: "snapshots are read-only".into(),
            })
        }
    }

    // ---- accessors ----------------------------------------------------------------

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .header
            .size
    }

    pub(crate) fn root_size(&self, root: RootId) -> Result<u64> {
        let st = self.lock_state()?;
        Ok(self.root(&st, root)?.size)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// Whether this handle may write.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Refcount changes recorded in memory and not yet written (see
    /// [`Image::checkpoint`]): a long-running writer checkpoints when this grows, to
    /// bound the memory the record takes (about 32 bytes a change).
    pub fn pending_refcount_changes(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .deltas
            .len()
    }

    /// What opening found the image in and did about it (for a server to report an
    /// unclean shutdown, say).
    pub fn open_state(&self) -> OpenState {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open_state
    }

    /// The file name used in messages.
    pub fn file_name(&self) -> &str {
        &self.name
    }

    /// The image's path, when opened from a file.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The backing layer, if one is open.
    pub fn backing(&self) -> Option<&Arc<dyn Layer>> {
        self.backing.as_ref()
    }

    /// A copy of the current header.
    pub fn header(&self) -> Header {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .header
            .clone()
    }

    /// Facts about the image.
    pub fn info(&self) -> Result<ImageInfo> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let h = &st.header;
        let file_length = self
            .storage
            .len()
            .map_err(|e| self.io_err("stat", 0u64, e))?;
        Ok(ImageInfo {
            virtual_size: h.size,
            cluster_size: h.cluster_size(),
            version: h.version,
            compat: if h.version >= 3 { "1.1" } else { "0.10" },
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format().map(str::to_string),
            full_backing_filename: h.backing_file.as_ref().map(|b| {
                backing::resolve(self.path.as_deref(), b)
                    .display()
                    .to_string()
            }),
            dirty: h.incompatible.contains(Incompatible::DIRTY),
            corrupt: h.incompatible.contains(Incompatible::CORRUPT),
            extended_l2: h.extended_l2(),
            lazy_refcounts: h.compatible & 1 != 0,
            refcount_bits: 1 << h.refcount_order,
            compression_type: match self.compression {
                CompressionType::Deflate => "zlib",
                CompressionType::Zstd => "zstd",
            },
            file_length,
            snapshots: st
                .registry
                .entries()
                .iter()
                .map(|s| SnapshotInfo {
                    id: s.id.clone(),
                    name: s.name.clone(),
                    date_sec: s.date_sec,
                    date_nsec: s.date_nsec,
                    vm_clock_nsec: s.vm_clock_nsec,
                    vm_state_size: s.vm_state_size(),
                    disk_size: s.disk_size(),
                    icount: s.icount(),
                })
                .collect(),
            bitmaps: st.bitmaps.infos(),
            remote_base: h
                .extensions
                .get(crate::format::remote::EXT_REMOTE_BASE)
                .map(|e| {
                    crate::format::remote::RemoteBase::decode(&e.data).map_err(|e| e.to_string())
                }),
        })
    }

    // ---- mapping ------------------------------------------------------------------

    // ---- the I/O API --------------------------------------------------------------
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl Layer for Image {
    fn size(&self) -> u64 {
        Image::size(self)
    }

    fn read_layer(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = Image::size(self);
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if avail > 0 {
            self.read_at(&mut buf[..avail], offset)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn layer_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let size = Image::size(self);
        let inside = size.saturating_sub(offset).min(len);
        let mut out = if inside > 0 {
            self.block_status(offset, inside)?
        } else {
            Vec::new()
        };
        if inside < len {
            out.push(Extent {
                offset: offset + inside,
                length: len - inside,
                status: ExtentStatus::Unallocated,
                depth: 0,
                host_offset: None,
            });
        }
        Ok(out)
    }

    fn prefetch_layer(&self, offset: u64, len: u64) -> Result<()> {
        let inside = Image::size(self).saturating_sub(offset).min(len);
        if inside > 0 {
            self.prefetch_root(DEFAULT_ROOT, offset, inside)?;
        }
        Ok(())
    }

    fn chain_len(&self) -> u32 {
        1 + self.backing.as_ref().map_or(0, |b| b.chain_len())
    }

    fn name(&self) -> &str {
        &self.name
    }
}
