//! Import: a linear backing chain turned into one image whose layers are snapshots.
//!
//! [`import_chain`] takes the top of a chain (`TOP -> ... -> BASE`, qcow2 layers over
//! a qcow2 or raw base) and writes a new image in which the base is the first
//! snapshot, each layer above it a snapshot taken on top of the previous one, and
//! TOP the default VDI. Every snapshot reads exactly as its layer reads in the chain
//! (what `qemu-img convert -O raw LAYER` writes), and the default VDI reads as TOP.
//!
//! The copy is proportional to what the layers themselves store: for each layer, from
//! the bottom up, only the ranges the layer allocates itself are copied into the
//! default VDI — data as data, zero clusters as zeros — and then the default VDI is
//! snapshotted. A raw base contributes its data ranges (holes are skipped, the new
//! image starts out reading zeros). Reads of the result never pay for the chain's
//! depth.
//!
//! ```
//! use qcowx_core::import::import_chain;
//! use qcowx_core::{CreateOptions, Image};
//!
//! # fn main() -> Result<(), qcowx_core::Error> {
//! let dir = tempfile::tempdir().unwrap();
//! let base = dir.path().join("base.qcow2");
//! let top = dir.path().join("top.qcow2");
//! let img = Image::create(&base, &CreateOptions::new(1 << 20))?;
//! img.write_at(b"base", 0)?;
//! img.close()?;
//! let mut opts = CreateOptions::new(1 << 20);
//! opts.backing_file = Some("base.qcow2".into());
//! let img = Image::create(&top, &opts)?;
//! img.write_at(b"top!", 4096)?;
//! img.close()?;
//!
//! let out = dir.path().join("flat.qcow2");
//! let report = import_chain(&top, &out, &mut |_, _| {})?;
//! assert_eq!(report.layers[0].snapshot.as_deref(), Some("base"));
//! assert_eq!(report.layers[1].snapshot, None); // the top is the default VDI
//! let img = std::sync::Arc::new(Image::open(&out)?);
//! let mut b = [0u8; 4];
//! img.open_root("base")?.read_at(&mut b, 4096)?;
//! assert_eq!(&b, &[0; 4]);
//! img.read_at(&mut b, 4096)?;
//! assert_eq!(&b, b"top!");
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::convert::COPY_CHUNK;
use crate::engine::chain::{open_chain, raw_extents, ChainLayer, ImageFormat, OpenLayer};
use crate::engine::STATUS_WINDOW;
use crate::engine::{CreateOptions, Extent, ExtentStatus, Image};
use crate::error::{Error, Result};
use crate::storage::lock::LockMode;
use crate::storage::{DeferredSync, FileStorage, OpenMode, Storage, WriteBehind};
use crate::vdi::{DEFAULT_VDI, MAX_NAME_LEN};

/// Cluster size of the output when the top is a raw file.
const DEFAULT_CLUSTER_SIZE: u64 = 65536;

/// How [`import_chain_with`] finishes its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportOptions {
    /// Make the output durable before returning (the default): writeback is started
    /// while the layers are copied, then one fdatasync, the rename over the output,
    /// and an fsync of its folder. Without it the output still appears under its name
    /// only once complete (the rename), for every process, but a power failure soon
    /// after may lose it or part of its data: no fdatasync, and the kernel writes the
    /// pages back when it chooses — what `qemu-img convert` does by default
    /// (`cache=unsafe`). For pipelines that sync once at the end, or that can redo the
    /// import.
    pub sync: bool,
}

impl Default for ImportOptions {
    fn default() -> ImportOptions {
        ImportOptions { sync: true }
    }
}

/// One layer of an import, bottom first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedLayer {
    /// The layer's file.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// Its virtual size.
    pub virtual_size: u64,
    /// The snapshot it became (`None` for the top, which became the default VDI).
    pub snapshot: Option<String>,
    /// Bytes of data the layer itself stores, copied.
    pub data_bytes: u64,
    /// Bytes the layer itself records as zeros, copied as zeros.
    pub zero_bytes: u64,
}

/// What [`import_chain`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// The layers, bottom (base) first, top last.
    pub layers: Vec<ImportedLayer>,
    /// The output's virtual size (the top's).
    pub virtual_size: u64,
    /// The output's cluster size.
    pub cluster_size: u64,
}

