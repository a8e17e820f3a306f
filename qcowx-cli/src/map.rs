//! `qemu-img map` for any root: where each guest range of a VDI or snapshot comes
//! from, as `qemu-img map --output=json` reports it for an image, and both ways of
//! printing it ([`map_json`], [`map_human`]).
//!
//! [`map_range`] turns [`Image::block_status`] extents into [`MapExtent`]s with QEMU's
//! flags (`present`, `zero`, `data`, `compressed`), `depth` and host `offset`:
//!
//! - data stored in a qcow2 layer: `data`, with the host offset unless compressed;
//! - zero clusters: `zero` (present, no offset);
//! - data clusters the file holds a hole under (never written: metadata
//!   preallocation): `data` and `zero`, with the host offset, as QEMU asks the file
//!   system;
//! - a raw layer: its data ranges are `data` and its holes `zero`, both present and
//!   with the offset (the file system reports holes, as QEMU asks it);
//! - unallocated ranges: not present, `zero`, at the depth of the last layer that
//!   covers the range (a range past the end of a backing file stops there, as QEMU
//!   stops), with the host offset when that layer keeps a host cluster there;
//! - adjacent extents merge when every flag, the depth and the file agree and their
//!   offsets are contiguous (or both absent), as `qemu-img map` merges them.
//!
//! Zero clusters that keep a preallocated host cluster (QCOW2's "zero, allocated")
//! and unallocated subclusters of an allocated cluster (extended L2 entries) are
//! reported with their host offset, in any layer, as QEMU reports them: block status
//! does not give those offsets, [`KeptHosts`] (the library's) does.

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use qcowx_core::engine::backing;
use qcowx_core::engine::chain::{backing_chain, raw_extents, ChainLayer, ImageFormat};
use qcowx_core::engine::STATUS_WINDOW;
use qcowx_core::vdi::kept_hosts::KeptHosts;
use qcowx_core::vdi::DEFAULT_VDI;
use qcowx_core::{Error, Extent, ExtentStatus, Image, LockMode, OpenOptions, Result};
use serde_json::{json, Map, Value};

/// One extent of a map, as `qemu-img map --output=json` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapExtent {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// The layer that answered: 0 the image itself, 1 its backing file, …
    pub depth: u32,
    /// Allocated in some layer (false: reads from nowhere, as zeros).
    pub present: bool,
    /// Reads as zeros (known without reading).
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the layer's file, when the data (or a raw hole) has one.
    pub offset: Option<u64>,
    /// The layer's file (as opened: relative backing names resolved against the
    /// folder of the image naming them).
    pub file: PathBuf,
}

impl MapExtent {
    fn mergeable(&self, next: &MapExtent) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.file == next.file
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

fn push(out: &mut Vec<MapExtent>, e: MapExtent) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.mergeable(&e) {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}

/// The map of root `root` of `img` (a VDI or snapshot name; `None` or `"default"` for
/// the default VDI): of the `len` bytes at `start` (cut at the end of the disk; `0` and
/// `u64::MAX` for the whole disk), as `qemu-img map --start-offset --max-length` maps
/// them.
///
/// The backing chain's files are opened again (read-only, without their own backing
/// files, with `lock`) for their sizes, their tables and, for a raw base, its holes:
/// pass the lock `img` was opened with ([`LockMode::ForceShare`] for an image in use).
/// `img` itself is not opened again, so an image this process holds open for writing
/// maps with [`LockMode::Shared`] too.
pub fn map_range(
    img: &Arc<Image>,
    root: Option<&str>,
    lock: LockMode,
    start: u64,
    len: u64,
) -> Result<Vec<MapExtent>> {
    let top = img
        .path()
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: map needs an image opened from a file",
                img.file_name()
            ))
        })?
        .to_path_buf();
    // Layer 0 is the image itself; its backing chain follows.
    let mut chain: Vec<ChainLayer> = vec![ChainLayer {
        path: top.clone(),
        format: ImageFormat::Qcow2,
        virtual_size: img.size(),
        cluster_size: Some(img.cluster_size()),
    }];
    // The chain is walked from the backing file down, never through the top file:
    // `img` holds the top's lock (a writer's lock refuses a second open, whatever its
    // mode), while a writer holds its backing files shared, as `lock` opens them.
    let info = img.info()?;
    if let (Some(_), Some(name)) = (img.backing(), info.backing_file.as_deref()) {
        let format = info
            .backing_format
            .as_deref()
            .map(ImageFormat::from_name)
            .transpose()?;
        let below = backing::resolve(Some(&top), name);
        chain.extend(backing_chain(&below, format, lock)?);
    }
    // A base in an object store answers below the last local layer; its extents name
    // the store.
    let remote = match &info.remote_base {
        Some(Ok(b)) if img.backing().is_some() => Some(PathBuf::from(&b.url)),
        _ => None,
    };
    let raw_base = match chain.last() {
        Some(l) if l.format == ImageFormat::Raw => {
            Some(std::fs::File::open(&l.path).map_err(|source| Error::Io {
                file: l.path.display().to_string(),
                op: "open",
                offset: 0,
                source,
            })?)
        }
        _ => None,
    };
    let name = root.unwrap_or(DEFAULT_VDI);
    let disk = img.open_root(name)?;
    let size = disk.size();
    let mut m = Mapper {
        chain,
        remote,
        raw: raw_base,
        tables: Vec::new(),
        lock,
        out: Vec::new(),
    };
    m.tables.push(Some(KeptHosts::new(Arc::clone(img), name)?));
    let end = start.saturating_add(len).min(size);
    let mut window = start.min(end);
    while window < end {
        let wlen = STATUS_WINDOW.min(end - window);
        for e in disk.block_status(window, wlen)? {
            m.convert(&e)?;
        }
        window += wlen;
    }
    Ok(m.out)
}

