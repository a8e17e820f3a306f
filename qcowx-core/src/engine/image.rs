//! The image API: open, create, and positional I/O on the active layer.
//!
//! An [`Image`] is `Send + Sync`; every I/O method takes `&self`, so one open image
//! serves many threads. Metadata (the L1 table, the L2 cache, the allocator) lives
//! behind one mutex that is held only while mappings are looked up or changed; data
//! reads and in-place data writes happen outside it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IoSlice;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::engine::alloc::{runs, Allocator};
use crate::engine::backing::{self, Layer};
use crate::engine::cache::{L2Cache, DEFAULT_CACHE_BYTES};
use crate::error::{Error, Result};
use crate::format::compress::{decompress_cluster, CompressionType};
use crate::format::extensions::{Extension, Extensions, FeatureKind, EXT_BACKING_FORMAT};
use crate::format::header::{
    Autoclear, Header, Incompatible, HEADER_PROBE_LEN, MAX_CLUSTER_BITS, MAX_VIRTUAL_SIZE,
    MIN_CLUSTER_BITS, V3_HEADER_LEN,
};
use crate::format::snapshot::{self, SnapshotEntry};
use crate::format::tables::{
    decode_words, encode_words, for_each_piece, ClusterKind, Geometry, L1Entry, L2Entry, Source,
    WRITABLE, ZERO,
};
use crate::refcount;
use crate::storage::lock::LockMode;
use crate::storage::{self, FileStorage, OpenMode, Storage};

/// The allocation state of a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentStatus {
    /// Data is stored (here or in a backing layer).
    Data,
    /// Reads as zeros, recorded explicitly.
    Zero,
    /// Not allocated anywhere in the chain: reads as zeros.
    Unallocated,
}

/// One extent of [`Image::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What the range holds.
    pub status: ExtentStatus,
    /// Which layer answered: 0 this image, 1 its backing file, and so on. For
    /// [`ExtentStatus::Unallocated`] it is the number of backing layers below this image
    /// (as `qemu-img map` reports it).
    pub depth: u32,
    /// Host offset of the data in that layer's file, when it is stored uncompressed.
    pub host_offset: Option<u64>,
}

/// How to open an image. Read-only with a shared lock unless told otherwise.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    write: bool,
    lock: Option<LockMode>,
    cache_bytes: usize,
    open_backing: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions::new()
    }
}

impl OpenOptions {
    /// Read-only, shared lock, default cache, backing chain opened.
    pub fn new() -> OpenOptions {
        OpenOptions {
            write: false,
            lock: None,
            cache_bytes: DEFAULT_CACHE_BYTES,
            open_backing: true,
        }
    }
    /// Open for writing (takes the exclusive image lock).
    pub fn write(mut self, write: bool) -> Self {
        self.write = write;
        self
    }
    /// Override the image lock (e.g. [`LockMode::ForceShare`] to read an image in use,
    /// like `qemu-img -U`).
    pub fn lock(mut self, mode: LockMode) -> Self {
        self.lock = Some(mode);
        self
    }
    /// Size of the L2 table cache in bytes.
    pub fn cache_bytes(mut self, bytes: usize) -> Self {
        self.cache_bytes = bytes;
        self
    }
    /// Whether to open the backing chain (without it, unallocated clusters read zeros).
    pub fn open_backing(mut self, open: bool) -> Self {
        self.open_backing = open;
        self
    }
    /// The lock mode in effect.
    pub fn lock_mode(&self) -> LockMode {
        self.lock.unwrap_or(if self.write {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        })
    }
    /// Opens the image at `path`.
    pub fn open(&self, path: impl AsRef<Path>) -> Result<Image> {
        let path = path.as_ref();
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Image::open_layer(path, self, &[canon])
    }
}

/// How to create an image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (rounded up to a multiple of 512).
    pub size: u64,
    /// Cluster size: a power of two from 512 B to 2 MiB.
    pub cluster_size: u64,
    /// Backing file name, stored as given (relative names resolve against the image).
    pub backing_file: Option<String>,
    /// Backing format (`qcow2` or `raw`); probed from the file when absent.
    pub backing_format: Option<String>,
    /// Use 128-bit L2 entries with subcluster bitmaps.
    pub extended_l2: bool,
    /// Compression type for compressed clusters.
    pub compression: CompressionType,
    /// Refcount width in bits (1..=64, a power of two). The default, 32, cannot
    /// overflow at QEMU's snapshot limit.
    pub refcount_bits: u32,
}

impl CreateOptions {
    /// An image of `size` bytes with 64 KiB clusters and no backing file.
    pub fn new(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            cluster_size: 65536,
            backing_file: None,
            backing_format: None,
            extended_l2: false,
            compression: CompressionType::Deflate,
            refcount_bits: 32,
        }
    }
}

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
    /// We set the dirty bit: refcounts are stale until the next rebuild.
    pub(crate) stale: bool,
    pub(crate) snapshots: Vec<SnapshotEntry>,
    /// qcowx's facts about each snapshot table entry (parallel to `snapshots`).
    pub(crate) records: Vec<crate::vdi::Record>,
    /// Bytes at `snapshots_offset` this session may fill without moving the table.
    pub(crate) table_capacity: u64,
    /// Name and head lookups over the table.
    pub(crate) index: crate::vdi::Index,
    pub(crate) closed: bool,
    /// Counts changes to in-memory L1 tables (with the cache's and the allocator's
    /// counters, tells gc whether anything changed while it scanned).
    pub(crate) l1_changes: u64,
}

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
#[derive(Debug)]
pub struct Image {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) name: String,
    path: Option<PathBuf>,
    pub(crate) geo: Geometry,
    compression: CompressionType,
    writable: bool,
    backing: Option<Arc<dyn Layer>>,
    pub(crate) state: Mutex<State>,
    /// Held shared by data I/O that uses a mapping looked up under `state`; taken
    /// exclusively before freed clusters become reusable.
    io_gate: RwLock<()>,
    /// Held by operations that change the set of roots or where tables live
    /// (snapshot, fork, delete, revert, rename, resize, repair, close) and by gc for
    /// its whole run, so gc's scan sees a fixed set of roots while reads and writes
    /// go on. Lock order: `structure`, then `state`, then `io_gate`.
    structure: Mutex<()>,
}

/// Zeros lent by [`Image::read_mapped`] for clusters that read as zeros.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// A piece of a request: `len` guest bytes at `guest` come from `src`.
#[derive(Debug, Clone, Copy)]
struct Piece {
    guest: u64,
    len: u64,
    src: Source,
}

pub(crate) enum ZeroMode {
    Zero { unmap: bool },
    Discard,
}

impl Image {
    /// Opens an image read-only (shared lock, backing chain opened).
    pub fn open(path: impl AsRef<Path>) -> Result<Image> {
        OpenOptions::new().open(path)
    }

    /// Opens an image for reading and writing.
    pub fn open_rw(path: impl AsRef<Path>) -> Result<Image> {
        OpenOptions::new().write(true).open(path)
    }

    pub(crate) fn open_layer(path: &Path, opts: &OpenOptions, chain: &[PathBuf]) -> Result<Image> {
        let name = path.display().to_string();
        let mode = OpenMode {
            writable: opts.write,
            lock: opts.lock_mode(),
        };
        let storage = FileStorage::open(path, mode).map_err(|e| open_error(&name, e))?;
        Image::from_parts(
            Arc::new(storage),
            name,
            Some(path.to_path_buf()),
            opts,
            chain,
        )
    }