/// Snapshot names for the layers of a chain (bottom first), from their file names.
///
/// The rule: take the file name without its last extension (`base.qcow2` → `base`,
/// `disk.2024.qcow2` → `disk.2024`, `disk` → `disk`); replace every byte other than
/// an ASCII letter, digit, `.`, `_`, `+`, `-` or `@` with `_`, and a leading `.` or
/// `-` with `_`; cut it to [`MAX_NAME_LEN`] bytes; use `layer` for an empty name. A
/// name already taken (by an earlier layer, or `default`, the default VDI's name)
/// gets the first free suffix `-2`, `-3`, … (the stem is shortened to make room).
///
/// ```
/// use std::path::Path;
/// use qcowx_core::import::snapshot_names;
///
/// let layers = [Path::new("/img/base.qcow2"), Path::new("/img/base.raw"), Path::new("default.qcow2")];
/// assert_eq!(snapshot_names(&layers), ["base", "base-2", "default-2"]);
/// ```
pub fn snapshot_names(paths: &[&Path]) -> Vec<String> {
    let mut taken: HashSet<String> = HashSet::new();
    taken.insert(DEFAULT_VDI.to_string());
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut name: String = stem
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._+-@".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if name.starts_with(['.', '-']) {
            name.replace_range(0..1, "_");
        }
        name.truncate(MAX_NAME_LEN);
        if name.is_empty() {
            name = "layer".into();
        }
        let mut unique = name.clone();
        let mut n = 2u64;
        while taken.contains(&unique) {
            let suffix = format!("-{n}");
            let mut base = name.clone();
            base.truncate(MAX_NAME_LEN - suffix.len());
            unique = format!("{base}{suffix}");
            n += 1;
        }
        taken.insert(unique.clone());
        out.push(unique);
    }
    out
}

/// What one layer stores itself, read through a handle without its backing chain.
enum LayerReader {
    Qcow2(Box<Image>),
    Raw(FileStorage, String),
}

impl LayerReader {
    fn new(layer: &ChainLayer, open: OpenLayer) -> LayerReader {
        match open {
            OpenLayer::Qcow2(img) => LayerReader::Qcow2(img),
            OpenLayer::Raw(storage) => LayerReader::Raw(storage, layer.path.display().to_string()),
        }
    }

    /// The ranges of `[offset, offset+len)` the layer stores itself: data and zeros.
    /// A raw base's holes are left out (the new image reads zeros there already).
    fn own_extents(&self, offset: u64, len: u64, size: u64) -> Result<Vec<Extent>> {
        Ok(match self {
            LayerReader::Qcow2(img) => img
                .block_status(offset, len)?
                .into_iter()
                .filter(|e| e.status != ExtentStatus::Unallocated)
                .collect(),
            LayerReader::Raw(storage, _) => raw_extents(storage.file(), size, offset, len)
                .into_iter()
                .filter(|e| e.status == ExtentStatus::Data)
                .collect(),
        })
    }

    /// Runs `f` on the layer's bytes at `[offset, offset+len)` lent from its file's
    /// mapping, if they are cached and lie in one piece (see `Image::read_mapped`);
    /// `Ok(None)` without calling `f` otherwise.
    fn with_mapped(
        &self,
        offset: u64,
        len: u64,
        f: impl FnOnce(&[u8]) -> Result<()>,
    ) -> Result<Option<()>> {
        let LayerReader::Qcow2(img) = self else {
            return Ok(None);
        };
        let r = img.read_mapped(offset, len, |slices| match slices {
            [one] => Some(f(one)),
            _ => None,
        })?;
        r.flatten().transpose()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match self {
            LayerReader::Qcow2(img) => img.read_at(buf, offset),
            LayerReader::Raw(storage, name) => {
                storage.read_at(buf, offset).map_err(|source| Error::Io {
                    file: name.clone(),
                    op: "read",
                    offset,
                    source,
                })
            }
        }
    }
}