/// Turns core extents into map extents.
struct Mapper {
    chain: Vec<ChainLayer>,
    /// The object store below the chain, when the last layer reads from one.
    remote: Option<PathBuf>,
    raw: Option<std::fs::File>,
    /// Tables per depth, opened when first needed (`None`: a raw layer).
    tables: Vec<Option<KeptHosts>>,
    lock: LockMode,
    out: Vec<MapExtent>,
}

impl Mapper {
    fn file(&self, d: u32) -> PathBuf {
        if let Some(url) = self
            .remote
            .as_ref()
            .filter(|_| d as usize >= self.chain.len())
        {
            return url.clone();
        }
        self.chain
            .get(d as usize)
            .or(self.chain.last())
            .map(|l| l.path.clone())
            .unwrap_or_default()
    }

    fn tables(&mut self, d: u32) -> Result<Option<&mut KeptHosts>> {
        let d = d as usize;
        while self.tables.len() <= d {
            let i = self.tables.len();
            let t = match self.chain.get(i) {
                Some(l) if l.format == ImageFormat::Qcow2 => {
                    let img = OpenOptions::new()
                        .lock(self.lock)
                        .open_backing(false)
                        .open(&l.path)?;
                    Some(KeptHosts::new(Arc::new(img), DEFAULT_VDI)?)
                }
                _ => None,
            };
            self.tables.push(t);
        }
        Ok(self.tables[d].as_mut())
    }

    /// Pushes `[start, end)` at depth `d` with the given flags, with the host offsets
    /// the layer keeps there.
    fn with_offsets(&mut self, start: u64, end: u64, d: u32, present: bool) -> Result<()> {
        let file = self.file(d);
        let mut pos = start;
        while pos < end {
            let (offset, run) = match self.tables(d)? {
                Some(t) => t.host_of(pos)?,
                None => (None, end - pos),
            };
            let n = run.min(end - pos).max(1);
            push(
                &mut self.out,
                MapExtent {
                    start: pos,
                    length: n,
                    depth: d,
                    present,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset,
                    file: file.clone(),
                },
            );
            pos += n;
        }
        Ok(())
    }

    /// Appends the map extents of core extent `e`.
    fn convert(&mut self, e: &Extent) -> Result<()> {
        let layer = self
            .chain
            .get(e.depth as usize)
            .or(self.chain.last())
            .cloned();
        match e.status {
            ExtentStatus::Data => {
                let is_raw = layer.as_ref().is_some_and(|l| l.format == ImageFormat::Raw);
                match (is_raw, &self.raw) {
                    (true, Some(f)) => {
                        let size = layer.as_ref().map_or(0, |l| l.virtual_size);
                        for r in raw_extents(f, size, e.offset, e.length) {
                            let data = r.status == ExtentStatus::Data;
                            let file = self.file(e.depth);
                            push(
                                &mut self.out,
                                MapExtent {
                                    start: r.offset,
                                    length: r.length,
                                    depth: e.depth,
                                    present: true,
                                    zero: !data,
                                    data,
                                    compressed: false,
                                    offset: r.host_offset,
                                    file,
                                },
                            );
                        }
                    }
                    _ => {
                        let file = self.file(e.depth);
                        let in_store =
                            self.remote.is_some() && e.depth as usize >= self.chain.len();
                        push(
                            &mut self.out,
                            MapExtent {
                                start: e.offset,
                                length: e.length,
                                depth: e.depth,
                                present: true,
                                zero: false,
                                data: true,
                                compressed: e.host_offset.is_none() && !in_store,
                                offset: e.host_offset,
                                file,
                            },
                        );
                    }
                }
            }
            ExtentStatus::AllocatedZero => {
                // A data cluster the file holds a hole under: QEMU's `data` and `zero`.
                let file = self.file(e.depth);
                push(
                    &mut self.out,
                    MapExtent {
                        start: e.offset,
                        length: e.length,
                        depth: e.depth,
                        present: true,
                        zero: true,
                        data: true,
                        compressed: false,
                        offset: e.host_offset,
                        file,
                    },
                );
            }
            ExtentStatus::Zero => {
                self.with_offsets(e.offset, e.offset + e.length, e.depth, true)?;
            }
            ExtentStatus::Unallocated => {
                // Walk down the chain: layer d+1 answers only for the part inside its
                // virtual size; past its end the range stops at layer d.
                let mut pieces: Vec<(u64, u64, u32)> = Vec::new();
                let mut todo = vec![(e.offset, e.offset + e.length, 0u32)];
                while let Some((start, end, d)) = todo.pop() {
                    let next_size = self.chain.get(d as usize + 1).map(|l| l.virtual_size);
                    match next_size {
                        Some(ns) if d < e.depth && ns > start => {
                            if ns < end {
                                pieces.push((ns, end, d));
                            }
                            todo.push((start, end.min(ns), d + 1));
                        }
                        _ => pieces.push((start, end, d)),
                    }
                }
                pieces.sort_unstable();
                for (start, end, d) in pieces {
                    self.with_offsets(start, end, d, false)?;
                }
            }
        }
        Ok(())
    }
}