    /// Opens an image held by any [`Storage`] (an in-memory file, a test layer).
    ///
    /// A backing file is resolved against the current directory.
    pub fn from_storage(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        let name = storage
            .path()
            .map_or_else(|| "<memory>".to_string(), |p| p.display().to_string());
        let path = storage.path().map(Path::to_path_buf);
        let chain: Vec<PathBuf> = path
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
            .collect();
        Image::from_parts(storage, name, path, opts, &chain)
    }

    fn from_parts(
        storage: Arc<dyn Storage>,
        name: String,
        path: Option<PathBuf>,
        opts: &OpenOptions,
        chain: &[PathBuf],
    ) -> Result<Image> {
        let io = |op, offset, source| Error::Io {
            file: name.clone(),
            op,
            offset,
            source,
        };
        let file_len = storage.len().map_err(|e| io("stat", 0, e))?;
        // The fixed header first, then the rest of the first cluster it describes (not
        // the largest cluster size every time: images are opened often, layers of a
        // chain once each).
        let mut first = vec![0u8; file_len.min(HEADER_PROBE_LEN) as usize];
        storage
            .read_at(&mut first, 0)
            .map_err(|e| io("read header", 0, e))?;
        let first_len = Header::first_cluster_len(&first, file_len);
        first.truncate(first_len as usize);
        if first_len > first.len() as u64 {
            let probed = first.len();
            first.resize(first_len as usize, 0);
            storage
                .read_at(&mut first[probed..], probed as u64)
                .map_err(|e| io("read header", probed as u64, e))?;
        }
        let header = Header::parse(&first, file_len).map_err(|source| Error::Header {
            file: name.clone(),
            source,
        })?;
        let unsupported = |what: &str| Error::Unsupported {
            file: name.clone(),
            what: what.to_string(),
        };
        if header.incompatible.contains(Incompatible::EXTERNAL_DATA) {
            return Err(unsupported("an external data file"));
        }
        if opts.write {
            if header.incompatible.contains(Incompatible::CORRUPT) {
                return Err(Error::ReadOnly {
                    file: name.clone(),
                    why: "the image is marked corrupt; it can only be opened read-only \
                          (repair it with `qemu-img check -r all`)"
                        .into(),
                });
            }
            if header.version < 3 {
                return Err(Error::ReadOnly {
                    file: name.clone(),
                    why: "version 2 (compat 0.10) images are read-only in qcowx; \
                          upgrade with `qemu-img amend -o compat=1.1`"
                        .into(),
                });
            }
        }
        let geo = Geometry {
            cluster_bits: header.cluster_bits,
            extended: header.extended_l2(),
        };
        let compression = match header.compression_type {
            1 => CompressionType::Zstd,
            _ => CompressionType::Deflate,
        };

        // Active L1 table (its bounds were validated against the file length).
        let l1_bytes = u64::from(header.l1_size) * 8;
        let mut raw_l1 = vec![0u8; l1_bytes as usize];
        storage
            .read_at(&mut raw_l1, header.l1_table_offset)
            .map_err(|e| io("read L1 table", header.l1_table_offset, e))?;
        let l1 = decode_words(&raw_l1);

        // Snapshot table. Its length is only known once it is parsed: read a guess and
        // double it while the entries run past it, up to the 64 MiB QEMU allows (reading
        // the whole bound every time costs a 64 MiB read and buffer per open when the
        // table is followed by other clusters).
        let snapshots = if header.nb_snapshots > 0 {
            let avail =
                (file_len - header.snapshots_offset).min(snapshot::MAX_SNAPSHOT_TABLE_BYTES);
            let mut want = (u64::from(header.nb_snapshots) * 128)
                .max(64 << 10)
                .min(avail);
            loop {
                let mut table = vec![0u8; want as usize];
                storage
                    .read_at(&mut table, header.snapshots_offset)
                    .map_err(|e| io("read snapshot table", header.snapshots_offset, e))?;
                match snapshot::parse_table(
                    &table,
                    header.snapshots_offset,
                    header.nb_snapshots,
                    geo.cluster_size(),
                ) {
                    Err(snapshot::SnapshotError::Truncated { .. }) if want < avail => {
                        want = (want * 2).min(avail);
                    }
                    parsed => {
                        break parsed.map_err(|source| Error::Snapshot {
                            file: name.clone(),
                            source,
                        })?
                    }
                }
            }
        } else {
            Vec::new()
        };

        let backing = match (&header.backing_file, opts.open_backing) {
            (Some(b), true) => Some(backing::open_chain(
                &name,
                path.as_deref(),
                b,
                header.backing_format(),
                chain,
                opts,
            )?),
            _ => None,
        };

        let stale = header.incompatible.contains(Incompatible::DIRTY) && opts.write;
        let mut roots = BTreeMap::new();
        roots.insert(
            DEFAULT_ROOT,
            Root {
                l1,
                l1_offset: header.l1_table_offset,
                dirty: BTreeSet::new(),
                size: header.size,
                writable: opts.write,
            },
        );
        let records = crate::vdi::records_for(&snapshots);
        let table_capacity = if header.nb_snapshots > 0 {
            let used: u64 = snapshots.iter().map(|e| e.encoded_len() as u64).sum();
            used.next_multiple_of(geo.cluster_size())
        } else {
            0
        };
        let index = crate::vdi::Index::build(&snapshots, &records);
        let state = State {
            index,
            records,
            table_capacity,
            roots,
            cache: L2Cache::new(opts.cache_bytes, geo.cluster_size() as usize),
            alloc: Allocator::new(geo.cluster_size(), file_len),
            stale,
            snapshots,
            closed: false,
            l1_changes: 0,
            header,
        };
        let img = Image {
            storage,
            name,
            path,
            geo,
            compression,
            writable: opts.write,
            backing,
            state: Mutex::new(state),
            io_gate: RwLock::new(()),
            structure: Mutex::new(()),
        };
        if opts.write {
            img.clear_autoclear()?;
            // Anything may have written the image since qcowx last did: restore
            // invariant W before any write of ours (O(metadata)).
            img.reconcile()?;
        }
        Ok(img)
    }

    /// Clears every auto-clear feature bit before the first write, as QCOW2 requires of
    /// a writer: qcowx maintains none of them (persistent bitmaps become inconsistent,
    /// exactly as when any writer that does not know them writes the image). One
    /// single-sector header write, made durable before any other write.
    fn clear_autoclear(&self) -> Result<()> {
        let mut st = self.lock_state()?;
        // qcowx keeps no auto-clear bit set at rest (see `reconcile`); images an
        // earlier qcowx marked with bit 32 lose it here too.
        let keep = 0;
        if st.header.autoclear == keep {
            return Ok(());
        }
        if st.header.autoclear & Autoclear::BITMAPS.bits() != 0 {
            // The bitmaps' clusters stop being referenced: their refcounts become
            // stale in the same header write.
            st.header.incompatible |= Incompatible::DIRTY;
            st.stale = true;
        }
        st.header.autoclear = keep;
        self.write_header_fields(&st)?;
        self.sync()
    }

