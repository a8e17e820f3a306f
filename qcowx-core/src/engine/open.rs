//! Opening an image ([`OpenOptions`]): the header, the active L1 table, the snapshot table and the backing chain.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::engine::alloc::Allocator;
use crate::engine::backing::{self, Layer};
use crate::engine::cache::{L2Cache, DEFAULT_CACHE_BYTES};
use crate::error::{Error, Result};
use crate::format::compress::CompressionType;
use crate::format::header::{Autoclear, Header, Incompatible, HEADER_PROBE_LEN};
use crate::format::registry::Registry;
use crate::format::snapshot::{self};
use crate::format::tables::{decode_words, Geometry};
use crate::storage::lock::LockMode;
use crate::storage::{FileStorage, OpenMode, Storage};

use super::image::*;

/// How to open an image. Read-only with a shared lock unless told otherwise.
///
/// ```
/// use qcowx_core::{CreateOptions, Error, Image, LockMode, OpenOptions};
///
/// # fn main() -> Result<(), Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("a.qcow2");
/// Image::create(&path, &CreateOptions::new(1 << 20))?.close()?;
///
/// let reader = OpenOptions::new();
/// assert_eq!(reader.lock_mode(), LockMode::Shared);
/// let writer = OpenOptions::new()
///     .write(true)
///     .cache_bytes(4 << 20)
///     .open_backing(true);
/// assert_eq!(writer.lock_mode(), LockMode::Exclusive);
///
/// let img = writer.open(&path)?;
/// assert!(img.is_writable());
/// // While it is open for writing, a reader is refused unless it forces sharing.
/// assert!(matches!(reader.open(&path), Err(Error::Locked { .. })));
/// let peek = reader.clone().lock(LockMode::ForceShare).open(&path)?;
/// assert_eq!(peek.size(), 1 << 20);
/// drop(peek);
/// img.close()?;
///
/// // A repair open implies writing.
/// assert!(OpenOptions::new().repair(true).open(&path)?.is_writable());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct OpenOptions {
    write: bool,
    lock: Option<LockMode>,
    cache_bytes: usize,
    open_backing: bool,
    repair: bool,
    upgrade: bool,
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
            repair: false,
            upgrade: false,
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
    /// Open for writing in order to repair the image ([`Image::repair`]): an image
    /// marked corrupt, or one whose metadata is damaged, opens; nothing is checked or
    /// changed until the repair runs. Implies [`OpenOptions::write`].
    pub fn repair(mut self, repair: bool) -> Self {
        self.repair = repair;
        if repair {
            self.write = true;
        }
        self
    }
    /// Upgrade a version 2 (compat 0.10) image to version 3 (compat 1.1) as it opens,
    /// as `qemu-img amend -o compat=1.1` does: the header is rewritten as version 3
    /// before anything else is written, and snapshot table entries shorter than
    /// version 3 requires are completed once the open has settled (with
    /// [`OpenOptions::repair`], by the repair). Version 2 images open for writing only
    /// this way; a version 3 image opens as usual. Implies [`OpenOptions::write`].
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image, OpenOptions};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("a.qcow2");
    /// Image::create(&path, &CreateOptions::new(1 << 20))?.close()?;
    /// let img = OpenOptions::new().upgrade(true).open(&path)?;
    /// assert!(img.is_writable());
    /// assert_eq!(img.info()?.compat, "1.1");
    /// img.close()?;
    /// # Ok(()) }
    /// ```
    pub fn upgrade(mut self, upgrade: bool) -> Self {
        self.upgrade = upgrade;
        if upgrade {
            self.write = true;
        }
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
        Image::open_layer(path, self, &[canon]).map(|img| *img)
    }
}

pub(crate) fn open_error(name: &str, e: crate::storage::OpenError) -> Error {
    Error::from_open(name, e)
}

impl Image {
    /// Opens an image read-only (shared lock, backing chain opened).
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, ErrorKind, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("a.qcow2");
    /// Image::create(&path, &CreateOptions::new(1 << 20))?.close()?;
    /// let img = Image::open(&path)?;
    /// assert!(!img.is_writable());
    /// assert_eq!(img.path(), Some(path.as_path()));
    /// let missing = Image::open(dir.path().join("missing.qcow2")).unwrap_err();
    /// assert_eq!(missing.kind(), ErrorKind::NotFound);
    /// # Ok(()) }
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Image> {
        OpenOptions::new().open(path)
    }

