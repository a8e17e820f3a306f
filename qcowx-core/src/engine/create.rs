//! Creating a new version 3 image: the layout of its first clusters and the bytes written.

use std::path::Path;
use std::sync::Arc;

use super::prealloc::{PreallocLayout, Preallocation};
use crate::engine::backing;
use crate::error::{Error, Result};
use crate::format::compress::CompressionType;
use crate::format::extensions::{Extension, Extensions, FeatureKind, EXT_BACKING_FORMAT};
use crate::format::header::{
    Compatible, Header, Incompatible, MAX_CLUSTER_BITS, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS,
    V3_HEADER_LEN,
};
use crate::format::stamp;
use crate::format::tables::{encode_words, Geometry};
use crate::storage::lock::LockMode;
use crate::storage::{FileStorage, Storage};

use super::image::*;
use super::*;

/// What [`Image::create`] does when the file exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum IfExists {
    /// Fail with [`Error::AlreadyExists`] and leave the file untouched (`O_EXCL`).
    Fail,
    /// Replace an empty file or a QCOW2 image (as `qemu-img create` replaces an
    /// image); fail with [`Error::AlreadyExists`] for a file that holds anything else.
    #[default]
    ReplaceImage,
    /// Replace whatever the file holds.
    Replace,
}

/// How to create an image.
///
/// ```
/// use qcowx_core::{CompressionType, CreateOptions, IfExists, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let mut opts = CreateOptions::new(16 << 20).if_exists(IfExists::Fail);
/// opts.apply_qemu_options("cluster_size=128k,extended_l2=on,compression_type=zstd")?;
/// assert_eq!((opts.cluster_size, opts.extended_l2), (128 << 10, true));
/// assert_eq!(opts.compression, CompressionType::Zstd);
/// assert!(opts.apply_qemu_options("preallocation=sparse").is_err());
///
/// let img = Image::create(dir.path().join("a.qcow2"), &opts)?;
/// let info = img.info()?;
/// assert_eq!((info.cluster_size, info.extended_l2, info.compression_type), (128 << 10, true, "zstd"));
/// assert_eq!(info.refcount_bits, 32);
/// # Ok(()) }
/// ```
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
    /// What to do when the file exists already. The default,
    /// [`IfExists::ReplaceImage`], never replaces a file that is not an image.
    pub if_exists: IfExists,
    /// A snapshot in an object store to read unallocated clusters from, instead of a
    /// backing file (`spec/remote.md`; opening it needs the `s3` feature).
    pub remote_base: Option<crate::format::remote::RemoteBase>,
    /// Whether [`Image::create`] opens the backing file when it opens the new image
    /// (default: yes, so a missing or unreadable backing file fails the create). With
    /// `false` the backing file is only named, as `qemu-img create -u` does: it need not
    /// exist yet, and its format, when not given, is probed at the next open.
    pub open_backing: bool,
    /// What the new file allocates up front (default: nothing). With a backing file,
    /// only with extended L2 entries (as QEMU allows it).
    pub preallocation: Preallocation,
    /// Set the lazy-refcounts compatible bit (`-o lazy_refcounts=on`; see
    /// [`Image::set_lazy_refcounts`]).
    pub lazy_refcounts: bool,
    /// Defer the new image's fdatasyncs, for an image useless until complete (a
    /// conversion's output), as `qemu-img convert` writes with `cache=unsafe`: every
    /// one the handle makes is a no-op ([`DeferredSync`](crate::storage::DeferredSync),
    /// with this write-behind), and its owner makes the file durable once, after the
    /// close, if at all (an fdatasync of any descriptor of the file). A crash before
    /// then may leave the image in any state. `None` (the default): every commit
    /// point is synced.
    pub deferred_sync: Option<crate::storage::WriteBehind>,
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
            if_exists: IfExists::default(),
            remote_base: None,
            open_backing: true,
            preallocation: Preallocation::Off,
            lazy_refcounts: false,
            deferred_sync: None,
        }
    }

    /// Applies `qemu-img create -o` options: a comma-separated list of `key=value`
    /// with QEMU's names `size`, `cluster_size`, `extended_l2` (`on`/`off`),
    /// `refcount_bits`, `compression_type` (`zlib`/`zstd`), `preallocation`
    /// (`off`/`metadata`/`falloc`/`full`), `lazy_refcounts` (`on`/`off`),
    /// `backing_file`, `backing_fmt` and `compat` (`1.1` only). An unknown key or a
    /// bad value is refused, naming it.
    pub fn apply_qemu_options(&mut self, options: &str) -> Result<()> {
        let bad = |what: String| Error::InvalidArgument(format!("-o {options}: {what}"));
        for item in options.split(',').filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("'{item}' is not key=value")))?;
            let on_off = |v: &str| match v {
                "on" | "true" | "yes" => Ok(true),
                "off" | "false" | "no" => Ok(false),
                _ => Err(bad(format!("{key} must be on or off, not '{v}'"))),
            };
            match key {
                "size" => {
                    self.size = crate::size::parse_size(value).map_err(|e| bad(e.to_string()))?
                }
                "cluster_size" => {
                    self.cluster_size =
                        crate::size::parse_size(value).map_err(|e| bad(e.to_string()))?
                }
                "extended_l2" => self.extended_l2 = on_off(value)?,
                "lazy_refcounts" => self.lazy_refcounts = on_off(value)?,
                "refcount_bits" => {
                    self.refcount_bits = value
                        .parse()
                        .map_err(|_| bad(format!("refcount_bits '{value}' is not a number")))?
                }
                "compression_type" => {
                    self.compression = match value {
                        "zlib" => CompressionType::Deflate,
                        "zstd" => CompressionType::Zstd,
                        _ => {
                            return Err(bad(format!(
                                "compression_type '{value}' is not zlib or zstd"
                            )))
                        }
                    }
                }
                "preallocation" => {
                    self.preallocation = Preallocation::parse(value).ok_or_else(|| {
                        bad(format!(
                            "preallocation '{value}' is not off, metadata, falloc or full"
                        ))
                    })?
                }
                "backing_file" => self.backing_file = Some(value.to_string()),
                "backing_fmt" => self.backing_format = Some(value.to_string()),
                // qcowx writes version 3 images: QEMU's default, named or not.
                "compat" if matches!(value, "1.1" | "v3") => {}
                "compat" => {
                    return Err(bad(format!(
                        "compat={value}: qcowx creates version 3 (compat=1.1) images only"
                    )))
                }
                // QEMU's options for features qcowx refuses at open too (spec §3.2).
                "data_file" | "data_file_raw" => {
                    return Err(bad(format!(
                        "{key}: qcowx does not support external data files"
                    )))
                }
                _ if key == "encryption" || key.starts_with("encrypt.") => {
                    return Err(bad(format!("{key}: qcowx does not support encryption")))
                }
                _ => return Err(bad(format!("unknown option '{key}'"))),
            }
        }
        Ok(())
    }

    /// The same options with `if_exists`.
    pub fn if_exists(mut self, if_exists: IfExists) -> CreateOptions {
        self.if_exists = if_exists;
        self
    }
}