    /// Creates a new version 3 image at `path` and opens it for writing.
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Image> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let (header, layout) = plan_create(path, opts)?;
        let storage =
            FileStorage::create(path, LockMode::Exclusive).map_err(|e| open_error(&name, e))?;
        if let Err(e) = write_new_image(&storage, &name, &header, &layout) {
            // A half-written image is no image (a full disk, say): leave no file that
            // looks like one. The lock is still held, so the file is still ours.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        // Open through the same locked file: no window where another process could
        // take the image between creating and opening it.
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Image::from_parts(
            Arc::new(storage),
            name,
            Some(path.to_path_buf()),
            &OpenOptions::new().write(true),
            &[canon],
        )
    }

    /// Creates a new image in `storage` (which must be empty) and opens it for writing.
    pub fn create_in(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<Image> {
        let name = storage
            .path()
            .map_or_else(|| "<memory>".to_string(), |p| p.display().to_string());
        let (header, layout) = plan_create(Path::new(&name), opts)?;
        write_new_image(storage.as_ref(), &name, &header, &layout)?;
        Image::from_storage(storage, &OpenOptions::new().write(true))
    }

    // ---- small helpers ------------------------------------------------------------

    pub(crate) fn io_err(&self, op: &'static str, offset: u64, source: std::io::Error) -> Error {
        Error::Io {
            file: self.name.clone(),
            op,
            offset,
            source,
        }
    }

    pub(crate) fn corrupt(
        &self,
        structure: &'static str,
        offset: u64,
        why: impl Into<String>,
    ) -> Error {
        Error::Corrupt {
            file: self.name.clone(),
            structure,
            offset,
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

    fn gate_read(&self) -> std::sync::RwLockReadGuard<'_, ()> {
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
            .map_err(|e| self.io_err("fdatasync", 0, e))
    }

    pub(crate) fn root<'s>(&self, st: &'s State, root: RootId) -> Result<&'s Root> {
        st.roots.get(&root).ok_or_else(|| {
            Error::InvalidArgument(format!("{}: root {root} is not open", self.name))
        })
    }