    /// Opens an image for reading and writing.
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Image, OpenState};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("a.qcow2");
    /// Image::create(&path, &CreateOptions::new(1 << 20))?.close()?;
    /// let img = Image::open_rw(&path)?;
    /// assert_eq!(img.open_state(), OpenState::Clean); // closed cleanly by qcowx
    /// img.write_at(b"x", 0)?;
    /// img.close()?;
    /// # Ok(()) }
    /// ```
    pub fn open_rw(path: impl AsRef<Path>) -> Result<Image> {
        OpenOptions::new().write(true).open(path)
    }

    /// Opens the image at `path` as a layer of a chain (`chain`: the files above it,
    /// for loop detection). Boxed, as [`Image::from_parts`] returns it.
    pub(crate) fn open_layer(
        path: &Path,
        opts: &OpenOptions,
        chain: &[PathBuf],
    ) -> Result<Box<Image>> {
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
    ///
    /// ```
    /// use std::sync::Arc;
    /// use qcowx_core::storage::MemStorage;
    /// use qcowx_core::{CreateOptions, Image, OpenOptions};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// // Make an image file's bytes in memory, then open them again.
    /// let mem = Arc::new(MemStorage::new());
    /// let img = Image::create_in(mem.clone(), &CreateOptions::new(1 << 20))?;
    /// img.write_at(b"in memory", 512)?;
    /// img.close()?;
    /// let bytes = mem.to_vec();
    /// assert_eq!(&bytes[..4], b"QFI\xfb");
    ///
    /// let again = Image::from_storage(Arc::new(MemStorage::from_vec(bytes)), &OpenOptions::new())?;
    /// let mut buf = [0u8; 9];
    /// again.read_at(&mut buf, 512)?;
    /// assert_eq!(&buf, b"in memory");
    /// # Ok(()) }
    /// ```
    pub fn from_storage(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
        let name = storage
            .path()
            .map_or_else(|| "<memory>".to_string(), |p| p.display().to_string());
        let path = storage.path().map(Path::to_path_buf);
        let chain: Vec<PathBuf> = path
            .iter()
            .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
            .collect();
        Image::from_parts(storage, name, path, opts, &chain).map(|img| *img)
    }

    /// Opens the image in `storage`: reads its header, active L1 table and snapshot
    /// table, opens its backing chain (each layer through this function again), then
    /// builds the handle.
    ///
    /// Invariant: a chain of [`super::backing::MAX_BACKING_DEPTH`] layers opens on a
    /// thread with the default 2 MiB stack. The recursion (this function, `open_base`,
    /// `open_chain`, `open_layer`) keeps only a few words per layer: what is read
    /// comes back boxed from [`Image::read_parts`], and the handle, built by
    /// [`Image::assemble`] (neither inlined here), comes back boxed too.
    pub(super) fn from_parts(
        storage: Arc<dyn Storage>,
        name: String,
        path: Option<PathBuf>,
        opts: &OpenOptions,
        chain: &[PathBuf],
    ) -> Result<Box<Image>> {
        let parts = Image::read_parts(storage.as_ref(), &name, opts)?;
        let backing = match opts.open_backing {
            true => backing::open_base(&name, path.as_deref(), &parts.header, chain, opts)?,
            false => None,
        };
        Image::assemble(storage, name, path, opts, parts, backing)
    }

    /// What an open reads before the backing chain: the header, the active L1 table,
    /// the snapshot table, the file's length.
    #[inline(never)]
    fn read_parts(storage: &dyn Storage, name: &str, opts: &OpenOptions) -> Result<Box<Parts>> {
        let name = name.to_string();
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
            if header.incompatible.contains(Incompatible::CORRUPT) && !opts.repair {
                return Err(Error::ReadOnly {
                    file: name.clone(),
                    why: "the image is marked corrupt (a write on its metadata was refused); \
                          it opens read-only until it is repaired"
                        .into(),
                });
            }
            if header.version < 3 && !opts.upgrade {
                return Err(Error::ReadOnly {
                    file: name.clone(),
                    why: "version 2 (compat 0.10) images are read-only in qcowx; \
                          upgrade with `qcowx amend -o compat=1.1`"
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
        let (snapshots, table_exact) = if header.nb_snapshots > 0 {
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
                match snapshot::parse_table(&table, header.snapshots_offset, header.nb_snapshots) {
                    Err(snapshot::SnapshotError::Truncated { .. }) if want < avail => {
                        want = (want * 2).min(avail);
                    }
                    parsed => {
                        let entries = parsed.map_err(|source| Error::Snapshot {
                            file: name.clone(),
                            source,
                        })?;
                        // Only a writable handle writes into the table (its room).
                        let exact = opts.write && snapshot::encodes_as_read(&entries, &table);
                        break (entries, exact);
                    }
                }
            }
        } else {
            (Vec::new(), true)
        };
        Ok(Box::new(Parts {
            header,
            file_len,
            geo,
            compression,
            l1,
            snapshots,
            table_exact,
        }))
    }

    /// Builds the handle from what [`Image::read_parts`] read and the opened backing
    /// chain, and settles a writable open.
    #[inline(never)]
    fn assemble(
        storage: Arc<dyn Storage>,
        name: String,
        path: Option<PathBuf>,
        opts: &OpenOptions,
        parts: Box<Parts>,
        backing: Option<Arc<dyn Layer>>,
    ) -> Result<Box<Image>> {
        let Parts {
            header,
            file_len,
            geo,
            compression,
            l1,
            snapshots,
            table_exact,
        } = *parts;
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
        let records = crate::format::roots::records_for(&snapshots);
        // Nothing is written in place into a table the entries do not write back
        // byte for byte (a name that is not UTF-8): room 0 moves it at the first change.
        let table_capacity = if header.nb_snapshots > 0 && table_exact {
            let used: u64 = snapshots.iter().map(|e| e.encoded_len() as u64).sum();
            used.next_multiple_of(geo.cluster_size())
        } else {
            0
        };
        let state = State {
            registry: Registry::new(snapshots, records, table_capacity),
            roots,
            cache: L2Cache::new(opts.cache_bytes, geo.cluster_size() as usize),
            alloc: Allocator::new(geo.cluster_size(), file_len),
            stale,
            inherited_stale: stale && opts.repair,
            deltas: {
                let mut d = super::RefDeltas::new(geo.cluster_bits, !stale);
                d.set_base_clusters(file_len.div_ceil(geo.cluster_size()));
                d
            },
            last_rebuild: None,
            closed: false,
            open_state: OpenState::ReadOnly,
            l1_changes: 0,
            metadata: Default::default(),
            bitmaps: Default::default(),
            metadata_preallocated: None,
            header,
        };
        let img = Box::new(Image {
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
            wrote: std::sync::atomic::AtomicBool::new(false),
            refused: Mutex::new(None),
        });
        // A version 2 image becomes version 3 before anything else is written.
        let upgraded = opts.upgrade && img.lock_state()?.header.version < 3;
        if upgraded {
            img.upgrade_header()?;
        }
        // A repair-mode open checks and changes nothing: the repair decides.
        if opts.write && !opts.repair {
            // Bitmaps qcowx cannot read are dropped as any writer lacking bitmap
            // support drops them: their auto-clear bit is cleared below.
            let kept = img.load_bitmaps(true).is_ok();
            img.clear_autoclear(kept)?;
            // Anything may have written the image since qcowx last did: find out, and
            // restore what qcowx relies on before any write of ours.
            let state = img.settle_after_open()?;
            img.lock_state()?.open_state = state;
            if upgraded {
                img.complete_snapshot_entries_now()?;
            }
            img.mark_bitmaps_in_use()?;
        } else if !opts.write {
            // A read-only open lists what it can read; a broken directory reads as
            // no bitmaps here (check and a writable open say more).
            let _ = img.load_bitmaps(false);
        }
        Ok(img)
    }

    /// Clears every auto-clear feature bit qcowx does not maintain before the first
    /// write, as QCOW2 requires of a writer: all but bit 0 (bitmaps) when
    /// `keep_bitmaps` (qcowx read them and maintains them from here on). Bitmaps qcowx
    /// could not read become inconsistent, exactly as when any writer that does not
    /// know them writes the image. One single-sector header write, made durable
    /// before any other write.
    pub(super) fn clear_autoclear(&self, keep_bitmaps: bool) -> Result<()> {
        let mut st = self.lock_state()?;
        // qcowx keeps no other auto-clear bit set at rest (see `reconcile`); images an
        // earlier qcowx marked with bit 32 lose it here too.
        let keep = if keep_bitmaps {
            st.header.autoclear & Autoclear::BITMAPS.bits()
        } else {
            0
        };
        if st.header.autoclear == keep {
            return Ok(());
        }
        if st.header.autoclear & Autoclear::BITMAPS.bits() & !keep != 0 {
            st.bitmaps = Default::default();
            // The bitmaps' clusters stop being referenced: their refcounts become
            // stale in the same header write.
            st.header.incompatible |= Incompatible::DIRTY;
            st.stale = true;
            st.deltas.lose_exactness();
        }
        st.header.autoclear = keep;
        self.write_header_fields(&st)?;
        self.sync()
    }
}

/// What an open reads before opening the backing chain (see [`Image::from_parts`]).
struct Parts {
    header: Header,
    file_len: u64,
    geo: Geometry,
    compression: CompressionType,
    l1: Vec<u64>,
    snapshots: Vec<snapshot::SnapshotEntry>,
    /// Whether the entries, written back, are the table's bytes (judged on writable
    /// opens only: false on read-only ones, which never write the table).
    table_exact: bool,
}
