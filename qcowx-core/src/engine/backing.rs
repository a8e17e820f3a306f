//! Backing files: the layers unallocated clusters fall through to.
//!
//! A backing file is a qcow2 image (opened read-only, with its own chain) or a raw
//! file. Names are resolved against the folder of the image that names them; the chain
//! is limited to [`MAX_BACKING_DEPTH`] layers and loops are rejected with an error that
//! names the loop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::{Extent, ExtentStatus, Image, OpenOptions};
use crate::error::{Error, Result};
use crate::storage::lock::LockMode;
use crate::storage::{FileStorage, OpenMode, Storage};

/// The deepest backing chain qcowx opens (layers below the top image).
pub const MAX_BACKING_DEPTH: usize = 256;

/// A read-only layer of a backing chain.
pub trait Layer: Send + Sync + std::fmt::Debug {
    /// The layer's virtual size; reads past it return zeros.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`; bytes past [`Layer::size`] read as zeros.
    fn read_layer(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Allocation status of `[offset, offset+len)`, `len` > 0, depth relative to this
    /// layer (0 = this layer). Ranges past the size are reported as unallocated:
    /// nothing in the chain holds them (they read as zeros), as `qemu-img map` says.
    fn layer_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
    /// Number of layers from this one down (1 for a layer with no backing file).
    fn chain_len(&self) -> u32;
    /// A name for messages.
    fn name(&self) -> &str;
    /// A hint that `[offset, offset+len)` will be read soon (see [`Image::prefetch`]);
    /// a layer that cannot start reads ahead of time ignores it.
    fn prefetch_layer(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    /// Requests this layer has sent to an object store (`None` for a local layer).
    fn remote_requests(&self) -> Option<u64> {
        None
    }
}

/// A raw file used as a backing file.
#[derive(Debug)]
pub struct RawLayer {
    storage: FileStorage,
    name: String,
    size: u64,
}

impl RawLayer {
    /// Opens `path` read-only with a shared lock.
    ///
    /// ```
    /// use qcowx_core::engine::backing::{Layer, RawLayer};
    /// use qcowx_core::LockMode;
    ///
    /// # fn main() -> Result<(), qcowx_core::Error> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("base.raw");
    /// std::fs::write(&path, [4u8; 1000]).unwrap();
    /// let raw = RawLayer::open(&path, LockMode::Shared)?;
    /// assert_eq!((raw.size(), raw.chain_len()), (1000, 1));
    /// let mut buf = [9u8; 8];
    /// raw.read_layer(&mut buf, 996)?; // past the end reads zeros
    /// assert_eq!(buf, [4, 4, 4, 4, 0, 0, 0, 0]);
    /// # Ok(()) }
    /// ```
    pub fn open(path: &Path, lock: LockMode) -> Result<RawLayer> {
        let name = path.display().to_string();
        let storage =
            FileStorage::open(path, OpenMode::read_only().with_lock(lock)).map_err(|e| {
                Error::Backing {
                    file: name.clone(),
                    why: e.to_string(),
                    source: None,
                }
            })?;
        let size = storage.len().map_err(|source| Error::Io {
            file: name.clone(),
            op: "stat",
            offset: 0,
            source,
        })?;
        Ok(RawLayer {
            storage,
            name,
            size,
        })
    }
}

impl Layer for RawLayer {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_layer(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        if avail > 0 {
            self.storage
                .read_at(&mut buf[..avail], offset)
                .map_err(|source| Error::Io {
                    file: self.name.clone(),
                    op: "read",
                    offset,
                    source,
                })?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn prefetch_layer(&self, offset: u64, len: u64) -> Result<()> {
        let end = self.size.min(offset.saturating_add(len));
        if end > offset {
            self.storage.will_need(offset, end - offset);
        }
        Ok(())
    }

    fn layer_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        let data_end = self.size.min(offset + len);
        if data_end > offset {
            out.push(Extent {
                offset,
                length: data_end - offset,
                status: ExtentStatus::Data,
                depth: 0,
                host_offset: Some(offset),
            });
        }
        if offset + len > data_end.max(offset) {
            let start = data_end.max(offset);
            out.push(Extent {
                offset: start,
                length: offset + len - start,
                status: ExtentStatus::Unallocated,
                depth: 0,
                host_offset: None,
            });
        }
        Ok(out)
    }

    fn chain_len(&self) -> u32 {
        1
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Resolves a backing file name as QEMU does: absolute names as they are, relative
/// ones against the folder of the image that names them.
///
/// ```
/// use std::path::Path;
/// use qcowx_core::engine::backing::resolve;
///
/// let top = Path::new("/vm/disks/top.qcow2");
/// assert_eq!(resolve(Some(top), "base.qcow2"), Path::new("/vm/disks/base.qcow2"));
/// assert_eq!(resolve(Some(top), "../golden.raw"), Path::new("/vm/disks/../golden.raw"));
/// assert_eq!(resolve(Some(top), "/srv/base.qcow2"), Path::new("/srv/base.qcow2"));
/// ```
pub fn resolve(image: Option<&Path>, backing: &str) -> PathBuf {
    let p = Path::new(backing);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.and_then(Path::parent) {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Guesses a file's format: `qcow2` by its magic, else `raw`.
///
/// ```
/// use qcowx_core::engine::backing::probe_format;
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let qcow = dir.path().join("a.qcow2");
/// Image::create(&qcow, &CreateOptions::new(1 << 20))?.close()?;
/// let raw = dir.path().join("a.img");
/// std::fs::write(&raw, [0u8; 512]).unwrap();
/// assert_eq!(probe_format(&qcow).unwrap(), "qcow2");
/// assert_eq!(probe_format(&raw).unwrap(), "raw");
/// # Ok(()) }
/// ```
pub fn probe_format(path: &Path) -> std::io::Result<&'static str> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)?;
    let n = f.read(&mut magic)?;
    Ok(
        if n == 4 && u32::from_be_bytes(magic) == crate::format::header::QCOW_MAGIC {
            "qcow2"
        } else {
            "raw"
        },
    )
}

/// A disk image format qcowx reads and writes: a layer of a backing chain, the
/// output of an export or convert.
///
/// ```
/// use qcowx_core::convert::ImageFormat;
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let qcow = dir.path().join("a.qcow2");
/// Image::create(&qcow, &CreateOptions::new(1 << 20))?.close()?;
/// assert_eq!(ImageFormat::probe(&qcow)?, ImageFormat::Qcow2);
/// assert_eq!(ImageFormat::Qcow2.name(), "qcow2");
/// assert_eq!(ImageFormat::from_name("raw")?, ImageFormat::Raw);
/// assert_eq!("raw".parse::<ImageFormat>()?, ImageFormat::Raw);
/// assert!(ImageFormat::from_name("vmdk").is_err());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// A raw disk image (always the bottom of a chain; as output, a sparse file of the
    /// virtual size).
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl std::str::FromStr for ImageFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<ImageFormat> {
        ImageFormat::from_name(s)
    }
}

impl ImageFormat {
    /// The format's name as `qemu-img` spells it.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// Parses `raw` or `qcow2`.
    pub fn from_name(name: &str) -> Result<ImageFormat> {
        match name {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(Error::InvalidArgument(format!(
                "format '{other}' is not supported (qcow2 and raw are)"
            ))),
        }
    }

    /// Probes the format of the file at `path` (`qcow2` by its magic, else `raw`).
    pub fn probe(path: &Path) -> Result<ImageFormat> {
        let f = probe_format(path).map_err(|source| Error::Io {
            file: path.display().to_string(),
            op: "open",
            offset: 0,
            source,
        })?;
        ImageFormat::from_name(f)
    }
}

/// One step down a backing chain: the file an image names as its backing file.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    /// The name resolved against the naming image's folder (what `qemu-img` prints).
    pub(crate) path: PathBuf,
    /// The canonical path, for loop detection.
    pub(crate) canon: PathBuf,
    /// The recorded format, or the probed one.
    pub(crate) format: ImageFormat,
}

/// Follows the backing file `name` (recorded format `format`) of the image `image`
/// (at `image_path`) whose chain so far, top first, is `chain` (canonical paths).
/// The one place that resolves names, and refuses loops, chains deeper than
/// [`MAX_BACKING_DEPTH`] and unsupported formats; every chain walker steps with it.
pub(crate) fn follow(
    image: &str,
    image_path: Option<&Path>,
    name: &str,
    format: Option<&str>,
    chain: &[PathBuf],
) -> Result<Link> {
    let backing_err = |why: String, source: Option<Box<Error>>| Error::Backing {
        file: image.to_string(),
        why,
        source,
    };
    if chain.len() > MAX_BACKING_DEPTH {
        return Err(backing_err(
            format!("backing chain deeper than {MAX_BACKING_DEPTH} layers"),
            None,
        ));
    }
    let path = resolve(image_path, name);
    let canon = std::fs::canonicalize(&path)
        .map_err(|e| backing_err(format!("cannot open '{}': {e}", path.display()), None))?;
    if let Some(pos) = chain.iter().position(|p| *p == canon) {
        let mut names: Vec<String> = chain[pos..]
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        names.push(canon.display().to_string());
        return Err(backing_err(
            format!("backing chain loop: {}", names.join(" -> ")),
            None,
        ));
    }
    let format = match format {
        Some(f) => ImageFormat::from_name(f).map_err(|_| {
            backing_err(
                format!("backing format '{f}' is not supported (qcow2 and raw are)"),
                None,
            )
        })?,
        None => ImageFormat::probe(&canon).map_err(|e| {
            backing_err(
                format!("cannot probe '{}'", path.display()),
                Some(Box::new(e)),
            )
        })?,
    };
    Ok(Link {
        path,
        canon,
        format,
    })
}

/// Opens the backing file `name` of the image at `image` (whose chain so far, top
/// first, is `chain`), with its own chain below it.
pub(crate) fn open_chain(
    image: &str,
    image_path: Option<&Path>,
    name: &str,
    format: Option<&str>,
    chain: &[PathBuf],
    opts: &OpenOptions,
) -> Result<Arc<dyn Layer>> {
    let link = follow(image, image_path, name, format, chain)?;
    let lock = if opts.lock_mode() == LockMode::ForceShare || opts.lock_mode() == LockMode::None {
        opts.lock_mode()
    } else {
        LockMode::Shared
    };
    match link.format {
        ImageFormat::Raw => Ok(Arc::new(RawLayer::open(&link.canon, lock)?)),
        ImageFormat::Qcow2 => {
            let mut next_chain = chain.to_vec();
            next_chain.push(link.canon.clone());
            // Backing layers are only read: open them read-only with a shared lock,
            // so other overlays and `qemu-img info` can use them too.
            let layer_opts = opts.clone().write(false).lock(lock);
            let img = Image::open_layer(&link.canon, &layer_opts, &next_chain).map_err(|e| {
                Error::Backing {
                    file: image.to_string(),
                    why: format!("cannot open '{}'", link.path.display()),
                    source: Some(Box::new(e)),
                }
            })?;
            // From the box: the layer is never on this (recursive) frame.
            let layer: Arc<Image> = Arc::from(img);
            Ok(layer)
        }
    }
}

/// Opens what an image reads its unallocated clusters from: the backing file `name`
/// (with its chain), else the remote base its header extension names
/// ([`crate::format::remote::EXT_REMOTE_BASE`]), else nothing.
pub(crate) fn open_base(
    image: &str,
    image_path: Option<&Path>,
    header: &crate::format::header::Header,
    chain: &[PathBuf],
    opts: &OpenOptions,
) -> Result<Option<Arc<dyn Layer>>> {
    if let Some(name) = &header.backing_file {
        return open_chain(
            image,
            image_path,
            name,
            header.backing_format(),
            chain,
            opts,
        )
        .map(Some);
    }
    let Some(ext) = header
        .extensions
        .get(crate::format::remote::EXT_REMOTE_BASE)
    else {
        return Ok(None);
    };
    let base =
        crate::format::remote::RemoteBase::decode(&ext.data).map_err(|e| Error::Backing {
            file: image.to_string(),
            why: e.to_string(),
            source: None,
        })?;
    open_remote(image, image_path, &base)
}

#[cfg(feature = "s3")]
fn open_remote(
    image: &str,
    image_path: Option<&Path>,
    base: &crate::format::remote::RemoteBase,
) -> Result<Option<Arc<dyn Layer>>> {
    let layer = crate::remote::RemoteLayer::open(image, image_path, base)?;
    Ok(Some(Arc::new(layer)))
}

#[cfg(not(feature = "s3"))]
fn open_remote(
    image: &str,
    _image_path: Option<&Path>,
    base: &crate::format::remote::RemoteBase,
) -> Result<Option<Arc<dyn Layer>>> {
    Err(Error::Backing {
        file: image.to_string(),
        why: format!(
            "its base is snapshot uid {:016x} in {}, and this qcowx was built without \
             object-store support (feature s3)",
            base.uid, base.url
        ),
        source: None,
    })
}