    fn root_mut<'s>(&self, st: &'s mut State, root: RootId) -> Result<&'s mut Root> {
        st.roots.get_mut(&root).ok_or_else(|| {
            Error::InvalidArgument(format!("{}: root {root} is not open", self.name))
        })
    }

    fn check_range(&self, st: &State, root: RootId, offset: u64, len: u64) -> Result<()> {
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

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly {
                file: self.name.clone(),
                why: "image is open read-only".into(),
            })
        }
    }

    fn check_root_writable(&self, st: &State, root: RootId) -> Result<()> {
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
        let file_length = self.storage.len().map_err(|e| self.io_err("stat", 0, e))?;
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
                .snapshots
                .iter()
                .map(|s| SnapshotInfo {
                    id: s.id.clone(),
                    name: s.name.clone(),
                    date_sec: s.date_sec,
                    date_nsec: s.date_nsec,
                    vm_clock_nsec: s.vm_clock_nsec,
                    vm_state_size: s
                        .extra
                        .get(0..8)
                        .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
                        .unwrap_or(u64::from(s.vm_state_size)),
                    disk_size: s.disk_size(),
                })
                .collect(),
        })
    }

    // ---- mapping ------------------------------------------------------------------

    /// Makes sure the L2 table at `off` is in the cache.
    pub(crate) fn load_l2(&self, st: &mut State, off: u64) -> Result<()> {
        if st.cache.get(off).is_some() {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let file_len = self.storage.len().map_err(|e| self.io_err("stat", 0, e))?;
        if !off.is_multiple_of(cs) || off.saturating_add(cs) > file_len.next_multiple_of(cs) {
            return Err(self.corrupt(
                "L2 table",
                off,
                "table offset is unaligned or past the end of the file",
            ));
        }
        let mut raw = vec![0u8; cs as usize];
        self.storage
            .read_at(&mut raw, off)
            .map_err(|e| self.io_err("read L2 table", off, e))?;
        let words = decode_words(&raw);
        self.cache_insert(st, off, words, false)
    }

    /// Inserts a table, writing back a dirty table the cache evicts (after the data it
    /// links to is durable).
    fn cache_insert(&self, st: &mut State, off: u64, words: Vec<u64>, dirty: bool) -> Result<()> {
        if let Some(ev) = st.cache.insert(off, words, dirty) {
            let written = self.sync().and_then(|_| {
                self.storage
                    .write_at(&encode_words(&ev.words), ev.offset)
                    .map_err(|e| self.io_err("write L2 table", ev.offset, e))
            });
            if let Err(e) = written {
                // Keep the table (over capacity) rather than lose links to it.
                st.cache.restore(ev);
                return Err(e);
            }
        }
        Ok(())
    }

    fn l2_entry(&self, st: &mut State, l2_off: u64, idx: usize) -> Result<L2Entry> {
        self.load_l2(st, l2_off)?;
        let ext = self.geo.extended;
        let words = st
            .cache
            .get(l2_off)
            .ok_or_else(|| self.corrupt("L2 table", l2_off, "vanished from the cache"))?;
        Ok(if ext {
            L2Entry {
                word: words[idx * 2],
                bitmap: words[idx * 2 + 1],
            }
        } else {
            L2Entry {
                word: words[idx],
                bitmap: 0,
            }
        })
    }

    fn set_l2_entry(&self, st: &mut State, l2_off: u64, idx: usize, e: L2Entry) -> Result<()> {
        self.load_l2(st, l2_off)?;
        let ext = self.geo.extended;
        let words = st
            .cache
            .get_mut(l2_off)
            .ok_or_else(|| self.corrupt("L2 table", l2_off, "vanished from the cache"))?;
        if ext {
            words[idx * 2] = e.word;
            words[idx * 2 + 1] = e.bitmap;
        } else {
            words[idx] = e.word;
        }
        Ok(())
    }

    fn l1_entry(&self, st: &State, root: RootId, l1i: usize) -> Result<L1Entry> {
        let r = self.root(st, root)?;
        let e = L1Entry(r.l1.get(l1i).copied().unwrap_or(0));
        if e.is_malformed(&self.geo) {
            return Err(self.corrupt(
                "L1 table",
                r.l1_offset + l1i as u64 * 8,
                format!("malformed entry {:#x}", e.0),
            ));
        }
        Ok(e)
    }

    pub(crate) fn set_l1_entry(
        &self,
        st: &mut State,
        root: RootId,
        l1i: usize,
        e: L1Entry,
    ) -> Result<()> {
        let r = self.root_mut(st, root)?;
        let slot = r.l1.get_mut(l1i).ok_or_else(|| {
            Error::InvalidArgument(format!("L1 index {l1i} past the end of root {root}"))
        })?;
        *slot = e.0;
        r.dirty.insert(l1i / 64);
        st.l1_changes += 1;
        Ok(())
    }

    /// What the guest cluster containing `guest` maps to, and whether both links to it
    /// are writable.
    fn lookup(&self, st: &mut State, root: RootId, guest: u64) -> Result<(ClusterKind, bool)> {
        let (l1i, l2i) = self.geo.split(guest);
        let l1e = self.l1_entry(st, root, l1i)?;
        let Some(l2_off) = l1e.l2_offset() else {
            return Ok((ClusterKind::Unallocated, false));
        };
        let e = self.l2_entry(st, l2_off, l2i)?;
        let entry_off = l2_off + l2i as u64 * self.geo.l2_entry_bytes();
        let kind = e
            .kind(&self.geo)
            .map_err(|why| self.corrupt("L2 entry", entry_off, why))?;
        Ok((kind, l1e.writable() && e.writable()))
    }

    /// Splits `[offset, offset+len)` into pieces by source, merging neighbours.
    fn plan(&self, st: &mut State, root: RootId, offset: u64, len: u64) -> Result<Vec<Piece>> {
        let cs = self.geo.cluster_size();
        let mut out: Vec<Piece> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_off = pos % cs;
            let n = (cs - in_off).min(end - pos);
            let (kind, _) = self.lookup(st, root, pos)?;
            let mut g = pos;
            for_each_piece(&self.geo, kind, in_off, n, |plen, src| {
                push_piece(
                    &mut out,
                    Piece {
                        guest: g,
                        len: plen,
                        src,
                    },
                );
                g += plen;
            });
            pos += n;
        }
        Ok(out)
    }

    fn read_backing(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        match &self.backing {
            Some(b) => b.read_layer(buf, guest),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn read_compressed(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size();
        let file_len = self.storage.len().map_err(|e| self.io_err("stat", 0, e))?;
        if offset >= file_len {
            return Err(self.corrupt(
                "compressed cluster",
                offset,
                "compressed data starts past the end of the file",
            ));
        }
        let avail = len.min(file_len - offset).min(2 * cs);
        let mut input = vec![0u8; avail as usize];
        self.storage
            .read_at(&mut input, offset)
            .map_err(|e| self.io_err("read compressed cluster", offset, e))?;
        let mut out = vec![0u8; cs as usize];
        decompress_cluster(self.compression, &input, &mut out).map_err(|source| {
            Error::Compressed {
                file: self.name.clone(),
                offset,
                source,
            }
        })?;
        Ok(out)
    }

    fn read_pieces(&self, pieces: &[Piece], base: u64, buf: &mut [u8]) -> Result<()> {
        for p in pieces {
            let at = (p.guest - base) as usize;
            let dst = &mut buf[at..at + p.len as usize];
            match p.src {
                Source::Host(h) => self
                    .storage
                    .read_at(dst, h)
                    .map_err(|e| self.io_err("read data", h, e))?,
                Source::Zero => dst.fill(0),
                Source::Backing => self.read_backing(dst, p.guest)?,
                Source::Compressed { offset, len, at } => {
                    let cluster = self.read_compressed(offset, len)?;
                    dst.copy_from_slice(&cluster[at as usize..at as usize + dst.len()]);
                }
            }
        }
        Ok(())
    }

    /// Reads the whole current content of the guest cluster at `cg` (cluster-aligned).
    fn read_cluster(&self, kind: ClusterKind, cg: u64, buf: &mut [u8]) -> Result<()> {
        let mut pieces = Vec::new();
        let mut g = cg;
        for_each_piece(&self.geo, kind, 0, self.geo.cluster_size(), |plen, src| {
            pieces.push(Piece {
                guest: g,
                len: plen,
                src,
            });
            g += plen;
        });
        self.read_pieces(&pieces, cg, buf)
    }

    // ---- the I/O API --------------------------------------------------------------

    /// Reads `buf.len()` bytes of the disk at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_root(DEFAULT_ROOT, buf, offset)
    }

    pub(crate) fn read_root(&self, root: RootId, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        let (pieces, _gate) = {
            let mut st = self.lock_state()?;
            self.check_range(&st, root, offset, len)?;
            let pieces = self.plan(&mut st, root, offset, len)?;
            (pieces, self.gate_read())
        };
        self.read_pieces(&pieces, offset, buf)
    }

    /// Reads `len` bytes of the disk at `offset` without copying them: `f` gets them,
    /// in order, as slices of the image file's mapping (and of a zero buffer where
    /// clusters read as zeros), while no cluster they come from can be freed, reused
    /// or cut off the file.
    ///
    /// Returns `Ok(None)` without calling `f` when the bytes cannot be lent cheaply:
    /// the storage cannot map its file, a cluster is compressed or comes from a
    /// backing file, or a page is not in the page cache (`f` would wait for the disk
    /// while holding up the image). [`Image::read_at`] reads those.
    ///
    /// `f` runs under the image's I/O gate, which cluster frees wait for: it must not
    /// call into this image, and must not wait long — a socket send has to be bounded
    /// by a deadline, not left to a peer that may never read.
    pub fn read_mapped<R>(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&[IoSlice<'_>]) -> R,
    ) -> Result<Option<R>> {
        self.read_root_mapped(DEFAULT_ROOT, offset, len, f)
    }

    pub(crate) fn read_root_mapped<R>(
        &self,
        root: RootId,
        offset: u64,
        len: u64,
        f: impl FnOnce(&[IoSlice<'_>]) -> R,
    ) -> Result<Option<R>> {
        let (pieces, _gate) = {
            let mut st = self.lock_state()?;
            self.check_range(&st, root, offset, len)?;
            let pieces = self.plan(&mut st, root, offset, len)?;
            (pieces, self.gate_read())
        };
        let mut end = 0u64;
        for p in &pieces {
            match p.src {
                Source::Host(h) => match h.checked_add(p.len) {
                    Some(e) => end = end.max(e),
                    None => return Ok(None),
                },
                Source::Zero => {}
                Source::Backing if self.backing.is_none() => {}
                Source::Backing | Source::Compressed { .. } => return Ok(None),
            }
        }
        let map = match end {
            0 => None,
            _ => match self.storage.mapping(end) {
                Some(m) => Some(m),
                None => return Ok(None),
            },
        };
        let mut slices = Vec::with_capacity(pieces.len());
        for p in &pieces {
            match (p.src, &map) {
                (Source::Host(h), Some(m)) => {
                    // Below `end`, which the mapping and the file both cover.
                    let (h, l) = (h as usize, p.len as usize);
                    if !storage::resident(m, h, l) {
                        return Ok(None);
                    }
                    slices.push(IoSlice::new(&m[h..h + l]));
                }
                _ => {
                    let mut left = p.len as usize;
                    while left > 0 {
                        let n = left.min(ZEROS.len());
                        slices.push(IoSlice::new(&ZEROS[..n]));
                        left -= n;
                    }
                }
            }
        }
        Ok(Some(f(&slices)))
    }

    /// Writes `buf` to the disk at `offset`.
    ///
    /// Writes to clusters owned by the active layer through writable links go in place;
    /// anything else (unallocated, zero, compressed, or under a read-only link) copies
    /// the path first: a new L2 table if the L1 link is read-only, a new data cluster
    /// filled with the old content around the written range.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_root(DEFAULT_ROOT, buf, offset)
    }

    pub(crate) fn write_root(&self, root: RootId, buf: &[u8], offset: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let len = buf.len() as u64;
        {
            let st = self.lock_state()?;
            self.check_root_writable(&st, root)?;
            self.check_range(&st, root, offset, len)?;
        }
        let mut pos = 0u64;
        while pos < len {
            let guest = offset + pos;
            let in_off = guest % cs;
            let n = (cs - in_off).min(len - pos);
            let chunk = &buf[pos as usize..(pos + n) as usize];
            let mut st = self.lock_state()?;
            let (kind, writable) = self.lookup(&mut st, root, guest)?;
            if let Some(host) = in_place_target(&self.geo, kind, writable, in_off, n) {
                // The clusters after this one that are written in place too, at the
                // next host offsets, go in the same write.
                let at = host + in_off;
                let mut run = n;
                while pos + run < len {
                    let m = cs.min(len - pos - run);
                    let (kind, writable) = self.lookup(&mut st, root, guest + run)?;
                    match in_place_target(&self.geo, kind, writable, 0, m) {
                        Some(h) if Some(h) == at.checked_add(run) => run += m,
                        _ => break,
                    }
                }
                let _gate = self.gate_read();
                drop(st);
                self.storage
                    .write_at(&buf[pos as usize..(pos + run) as usize], at)
                    .map_err(|e| self.io_err("write data", at, e))?;
                pos += run;
                continue;
            }
            self.mark_stale(&mut st)?;
            if in_off == 0 && n == cs {
                pos += self.write_whole_clusters(&mut st, root, guest, &buf[pos as usize..])?;
                continue;
            }
            self.write_partial_cluster(&mut st, root, guest - in_off, in_off, chunk)?;
            pos += n;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeros. With `may_unmap`, clusters the
    /// active layer owns are released; without it they stay allocated.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.zero_range(
            DEFAULT_ROOT,
            offset,
            len,
            ZeroMode::Zero { unmap: may_unmap },
        )
    }

    /// Discards `[offset, offset+len)`: whole clusters in the range are released and
    /// read as zeros afterwards; partial clusters at the edges are left alone.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(DEFAULT_ROOT, offset, len, ZeroMode::Discard)
    }

    pub(crate) fn zero_range(
        &self,
        root: RootId,
        offset: u64,
        len: u64,
        mode: ZeroMode,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let (size, v3) = {
            let st = self.lock_state()?;
            self.check_root_writable(&st, root)?;
            self.check_range(&st, root, offset, len)?;
            (self.root(&st, root)?.size, st.header.version >= 3)
        };
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let in_off = pos % cs;
            let n = (cs - in_off).min(end - pos);
            // The last cluster of a disk whose size is not a cluster multiple counts as
            // whole when the range reaches the end of the disk.
            let whole = in_off == 0 && (n == cs || pos + n == size);
            let mut st = self.lock_state()?;
            match (&mode, whole && v3) {
                (_, true) => self.zero_cluster(&mut st, root, pos, &mode)?,
                (ZeroMode::Discard, false) if !v3 && whole => {
                    // Version 2 has no zero flag: a discard must write zeros so the
                    // backing file does not show through.
                    drop(st);
                    self.write_root(root, &vec![0u8; n as usize], pos)?;
                }
                (ZeroMode::Discard, false) => {}
                (ZeroMode::Zero { .. }, false) => {
                    let (kind, _) = self.lookup(&mut st, root, pos)?;
                    if !reads_zero(kind, self.backing.is_some()) {
                        drop(st);
                        self.write_root(root, &vec![0u8; n as usize], pos)?;
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Makes sure the L1 entry `l1i` links to an L2 table this root owns, copying a
    /// shared table (every entry of the copy read-only) or allocating a new one.
    fn writable_l2(&self, st: &mut State, root: RootId, l1i: usize) -> Result<u64> {
        let e = self.l1_entry(st, root, l1i)?;
        match e.l2_offset() {
            Some(off) if e.writable() => {
                self.load_l2(st, off)?;
                Ok(off)
            }
            Some(off) => {
                self.load_l2(st, off)?;
                let mut words = st
                    .cache
                    .get(off)
                    .ok_or_else(|| self.corrupt("L2 table", off, "vanished from the cache"))?
                    .to_vec();
                let step = if self.geo.extended { 2 } else { 1 };
                for w in words.iter_mut().step_by(step) {
                    *w &= !WRITABLE;
                }
                let new = st.alloc.cluster();
                self.cache_insert(st, new, words, true)?;
                self.set_l1_entry(st, root, l1i, L1Entry::new(new, true))?;
                Ok(new)
            }
            None => {
                let new = st.alloc.cluster();
                let words = vec![0u64; (self.geo.cluster_size() / 8) as usize];
                self.cache_insert(st, new, words, true)?;
                self.set_l1_entry(st, root, l1i, L1Entry::new(new, true))?;
                Ok(new)
            }
        }
    }

    /// Links guest cluster `guest` of the default VDI to compressed data that `place`
    /// writes (it returns the host byte offset and length). The cluster must read as
    /// unallocated (or zero with no host cluster): compressed output fills clusters, it
    /// does not replace data. The L2 table is made writable through the same path every
    /// write takes ([`Image::writable_l2`]), so a shared table is copied and a dirty
    /// table evicted on the way is kept if its write-back fails.
    pub(crate) fn link_compressed(
        &self,
        st: &mut State,
        guest: u64,
        place: impl FnOnce(&mut State) -> Result<(u64, u64)>,
    ) -> Result<()> {
        let (l1i, l2i) = self.geo.split(guest);
        let l2_off = self.writable_l2(st, DEFAULT_ROOT, l1i)?;
        let current = self.l2_entry(st, l2_off, l2i)?;
        match current.kind(&self.geo) {
            Ok(ClusterKind::Unallocated) | Ok(ClusterKind::Zero { host: None }) => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{}: guest cluster at {guest} is already allocated; compressed writes \
                     fill unallocated clusters only",
                    self.name
                )))
            }
        }
        let (at, len) = place(st)?;
        self.set_l2_entry(st, l2_off, l2i, L2Entry::compressed(at, len, &self.geo))
    }

    /// Where a write through the slow path puts guest cluster `cg` of `root`: makes
    /// the L2 table writable (copying or creating it) and picks the host cluster — the
    /// one the root owns there, or a new one. Nothing links to a new one until the
    /// caller has written it and set the entry.
    fn slow_target(&self, st: &mut State, root: RootId, cg: u64) -> Result<SlowTarget> {
        let (l1i, l2i) = self.geo.split(cg);
        let l2_off = self.writable_l2(st, root, l1i)?;
        let entry = self.l2_entry(st, l2_off, l2i)?;
        let entry_off = l2_off + l2i as u64 * self.geo.l2_entry_bytes();
        let kind = entry
            .kind(&self.geo)
            .map_err(|why| self.corrupt("L2 entry", entry_off, why))?;
        let in_place = match kind {
            ClusterKind::Data { host }
            | ClusterKind::Zero { host: Some(host) }
            | ClusterKind::Subclusters { host, .. }
                if entry.writable() && host != 0 =>
            {
                Some(host)
            }
            _ => None,
        };
        Ok(SlowTarget {
            l2_off,
            l2i,
            kind,
            host: in_place.unwrap_or_else(|| st.alloc.cluster()),
            in_place: in_place.is_some(),
        })
    }

    /// Writes the whole clusters at the start of `data` (from the cluster-aligned
    /// `guest`) that the slow path takes, up to [`MAX_SLOW_RUN`] bytes and until a
    /// cluster written in place: each gets its target, clusters whose hosts follow
    /// each other go in one storage write, and only then are the L2 entries set.
    /// Returns the bytes written: at least the first cluster.
    fn write_whole_clusters(
        &self,
        st: &mut State,
        root: RootId,
        guest: u64,
        data: &[u8],
    ) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let limit = (data.len() as u64).min(MAX_SLOW_RUN.max(cs)) / cs * cs;
        let mut targets: Vec<SlowTarget> = Vec::new();
        let mut done = 0u64;
        while done < limit {
            if done > 0 {
                let (kind, writable) = self.lookup(st, root, guest + done)?;
                if in_place_target(&self.geo, kind, writable, 0, cs).is_some() {
                    break;
                }
            }
            targets.push(self.slow_target(st, root, guest + done)?);
            done += cs;
        }
        let mut i = 0;
        while i < targets.len() {
            let mut j = i + 1;
            while j < targets.len() && Some(targets[j].host) == targets[j - 1].host.checked_add(cs)
            {
                j += 1;
            }
            let at = targets[i].host;
            let bytes = &data[i * cs as usize..j * cs as usize];
            self.storage
                .write_at(bytes, at)
                .map_err(|e| self.io_err("write data", at, e))?;
            i = j;
        }
        for t in targets {
            self.set_l2_entry(st, t.l2_off, t.l2i, L2Entry::data(t.host, &self.geo))?;
        }
        Ok(done)
    }

    /// Writes `data`, less than a whole cluster, at `in_off` of the guest cluster `cg`
    /// through the slow path: the cluster's old content around it goes with it.
    /// (Whole clusters go through `write_whole_clusters`.)
    fn write_partial_cluster(
        &self,
        st: &mut State,
        root: RootId,
        cg: u64,
        in_off: u64,
        data: &[u8],
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let SlowTarget {
            l2_off,
            l2i,
            kind,
            host,
            in_place,
        } = self.slow_target(st, root, cg)?;
        let mut content = vec![0u8; cs as usize];
        self.read_cluster(kind, cg, &mut content)?;
        let (start, end) = (in_off as usize, in_off as usize + data.len());
        content[start..end].copy_from_slice(data);
        // Subclusters already allocated in this cluster may have in-place writes in
        // flight (looked up before this call): rewrite only the written range and
        // the subclusters being allocated, never other bytes of allocated ones.
        let alloc = match (in_place, kind) {
            (true, ClusterKind::Subclusters { alloc, .. }) => alloc,
            _ => 0,
        };
        let sub = self.geo.subcluster_size() as usize;
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for i in 0..crate::format::tables::SUBCLUSTERS as usize {
            let (lo, hi) = if alloc & (1 << i) == 0 {
                (i * sub, (i + 1) * sub)
            } else {
                ((i * sub).max(start), ((i + 1) * sub).min(end))
            };
            match runs.last_mut() {
                _ if lo >= hi => {}
                Some(r) if r.1 == lo => r.1 = hi,
                _ => runs.push((lo, hi)),
            }
        }
        for (lo, hi) in runs {
            let at = host + lo as u64;
            self.storage
                .write_at(&content[lo..hi], at)
                .map_err(|e| self.io_err("write data", at, e))?;
        }
        self.set_l2_entry(st, l2_off, l2i, L2Entry::data(host, &self.geo))
    }

    /// Makes one whole guest cluster read as zeros (or discards it).
    fn zero_cluster(&self, st: &mut State, root: RootId, cg: u64, mode: &ZeroMode) -> Result<()> {
        let has_backing = self.backing.is_some();
        let (kind, _) = self.lookup(st, root, cg)?;
        let target_unallocated = matches!(mode, ZeroMode::Discard) && !has_backing;
        match kind {
            ClusterKind::Unallocated if !has_backing => return Ok(()),
            ClusterKind::Zero { host: None } if !target_unallocated => return Ok(()),
            _ => {}
        }
        self.mark_stale(st)?;
        let (l1i, l2i) = self.geo.split(cg);
        let l2_off = self.writable_l2(st, root, l1i)?;
        let entry = self.l2_entry(st, l2_off, l2i)?;
        let owned_host = if entry.writable() {
            match kind {
                ClusterKind::Data { host }
                | ClusterKind::Zero { host: Some(host) }
                | ClusterKind::Subclusters { host, .. }
                    if host != 0 =>
                {
                    Some(host)
                }
                _ => None,
            }
        } else {
            None
        };
        let new = match mode {
            ZeroMode::Zero { unmap: false } if owned_host.is_some() => {
                let host = owned_host.unwrap_or(0);
                if self.geo.extended {
                    L2Entry {
                        word: host | WRITABLE,
                        bitmap: 0xffff_ffff_0000_0000,
                    }
                } else {
                    L2Entry {
                        word: host | WRITABLE | ZERO,
                        bitmap: 0,
                    }
                }
            }
            _ => {
                if let Some(h) = owned_host {
                    st.alloc.free(h);
                }
                if target_unallocated {
                    L2Entry::UNALLOCATED
                } else {
                    L2Entry::zero(&self.geo)
                }
            }
        };
        self.set_l2_entry(st, l2_off, l2i, new)
    }

    /// Sets the header's dirty bit durably before the first change that makes the
    /// refcounts stale.
    pub(crate) fn mark_stale(&self, st: &mut State) -> Result<()> {
        if st.stale {
            return Ok(());
        }
        st.header.incompatible |= Incompatible::DIRTY;
        self.write_header_fields(st)?;
        self.sync()?;
        st.stale = true;
        Ok(())
    }

    /// Writes the fixed header fields (one sector).
    pub(crate) fn write_header_fields(&self, st: &State) -> Result<()> {
        let bytes = st.header.commit_bytes();
        self.storage
            .write_at(&bytes, 0)
            .map_err(|e| self.io_err("write header", 0, e))
    }

    /// Makes every completed write durable, then writes metadata links in dependency
    /// order: data and new tables first, then the L2 tables that link to data, then the
    /// L1 entries that link to tables, with an fdatasync between each level.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut st = self.lock_state()?;
        self.flush_locked(&mut st)
    }

    pub(crate) fn flush_locked(&self, st: &mut State) -> Result<()> {
        self.flush_metadata(st)?;
        // Clusters unlinked before this flush can be reused once punched durably; the
        // gate makes sure no read in flight still uses their old mapping.
        if st.alloc.pending_len() > 0 {
            let _gate = self.io_gate_write();
            self.promote_pending(st)?;
        }
        Ok(())
    }

    /// Punches the clusters freed since the last flush, durably, and makes them
    /// reusable. The caller holds the I/O gate and has flushed the metadata.
    pub(crate) fn promote_pending(&self, st: &mut State) -> Result<()> {
        let pending = st.alloc.take_pending();
        if pending.is_empty() {
            return Ok(());
        }
        for (start, len) in runs(&pending, self.geo.cluster_size()) {
            self.storage
                .punch_hole(start, len)
                .map_err(|e| self.io_err("punch hole", start, e))?;
        }
        self.sync()?;
        st.alloc.make_ready(pending);
        Ok(())
    }

    /// The metadata part of a flush: data, then L2 tables, then L1 tables, with an
    /// fdatasync between the levels. Callers that already hold the I/O gate use this
    /// (then [`Image::promote_pending`]) instead of [`Image::flush_locked`].
    pub(crate) fn flush_metadata(&self, st: &mut State) -> Result<()> {
        self.sync()?;
        if st.cache.has_dirty() {
            let dirty = st.cache.take_dirty();
            let mut result = Ok(());
            for (off, words) in &dirty {
                if let Err(e) = self.storage.write_at(&encode_words(words), *off) {
                    result = Err(self.io_err("write L2 table", *off, e));
                    break;
                }
            }
            if let Err(e) = result.and_then(|_| self.sync()) {
                // Not known durable: write them again (and sync) before any L1 link
                // to them is written.
                for (o, _) in &dirty {
                    st.cache.mark_dirty(*o);
                }
                return Err(e);
            }
        }
        let mut wrote_l1 = false;
        for r in st.roots.values_mut() {
            while let Some(s) = r.dirty.pop_first() {
                let start = s * 64;
                let end = (start + 64).min(r.l1.len());
                let off = r.l1_offset + start as u64 * 8;
                if let Err(e) = self.storage.write_at(&encode_words(&r.l1[start..end]), off) {
                    r.dirty.insert(s);
                    return Err(self.io_err("write L1 table", off, e));
                }
                wrote_l1 = true;
            }
        }
        if wrote_l1 {
            self.sync()?;
        }
        Ok(())
    }

    /// Allocation status of `[offset, offset+len)`.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.block_status_root(DEFAULT_ROOT, offset, len)
    }

    pub(crate) fn block_status_root(
        &self,
        root: RootId,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>> {
        let pieces = {
            let mut st = self.lock_state()?;
            self.check_range(&st, root, offset, len)?;
            self.plan(&mut st, root, offset, len)?
        };
        let mut out: Vec<Extent> = Vec::new();
        for p in pieces {
            match p.src {
                Source::Host(h) => {
                    push_extent(&mut out, p.guest, p.len, ExtentStatus::Data, 0, Some(h))
                }
                Source::Compressed { .. } => {
                    push_extent(&mut out, p.guest, p.len, ExtentStatus::Data, 0, None)
                }
                Source::Zero => push_extent(&mut out, p.guest, p.len, ExtentStatus::Zero, 0, None),
                Source::Backing => match &self.backing {
                    None => {
                        push_extent(&mut out, p.guest, p.len, ExtentStatus::Unallocated, 0, None)
                    }
                    Some(b) => {
                        for e in b.layer_status(p.guest, p.len)? {
                            push_extent(
                                &mut out,
                                e.offset,
                                e.length,
                                e.status,
                                e.depth + 1,
                                e.host_offset,
                            );
                        }
                    }
                },
            }
        }
        Ok(out)
    }

    /// Grows the virtual disk to `new_size` bytes (rounded up to 512), growing the L1
    /// table when needed. Shrinking is refused.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let new_size = new_size.next_multiple_of(512);
        let _structure = self.lock_structure();
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
        if needed > u64::from(st.header.l1_size) {
            self.flush_locked(&mut st)?;
            self.mark_stale(&mut st)?;
            let clusters = self.geo.clusters_for(needed * 8);
            let at = st.alloc.contiguous(clusters);
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
            st.header.l1_size = needed as u32;
            st.header.l1_table_offset = at;
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

    /// Flushes, writes exact refcounts if they are stale and clears the dirty bit.
    /// Further calls on this image return [`Error::Closed`].
    pub fn close(&self) -> Result<()> {
        let _structure = self.lock_structure();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.closed {
            return Ok(());
        }
        let r = if self.writable {
            self.flush_locked(&mut st).and_then(|_| {
                if st.stale {
                    refcount::rebuild(self, &mut st).map(|_| ())
                } else {
                    Ok(())
                }
            })
        } else {
            Ok(())
        };
        st.closed = true;
        // Release the image lock now, not when the last handle is dropped.
        let released = self
            .storage
            .release()
            .map_err(|e| self.io_err("unlock", 0, e));
        r.and(released)
    }

    /// Checks the image's metadata and refcounts (as `qemu-img check` does).
    pub fn check(&self) -> Result<refcount::CheckReport> {
        let _structure = self.lock_structure();
        let mut st = self.lock_state()?;
        if self.writable {
            self.flush_locked(&mut st)?;
        }
        refcount::check(self, &mut st)
    }

    /// Rebuilds the refcounts from a reachability scan and clears the dirty bit, then
    /// checks again. Needs a writable image.
    pub fn repair(&self) -> Result<refcount::CheckReport> {
        self.check_writable()?;
        let _structure = self.lock_structure();
        let mut st = self.lock_state()?;
        self.flush_locked(&mut st)?;
        // Repair rewrites links and refcounts: protect them with the dirty bit first.
        self.mark_stale(&mut st)?;
        self.repair_registry(&mut st)?;
        refcount::rebuild(self, &mut st)?;
        let mut report = refcount::check(self, &mut st)?;
        report.repaired = true;
        Ok(report)
    }
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

    fn chain_len(&self) -> u32 {
        1 + self.backing.as_ref().map_or(0, |b| b.chain_len())
    }

    fn name(&self) -> &str {
        &self.name
    }
}

fn push_piece(out: &mut Vec<Piece>, p: Piece) {
    if let Some(last) = out.last_mut() {
        let merge = match (last.src, p.src) {
            (Source::Host(a), Source::Host(b)) => a + last.len == b,
            (Source::Zero, Source::Zero) | (Source::Backing, Source::Backing) => true,
            _ => false,
        };
        if merge && last.guest + last.len == p.guest {
            last.len += p.len;
            return;
        }
    }
    out.push(p);
}

fn push_extent(
    out: &mut Vec<Extent>,
    offset: u64,
    length: u64,
    status: ExtentStatus,
    depth: u32,
    host_offset: Option<u64>,
) {
    if let Some(last) = out.last_mut() {
        let host_ok = match (last.host_offset, host_offset) {
            (Some(a), Some(b)) => a + last.length == b,
            (None, None) => true,
            _ => false,
        };
        if last.status == status
            && last.depth == depth
            && host_ok
            && last.offset + last.length == offset
        {
            last.length += length;
            return;
        }
    }
    out.push(Extent {
        offset,
        length,
        status,
        depth,
        host_offset,
    });
}

/// Where a write of `[in_off, in_off+n)` can go in place, if it can.
/// The most bytes of whole clusters one write through the slow path allocates and
/// writes at once, under the state lock (other requests to the image wait for it).
const MAX_SLOW_RUN: u64 = 4 << 20;

/// Where the slow path writes one guest cluster (see `Image::slow_target`).
struct SlowTarget {
    l2_off: u64,
    l2i: usize,
    kind: ClusterKind,
    host: u64,
    /// `host` is the cluster the root owns there, not a new one.
    in_place: bool,
}

fn in_place_target(
    geo: &Geometry,
    kind: ClusterKind,
    writable: bool,
    in_off: u64,
    n: u64,
) -> Option<u64> {
    if !writable {
        return None;
    }
    match kind {
        ClusterKind::Data { host } => Some(host),
        ClusterKind::Subclusters { host, alloc, .. } if host != 0 => {
            let sub = geo.subcluster_size();
            let first = in_off / sub;
            let last = (in_off + n - 1) / sub;
            (first..=last)
                .all(|i| alloc & (1 << i) != 0)
                .then_some(host)
        }
        _ => None,
    }
}

fn reads_zero(kind: ClusterKind, has_backing: bool) -> bool {
    match kind {
        ClusterKind::Zero { .. } => true,
        ClusterKind::Unallocated => !has_backing,
        _ => false,
    }
}

pub(crate) fn open_error(name: &str, e: crate::storage::OpenError) -> Error {
    match e.lock_error() {
        Some(_) => match e {
            crate::storage::OpenError::Lock { source, .. } => Error::Locked {
                file: name.to_string(),
                source,
            },
            other => Error::InvalidArgument(other.to_string()),
        },
        None => Error::Io {
            file: name.to_string(),
            op: "open",
            offset: 0,
            source: e.into(),
        },
    }
}

/// Where a new image's structures go.
#[derive(Debug)]
struct CreateLayout {
    reftable: u64,
    reftable_clusters: u64,
    refblocks: u64,
    refblock_count: u64,
    l1: u64,
    l1_clusters: u64,
}

/// The feature name table qcowx writes.
pub(crate) fn feature_name_table() -> Extension {
    Extension::feature_names(&[
        (FeatureKind::Incompatible, 0, "dirty bit"),
        (FeatureKind::Incompatible, 1, "corrupt bit"),
        (FeatureKind::Incompatible, 2, "external data file"),
        (FeatureKind::Incompatible, 3, "compression type"),
        (FeatureKind::Incompatible, 4, "extended L2 entries"),
        (FeatureKind::Compatible, 0, "lazy refcounts"),
        (FeatureKind::Autoclear, 0, "bitmaps"),
        (FeatureKind::Autoclear, 1, "raw external data"),
    ])
}

fn plan_create(path: &Path, opts: &CreateOptions) -> Result<(Header, CreateLayout)> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(1u64 << MIN_CLUSTER_BITS..=1u64 << MAX_CLUSTER_BITS).contains(&cs)
    {
        return Err(Error::InvalidArgument(format!(
            "cluster size {cs} must be a power of two between 512 and 2097152"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    if opts.extended_l2 && cs < 16384 {
        return Err(Error::InvalidArgument(
            "extended L2 entries need a cluster size of at least 16 KiB".into(),
        ));
    }
    if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
        return Err(Error::InvalidArgument(format!(
            "refcount width {} must be a power of two from 1 to 64",
            opts.refcount_bits
        )));
    }
    let size = opts.size.next_multiple_of(512);
    if size > MAX_VIRTUAL_SIZE {
        return Err(Error::InvalidArgument(format!(
            "size {size} is larger than the maximum {MAX_VIRTUAL_SIZE}"
        )));
    }
    let geo = Geometry {
        cluster_bits,
        extended: opts.extended_l2,
    };
    let l1_entries = geo.l1_entries_for(size);
    if l1_entries * 8 > crate::format::header::MAX_L1_BYTES {
        return Err(Error::InvalidArgument(format!(
            "size {size} needs an L1 table larger than 32 MiB with {cs}-byte clusters; \
             use larger clusters"
        )));
    }
    let l1_clusters = geo.clusters_for(l1_entries * 8).max(1);
    let per_block = cs * 8 / u64::from(opts.refcount_bits);
    let (mut blocks, mut table) = (1u64, 1u64);
    loop {
        let total = 1 + table + blocks + l1_clusters;
        let need_blocks = total.div_ceil(per_block);
        let need_table = geo.clusters_for(need_blocks * 8);
        if need_blocks == blocks && need_table == table {
            break;
        }
        blocks = need_blocks;
        table = need_table;
    }
    let layout = CreateLayout {
        reftable: cs,
        reftable_clusters: table,
        refblocks: cs * (1 + table),
        refblock_count: blocks,
        l1: cs * (1 + table + blocks),
        l1_clusters,
    };

    // QEMU's order: backing format first, then the feature name table (`set` puts a
    // new extension at the front).
    let mut extensions = Extensions::default();
    extensions.set(feature_name_table());
    let mut incompatible = Incompatible::empty();
    if opts.extended_l2 {
        incompatible |= Incompatible::EXTENDED_L2;
    }
    if opts.compression == CompressionType::Zstd {
        incompatible |= Incompatible::COMPRESSION_TYPE;
    }
    let backing_file = opts.backing_file.clone();
    if let Some(b) = &backing_file {
        if b.is_empty() || b.len() > crate::format::header::MAX_BACKING_NAME as usize {
            return Err(Error::InvalidArgument(
                "backing file name must be 1 to 1023 bytes".into(),
            ));
        }
        let fmt = match &opts.backing_format {
            Some(f) => f.clone(),
            None => {
                let resolved = backing::resolve(Some(path), b);
                backing::probe_format(&resolved)
                    .map_err(|e| Error::Backing {
                        file: path.display().to_string(),
                        why: format!("cannot open '{}': {e}", resolved.display()),
                        source: None,
                    })?
                    .to_string()
            }
        };
        if fmt != "qcow2" && fmt != "raw" {
            return Err(Error::InvalidArgument(format!(
                "backing format '{fmt}' is not supported (qcow2 and raw are)"
            )));
        }
        extensions.set(Extension {
            kind: EXT_BACKING_FORMAT,
            data: fmt.into_bytes(),
        });
    }
    let mut header = Header {
        backing_file_offset: 0,
        backing_file_size: 0,
        unknown_fields: Vec::new(),
        version: 3,
        cluster_bits,
        size,
        l1_size: l1_entries as u32,
        l1_table_offset: layout.l1,
        refcount_table_offset: layout.reftable,
        refcount_table_clusters: layout.reftable_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible,
        compatible: 0,
        autoclear: 0,
        refcount_order: opts.refcount_bits.trailing_zeros(),
        header_length: V3_HEADER_LEN,
        compression_type: match opts.compression {
            CompressionType::Deflate => 0,
            CompressionType::Zstd => 1,
        },
        extensions,
        backing_file,
    };
    header.layout_backing();
    if header.to_cluster().is_none() {
        // Small clusters (512 B) cannot hold the feature name table beside a long
        // backing name: it is optional, so leave it out.
        header
            .extensions
            .remove(crate::format::extensions::EXT_FEATURE_NAMES);
        header.layout_backing();
    }
    if header.to_cluster().is_none() {
        return Err(Error::InvalidArgument(
            "header, extensions and backing file name do not fit in one cluster".into(),
        ));
    }
    Ok((header, layout))
}

fn write_new_image(
    storage: &dyn Storage,
    name: &str,
    header: &Header,
    layout: &CreateLayout,
) -> Result<()> {
    let io = |op, offset, source| Error::Io {
        file: name.to_string(),
        op,
        offset,
        source,
    };
    let cs = header.cluster_size();
    let used = 1 + layout.reftable_clusters + layout.refblock_count + layout.l1_clusters;
    let end = used * cs;
    storage.set_len(0).map_err(|e| io("truncate", 0, e))?;
    // Refcount table.
    let mut table = vec![0u64; (layout.reftable_clusters * cs / 8) as usize];
    for i in 0..layout.refblock_count {
        table[i as usize] = layout.refblocks + i * cs;
    }
    storage
        .write_at(&encode_words(&table), layout.reftable)
        .map_err(|e| io("write refcount table", layout.reftable, e))?;
    // Refcount blocks: every cluster up to `end` has refcount 1.
    let bits = 1u64 << header.refcount_order;
    let per_block = cs * 8 / bits;
    for b in 0..layout.refblock_count {
        let mut block = vec![0u8; cs as usize];
        for i in 0..per_block {
            let cluster = b * per_block + i;
            if cluster >= used {
                break;
            }
            refcount::set_entry(&mut block, header.refcount_order, i as usize, 1);
        }
        let off = layout.refblocks + b * cs;
        storage
            .write_at(&block, off)
            .map_err(|e| io("write refcount block", off, e))?;
    }
    // Empty L1 table.
    let l1 = vec![0u8; (layout.l1_clusters * cs) as usize];
    storage
        .write_at(&l1, layout.l1)
        .map_err(|e| io("write L1 table", layout.l1, e))?;
    storage.set_len(end).map_err(|e| io("truncate", end, e))?;
    storage.sync_data().map_err(|e| io("fdatasync", 0, e))?;
    let first = header
        .to_cluster()
        .ok_or_else(|| Error::InvalidArgument("header does not fit in one cluster".into()))?;
    storage
        .write_at(&first, 0)
        .map_err(|e| io("write header", 0, e))?;
    storage.sync_data().map_err(|e| io("fdatasync", 0, e))
}