/// `qcowx map --output=json`'s object: `extents` holds what `qemu-img map
/// --output=json` prints (see `spec/cli-json.md`).
pub fn map_json(filename: &str, root: &str, extents: &[MapExtent]) -> Value {
    let list: Vec<Value> = extents
        .iter()
        .map(|e| {
            let mut m = Map::new();
            m.insert("start".into(), json!(e.start));
            m.insert("length".into(), json!(e.length));
            m.insert("depth".into(), json!(e.depth));
            m.insert("present".into(), json!(e.present));
            m.insert("zero".into(), json!(e.zero));
            m.insert("data".into(), json!(e.data));
            m.insert("compressed".into(), json!(e.compressed));
            if let Some(o) = e.offset {
                m.insert("offset".into(), json!(o));
            }
            Value::Object(m)
        })
        .collect();
    json!({ "filename": filename, "root": root, "extents": list })
}

/// `qemu-img map`'s human table: the data extents and where they are stored.
pub fn map_human(out: &mut dyn Write, extents: &[MapExtent]) -> io::Result<()> {
    let hex = |v: u64| {
        if v == 0 {
            "0".to_string()
        } else {
            format!("{v:#x}")
        }
    };
    writeln!(
        out,
        "{:<16}{:<16}{:<16}File",
        "Offset", "Length", "Mapped to"
    )?;
    for e in extents.iter().filter(|e| e.data && !e.zero) {
        let mapped = match e.offset {
            Some(o) => hex(o),
            None => "compressed".to_string(),
        };
        writeln!(
            out,
            "{:<16}{:<16}{:<16}{}",
            hex(e.start),
            hex(e.length),
            mapped,
            e.file.display()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcowx_core::CreateOptions;

    #[test]
    fn data_zero_and_unallocated_like_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        let img = Arc::new(Image::create(&p, &CreateOptions::new(1 << 20)).unwrap());
        img.write_at(&[1u8; 65536], 0).unwrap();
        img.write_at(&[2u8; 65536], 65536).unwrap();
        img.write_at(&[9u8; 65536], 3 * 65536).unwrap();
        img.write_zeroes(3 * 65536, 65536, true).unwrap();
        img.write_at(&[3u8; 512], 4 * 65536).unwrap();
        let m = map_range(&img, None, LockMode::Shared, 0, u64::MAX).unwrap();
        assert_eq!(m[0].start, 0);
        assert_eq!(m[0].length, 2 * 65536, "{m:?}");
        assert!(m[0].data && m[0].present && !m[0].zero && m[0].offset.is_some());
        assert_eq!(
            (m[1].start, m[1].present, m[1].zero),
            (2 * 65536, false, true)
        );
        assert_eq!(
            (m[2].start, m[2].present, m[2].zero),
            (3 * 65536, true, true)
        );
        assert_eq!(m[2].offset, None);
        assert!(m[3].data);
        let total: u64 = m.iter().map(|e| e.length).sum();
        assert_eq!(total, 1 << 20);
        assert!(m.iter().all(|e| e.depth == 0 && e.file == p));
    }

    #[test]
    fn maps_an_overlay_this_process_holds_open_for_writing() {
        use qcowx_tests::{qemu_img_create, qemu_img_ok, qemu_io_ok};
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        qemu_img_create(&base, 1 << 20, "");
        qemu_io_ok("qcow2", &base, &["write -P 5 0 64k"]);
        let top_name = top.to_str().unwrap();
        let args = [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "base.qcow2",
        ];
        qemu_img_ok(&[&args[..], &[top_name]].concat());
        let img = Arc::new(OpenOptions::new().write(true).open(&top).unwrap());
        img.write_at(&[7u8; 65536], 65536).unwrap();
        for lock in [LockMode::Shared, LockMode::ForceShare] {
            let m = map_range(&img, None, lock, 0, u64::MAX)
                .unwrap_or_else(|e| panic!("{lock:?}: {e}"));
            let first = &m[0];
            assert_eq!(
                (first.start, first.length, first.depth),
                (0, 65536, 1),
                "{m:?}"
            );
            assert!(first.data && first.file.ends_with("base.qcow2"), "{m:?}");
            let second = &m[1];
            assert_eq!((second.start, second.depth), (65536, 0), "{m:?}");
            assert!(second.data && second.file == top, "{m:?}");
            assert_eq!(m.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
        }
        // The writer still writes after the map.
        img.write_at(&[8u8; 512], 0).unwrap();
        img.close().unwrap();
    }
}