/// Where a new image's structures go.
#[derive(Debug)]
pub(super) struct CreateLayout {
    reftable: u64,
    reftable_clusters: u64,
    refblocks: u64,
    refblock_count: u64,
    l1: u64,
    l1_clusters: u64,
    l1_entries: u64,
    geo: Geometry,
    /// The tables and data clusters of a preallocated image (empty otherwise).
    prealloc: PreallocLayout,
    preallocation: Preallocation,
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

pub(super) fn plan_create(path: &Path, opts: &CreateOptions) -> Result<(Header, CreateLayout)> {
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
    // A disk of size 0 has no L1 table (offset 0), as QEMU makes it: a cluster for
    // an empty table would be referenced by nothing, a leak to `qemu-img check`.
    let l1_clusters = geo.clusters_for(l1_entries * 8);
    if opts.preallocation != Preallocation::Off
        && (opts.backing_file.is_some() || opts.remote_base.is_some())
        && !opts.extended_l2
    {
        return Err(Error::InvalidArgument(
            "backing file and preallocation can only be used at the same time if \
             extended_l2 is on"
                .into(),
        ));
    }
    // Sized for an image at 0 first: the preallocated part's place depends on the
    // refcount structures' size, which depends on it; the loop settles both.
    let mut prealloc = PreallocLayout::plan(opts.preallocation, &geo, size, l1_entries, 0);
    let per_block = cs * 8 / u64::from(opts.refcount_bits);
    let (mut blocks, mut table) = (1u64, 1u64);
    loop {
        let total = 1 + table + blocks + l1_clusters + prealloc.clusters();
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
        l1: if l1_clusters == 0 {
            0
        } else {
            cs * (1 + table + blocks)
        },
        l1_clusters,
        l1_entries,
        geo,
        prealloc: PreallocLayout::default(),
        preallocation: opts.preallocation,
    };
    prealloc = PreallocLayout::plan(
        opts.preallocation,
        &geo,
        size,
        l1_entries,
        cs * (1 + table + blocks + l1_clusters),
    );
    let layout = CreateLayout { prealloc, ..layout };

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
    if let Some(base) = &opts.remote_base {
        if backing_file.is_some() {
            return Err(Error::InvalidArgument(
                "an image has a backing file or a remote base, not both".into(),
            ));
        }
        extensions.set(Extension {
            kind: crate::format::remote::EXT_REMOTE_BASE,
            data: base.encode(),
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
        compatible: if opts.lazy_refcounts {
            Compatible::LAZY_REFCOUNTS.bits()
        } else {
            0
        },
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
    // A new image is as clean as one qcowx closed: stamp it (when there is room), so
    // its first writable open needs no scan.
    let mut stamped = header.clone();
    let l1 = layout.prealloc.l1(&geo, l1_entries);
    stamped
        .extensions
        .set(stamp::extension(stamp::compute(&header, &l1, &[])));
    stamped.layout_backing();
    if stamped.to_cluster().is_some() {
        header = stamped;
    }
    Ok((header, layout))
}

pub(super) fn write_new_image(
    storage: &dyn Storage,
    name: &str,
    header: &Header,
    layout: &CreateLayout,
) -> Result<()> {
    let io = |op, offset, source| Error::io(name, op, offset, source);
    let cs = header.cluster_size();
    let used = 1
        + layout.reftable_clusters
        + layout.refblock_count
        + layout.l1_clusters
        + layout.prealloc.clusters();
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
            crate::format::refblock::set_entry(&mut block, header.refcount_order, i as usize, 1);
        }
        let off = layout.refblocks + b * cs;
        storage
            .write_at(&block, off)
            .map_err(|e| io("write refcount block", off, e))?;
    }
    // The L1 table (none for a disk of size 0): empty, or linking the preallocated
    // L2 tables, which follow with the data area.
    if layout.l1_clusters > 0 {
        let mut l1 = encode_words(&layout.prealloc.l1(&layout.geo, layout.l1_entries));
        l1.resize((layout.l1_clusters * cs) as usize, 0);
        storage
            .write_at(&l1, layout.l1)
            .map_err(|e| io("write L1 table", layout.l1, e))?;
    }
    layout
        .prealloc
        .write(storage, name, &layout.geo, layout.preallocation)?;
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

/// Whether the file `storage` holds nothing or starts with the QCOW2 magic.
fn empty_or_image(storage: &FileStorage, name: &str) -> Result<bool> {
    let len = storage.len().map_err(|e| Error::io(name, "stat", 0, e))?;
    if len == 0 {
        return Ok(true);
    }
    let mut magic = [0u8; 4];
    storage
        .read_at(&mut magic, 0)
        .map_err(|e| Error::io(name, "read header", 0, e))?;
    Ok(u32::from_be_bytes(magic) == crate::format::header::QCOW_MAGIC)
}

impl Image {
    /// Creates a new version 3 image at `path` and opens it for writing. An existing
    /// file is replaced or refused as [`CreateOptions::if_exists`] says: by default an
    /// empty file or an image is replaced, anything else refused with
    /// [`Error::AlreadyExists`].
    ///
    /// ```
    /// use qcowx_core::{CreateOptions, Error, IfExists, Image};
    ///
    /// # fn main() -> Result<(), Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("disk.qcow2");
    /// let new_only = CreateOptions::new(1 << 20).if_exists(IfExists::Fail);
    /// Image::create(&path, &new_only)?.close()?;
    /// assert!(matches!(Image::create(&path, &new_only), Err(Error::AlreadyExists { .. })));
    /// # Ok(()) }
    /// ```
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Image> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let (header, layout) = plan_create(path, opts)?;
        // The backing file must open before anything is written, as QEMU checks it: a
        // create that fails on it leaves no file, and leaves a file it would have
        // replaced as it was.
        if let (true, Some(backing)) = (opts.open_backing, &opts.backing_file) {
            let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
            backing::open_chain(
                &name,
                Some(path),
                backing,
                opts.backing_format.as_deref(),
                &[canon],
                &OpenOptions::new(),
            )?;
        }
        let lock = LockMode::Exclusive;
        let storage = match opts.if_exists {
            IfExists::Fail => FileStorage::create_new(path, lock),
            IfExists::Replace => FileStorage::create(path, lock),
            IfExists::ReplaceImage => FileStorage::create_keeping(path, lock),
        }
        .map_err(|e| open_error(&name, e))?;
        if opts.if_exists == IfExists::ReplaceImage && !empty_or_image(&storage, &name)? {
            return Err(Error::AlreadyExists {
                file: name.clone(),
                what: "non-image file".into(),
                name,
            });
        }
        if let Err(e) = write_new_image(&storage, &name, &header, &layout) {
            // A half-written image is no image (a full disk, say): leave no file that
            // looks like one. The lock is still held, so the file is still ours.
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        // Open through the same locked file: no window where another process could
        // take the image between creating and opening it.
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let storage: Arc<dyn Storage> = match opts.deferred_sync {
            None => Arc::new(storage),
            Some(wb) => Arc::new(crate::storage::DeferredSync::with_write_behind(storage, wb)),
        };
        Image::from_parts(
            storage,
            name,
            Some(path.to_path_buf()),
            &OpenOptions::new()
                .write(true)
                .open_backing(opts.open_backing),
            &[canon],
        )
        .map(|img| *img)
    }

    /// Creates a new image in `storage` (which must be empty) and opens it for writing.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use qcowx_core::storage::MemStorage;
    /// use qcowx_core::{CreateOptions, Image};
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let img = Image::create_in(Arc::new(MemStorage::new()), &CreateOptions::new(1 << 20))?;
    /// assert!(img.is_writable());
    /// assert_eq!(img.file_name(), "<memory>");
    /// assert_eq!(img.path(), None);
    /// # Ok(()) }
    /// ```
    pub fn create_in(storage: Arc<dyn Storage>, opts: &CreateOptions) -> Result<Image> {
        let name = storage
            .path()
            .map_or_else(|| "<memory>".to_string(), |p| p.display().to_string());
        let (header, layout) = plan_create(Path::new(&name), opts)?;
        write_new_image(storage.as_ref(), &name, &header, &layout)?;
        Image::from_storage(storage, &OpenOptions::new().write(true))
    }
}