/// Turns the backing chain under `top` (`top` included) into a new qcowx image at
/// `output`: the bottom layer becomes the first snapshot, each layer above it a
/// snapshot on top of the previous one (names from [`snapshot_names`]), and `top`
/// the default VDI. See the module documentation.
///
/// The output gets `top`'s cluster size (64 KiB when `top` is a raw file) and no
/// backing file; an existing file at `output` is overwritten, unless it is one of the
/// chain's files (refused). The layers are opened read-only with shared locks, so a
/// chain in use by a writer is refused. Virtual sizes may grow up the chain (the
/// default VDI is resized as the layers are copied) but not shrink: a layer smaller
/// than the one below it is refused. Internal snapshots of the chain's files are not
/// imported.
///
/// `progress` is called with the bytes copied so far and the total the layers store.
/// The output is durable when this returns; [`import_chain_with`] can leave that to
/// the kernel.
///
/// A raw base under a qcow2 overlay:
///
/// ```
/// use qcowx_core::import::import_chain;
/// use qcowx_core::{CreateOptions, Image, RootKind};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::write(dir.path().join("golden.raw"), vec![1u8; 1 << 20]).unwrap();
/// let mut opts = CreateOptions::new(1 << 20);
/// opts.backing_file = Some("golden.raw".into());
/// opts.backing_format = Some("raw".into());
/// let top = dir.path().join("vm.qcow2");
/// Image::create(&top, &opts)?.close()?;
///
/// let out = dir.path().join("vm-flat.qcow2");
/// let mut calls = 0;
/// let report = import_chain(&top, &out, &mut |_, _| calls += 1)?;
/// assert_eq!(report.layers.len(), 2);
/// let img = Image::open(&out)?;
/// let roots: Vec<_> = img.list()?.into_iter().map(|r| (r.kind, r.name)).collect();
/// assert_eq!(roots, [(RootKind::Vdi, "default".into()), (RootKind::Snapshot, "golden".into())]);
/// assert!(img.info()?.backing_file.is_none());
/// let mut b = [0u8; 1];
/// img.read_at(&mut b, 12345)?;
/// assert_eq!(b, [1]);
/// # let _ = calls;
/// # Ok(()) }
/// ```
pub fn import_chain(
    top: &Path,
    output: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ImportReport> {
    import_chain_with(top, output, &ImportOptions::default(), progress)
}

/// [`import_chain`] with options.
///
/// ```
/// use qcowx_core::import::{import_chain_with, ImportOptions};
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let base = dir.path().join("base.qcow2");
/// Image::create(&base, &CreateOptions::new(1 << 20))?.close()?;
/// let out = dir.path().join("out.qcow2");
/// // No fdatasync: the kernel writes the output back when it chooses.
/// let fast = ImportOptions { sync: false };
/// let report = import_chain_with(&base, &out, &fast, &mut |_, _| {})?;
/// assert_eq!((report.virtual_size, report.cluster_size), (1 << 20, 65536));
/// assert_eq!(Image::open(&out)?.list()?.len(), 1, "one layer: the default VDI only");
/// # Ok(()) }
/// ```
pub fn import_chain_with(
    top: &Path,
    output: &Path,
    options: &ImportOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ImportReport> {
    // Each layer opened once, read-only with a shared lock, and kept open to be read.
    let mut opened = open_chain(top, None, LockMode::Shared)?;
    // A chain that ends in a snapshot in an object store has no local file to import
    // it from: importing the local layers alone would lose what the store holds.
    for (layer, open) in &opened {
        if let OpenLayer::Qcow2(img) = open {
            if let Some(base) = img.info()?.remote_base {
                let url = base.map_or_else(|e| format!("(damaged: {e})"), |b| b.url);
                return Err(Error::Unsupported {
                    file: layer.path.display().to_string(),
                    what: format!(
                        "importing an image whose base is a snapshot in an object store \
                         ({url}) (a conversion reads through the base)"
                    ),
                });
            }
        }
    }
    opened.reverse(); // bottom first
    let (chain, readers): (Vec<ChainLayer>, Vec<LayerReader>) = opened
        .into_iter()
        .map(|(layer, open)| {
            let reader = LayerReader::new(&layer, open);
            (layer, reader)
        })
        .unzip();
    let out_name = output.display().to_string();
    if let Ok(out_canon) = std::fs::canonicalize(output) {
        for layer in &chain {
            if std::fs::canonicalize(&layer.path).is_ok_and(|c| c == out_canon) {
                return Err(Error::InvalidArgument(format!(
                    "{out_name}: the output is '{}', a file of the chain being imported; \
                     choose a new file",
                    layer.path.display()
                )));
            }
        }
    }
    for pair in chain.windows(2) {
        if pair[1].virtual_size < pair[0].virtual_size {
            return Err(Error::Unsupported {
                file: pair[1].path.display().to_string(),
                what: format!(
                    "importing a layer smaller ({} bytes) than the layer below it ('{}', {} \
                     bytes); grow it first with `qemu-img resize`",
                    pair[1].virtual_size,
                    pair[0].path.display(),
                    pair[0].virtual_size
                ),
            });
        }
    }
    // Plan: what each layer stores, and the total for progress.
    let mut plans: Vec<Vec<Extent>> = Vec::with_capacity(chain.len());
    let mut total = 0u64;
    for (layer, reader) in chain.iter().zip(&readers) {
        let mut ext = Vec::new();
        let mut pos = 0;
        while pos < layer.virtual_size {
            let n = STATUS_WINDOW.min(layer.virtual_size - pos);
            ext.extend(reader.own_extents(pos, n, layer.virtual_size)?);
            pos += n;
        }
        total += ext.iter().map(|e| e.length).sum::<u64>();
        plans.push(ext);
    }
    let top_layer = chain
        .last()
        .ok_or_else(|| Error::InvalidArgument("empty backing chain".into()))?;
    let mut opts = CreateOptions::new(chain[0].virtual_size);
    opts.cluster_size = top_layer.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
    let out = Output::create(output, options.sync)?;
    let result = copy_layers(&chain, &readers, &plans, total, &out, &opts, progress);
    out.finish(result)
}

/// The image being imported into: a new file under a temporary name beside the
/// output, with every fdatasync deferred to one at the end, renamed over the output
/// only once complete and durable — so no crash leaves a half-written image under the
/// output's name, and the import pays one fdatasync instead of several per layer.
/// Without `sync` there is no fdatasync at all: the rename still comes only once the
/// image is complete.
struct Output {
    storage: Arc<DeferredSync>,
    sync: bool,
    temp: PathBuf,
    output: PathBuf,
    /// An existing output file, locked so no other process uses it while it is
    /// replaced (as `Image::create` refuses a file in use).
    _existing: Option<FileStorage>,
}

impl Output {
    fn create(output: &Path, sync: bool) -> Result<Output> {
        let name = output.display().to_string();
        let existing = if output.exists() {
            let mode = OpenMode::read_write().with_lock(LockMode::Exclusive);
            Some(FileStorage::open(output, mode).map_err(|e| crate::engine::open_error(&name, e))?)
        } else {
            None
        };
        let file_name = output
            .file_name()
            .ok_or_else(|| Error::InvalidArgument(format!("{name}: not a file name")))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(file_name);
        temp_name.push(format!(".qcowx-import-{}", std::process::id()));
        let temp = output.with_file_name(temp_name);
        let storage = FileStorage::create(&temp, LockMode::Exclusive)
            .map_err(|e| crate::engine::open_error(&temp.display().to_string(), e))?;
        let write_behind = if sync {
            WriteBehind::Background
        } else {
            WriteBehind::Off
        };
        Ok(Output {
            storage: Arc::new(DeferredSync::with_write_behind(storage, write_behind)),
            sync,
            temp,
            output: output.to_path_buf(),
            _existing: existing,
        })
    }

    /// After the import (`result`): one fdatasync (with `sync`) and the rename, or the
    /// temporary file removed.
    fn finish(self, result: Result<ImportReport>) -> Result<ImportReport> {
        let done = result.and_then(|report| {
            let io = |op: &'static str, source| {
                Error::io(self.output.display().to_string(), op, 0, source)
            };
            if !self.sync {
                std::fs::rename(&self.temp, &self.output).map_err(|e| io("rename", e))?;
                return Ok(report);
            }
            self.storage.sync_now().map_err(|e| io("fdatasync", e))?;
            std::fs::rename(&self.temp, &self.output).map_err(|e| io("rename", e))?;
            // The rename itself is durable once the directory is.
            let dir = self
                .output
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("sync directory", e))?;
            Ok(report)
        });
        if done.is_err() {
            let _ = std::fs::remove_file(&self.temp);
        }
        done
    }
}

/// Copies every layer into `out`, bottom first, a snapshot after each but the top.
fn copy_layers(
    chain: &[ChainLayer],
    readers: &[LayerReader],
    plans: &[Vec<Extent>],
    total: u64,
    out: &Output,
    opts: &CreateOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ImportReport> {
    let img = Image::create_in(out.storage.clone(), opts)?;
    let cs = img.cluster_size();
    let paths: Vec<&Path> = chain.iter().map(|l| l.path.as_path()).collect();
    let names = snapshot_names(&paths[..paths.len() - 1]);
    let mut layers = Vec::with_capacity(chain.len());
    let mut done = 0u64;
    let mut buf: Vec<u8> = Vec::new();
    progress(0, total);
    for (i, ((layer, reader), plan)) in chain.iter().zip(readers).zip(plans).enumerate() {
        if layer.virtual_size > img.size() {
            img.resize(layer.virtual_size)?;
        }
        let (mut data_bytes, mut zero_bytes) = (0u64, 0u64);
        for e in plan {
            match e.status {
                ExtentStatus::Zero | ExtentStatus::AllocatedZero => {
                    if i > 0 {
                        img.write_zeroes(e.offset, e.length, true)?;
                    }
                    zero_bytes += e.length;
                    done += e.length;
                }
                _ => {
                    let end = e.offset + e.length;
                    let mut pos = e.offset;
                    while pos < end {
                        let n = (end - pos).min(COPY_CHUNK as u64);
                        // Straight from the layer's mapping when its data is cached
                        // and contiguous in the file; else through `buf`.
                        let lent = reader
                            .with_mapped(pos, n, |data| copy_chunk(&img, data, pos, cs, i == 0))?;
                        if lent.is_none() {
                            buf.resize(n as usize, 0);
                            reader.read_at(&mut buf, pos)?;
                            copy_chunk(&img, &buf, pos, cs, i == 0)?;
                        }
                        pos += n;
                        done += n;
                        progress(done, total);
                    }
                    data_bytes += e.length;
                }
            }
        }
        let snapshot = names.get(i).cloned();
        if let Some(name) = &snapshot {
            img.snapshot(DEFAULT_VDI, name)?;
        }
        layers.push(ImportedLayer {
            path: layer.path.clone(),
            format: layer.format,
            virtual_size: layer.virtual_size,
            snapshot,
            data_bytes,
            zero_bytes,
        });
        progress(done, total);
    }
    let virtual_size = img.size();
    img.close()?;
    Ok(ImportReport {
        layers,
        virtual_size,
        cluster_size: cs,
    })
}

/// Writes `buf` (the layer's data at `offset`) into the default VDI: cluster-aligned
/// blocks of zeros become zero clusters (nothing at all on the bottom layer, where
/// the image reads zeros already), the rest is written.
fn copy_chunk(img: &Image, buf: &[u8], offset: u64, cs: u64, bottom: bool) -> Result<()> {
    let end = offset + buf.len() as u64;
    let mut pos = offset;
    let mut run: Option<u64> = None;
    let flush = |start: u64, stop: u64| -> Result<()> {
        img.write_at(
            &buf[(start - offset) as usize..(stop - offset) as usize],
            start,
        )
    };
    while pos < end {
        let next = ((pos / cs) + 1).saturating_mul(cs).min(end);
        let block = &buf[(pos - offset) as usize..(next - offset) as usize];
        let zero = block.iter().all(|&b| b == 0);
        if zero {
            if let Some(start) = run.take() {
                flush(start, pos)?;
            }
            if !bottom {
                img.write_zeroes(pos, next - pos, true)?;
            }
        } else if run.is_none() {
            run = Some(pos);
        }
        pos = next;
    }
    if let Some(start) = run {
        flush(start, end)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_rule() {
        let long = format!("{}.qcow2", "x".repeat(200));
        let paths = [
            "/a/base.qcow2",
            "/b/base.qcow2",
            "/c/base.raw",
            "snap 1:2.qcow2",
            ".hidden.qcow2",
            "-dash.img",
            "default.qcow2",
            "disk.2024.qcow2",
            &long,
            &long,
            "/",
        ];
        let paths: Vec<&Path> = paths.iter().map(Path::new).collect();
        let names = snapshot_names(&paths);
        assert_eq!(names[0], "base");
        assert_eq!(names[1], "base-2");
        assert_eq!(names[2], "base-3");
        assert_eq!(names[3], "snap_1_2");
        assert_eq!(names[4], "_hidden");
        assert_eq!(names[5], "_dash");
        assert_eq!(names[6], "default-2");
        assert_eq!(names[7], "disk.2024");
        assert_eq!(names[8], "x".repeat(128));
        assert_eq!(names[9], format!("{}-2", "x".repeat(126)));
        assert_eq!(names[10], "layer");
        for n in &names {
            crate::vdi::validate_name(n).unwrap();
        }
    }
}
