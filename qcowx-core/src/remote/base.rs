//! A snapshot in an object store as a read-only backing layer, read on demand.
//!
//! Opening loads the manifest and the index of each stream of the snapshot's chain
//! (bounded by the disk's size) and maps every guest range to the newest record that
//! covers it. A read of a data range fetches that record with one ranged GET,
//! verifies it (its crc, its fields against the index) and decodes it with the
//! stream decoder, then keeps it in the local [`Cache`]; a read of a cached record,
//! or of a zero range, makes no request.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::cache::Cache;
use super::RemoteError;
use super::{Store, StoreConfig, ENV_CACHE_BYTES, ENV_CACHE_DIR};
use crate::engine::backing::Layer;
use crate::engine::{Extent, ExtentStatus};
use crate::error::{Error, Result};
use crate::format::remote::{max_index_bytes, Index, IndexEntry, RemoteBase};
use crate::format::stream::{
    record_data, RecordHeader, RecordKind, RECORD_HEADER_BYTES, STREAM_HEADER_BYTES,
};

/// Where a guest range's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    /// A zero or discard record.
    Zero,
    /// Entry `entry` of stream `stream` of the chain.
    Data { stream: usize, entry: usize },
}

/// One stream of the chain.
#[derive(Debug)]
struct Stream {
    uid: u64,
    key: String,
    index: Index,
}

/// Decoded records kept in memory besides the cache folder, so that reads of a
/// record's clusters one by one decode it once.
const RECENT: usize = 4;

/// A pushed snapshot read on demand (see the module docs).
#[derive(Debug)]
pub struct RemoteLayer {
    store: Store,
    name: String,
    size: u64,
    streams: Vec<Stream>,
    /// Start → (end, source); non-overlapping. Ranges in no piece read as zeros.
    map: BTreeMap<u64, (u64, Src)>,
    cache: Cache,
    recent: Mutex<VecDeque<(String, Arc<Vec<u8>>)>>,
}

/// Puts `src` over `[s, e)` in `map`, trimming what it covers.
fn overlay(map: &mut BTreeMap<u64, (u64, Src)>, s: u64, e: u64, src: Src) {
    let mut hit: Vec<u64> = Vec::new();
    if let Some((&ps, &(pe, _))) = map.range(..s).next_back() {
        if pe > s {
            hit.push(ps);
        }
    }
    hit.extend(map.range(s..e).map(|(&ps, _)| ps));
    for ps in hit {
        let Some((pe, psrc)) = map.remove(&ps) else {
            continue;
        };
        if ps < s {
            map.insert(ps, (s, psrc));
        }
        if pe > e {
            map.insert(e, (pe, psrc));
        }
    }
    map.insert(s, (e, src));
}

impl RemoteLayer {
    /// Opens the base `base` of the image `image` (at `image_path`): the store from
    /// the environment (the endpoint recorded in the base unless one is set), its
    /// manifest and the indexes of the snapshot's chain, and the cache folder.
    pub fn open(image: &str, image_path: Option<&Path>, base: &RemoteBase) -> Result<RemoteLayer> {
        let wrap = |e: Error| Error::Backing {
            file: image.to_string(),
            why: format!("remote base {} (snapshot uid {:016x})", base.url, base.uid),
            source: Some(Box::new(e)),
        };
        let cfg = StoreConfig::from_env(Some(&base.endpoint)).map_err(|e| wrap(e.into()))?;
        let store = Store::open(&base.url, &cfg).map_err(|e| wrap(e.into()))?;
        let cache_bytes = match std::env::var(ENV_CACHE_BYTES) {
            Ok(v) => crate::size::parse_size(&v).map_err(|e| {
                wrap(Error::InvalidArgument(format!(
                    "{ENV_CACHE_BYTES}={v}: {e}"
                )))
            })?,
            Err(_) => base.cache_bytes,
        };
        let dir = match (std::env::var_os(ENV_CACHE_DIR), image_path) {
            (Some(d), _) => std::path::PathBuf::from(d),
            (None, Some(p)) => {
                let mut d = p.as_os_str().to_owned();
                d.push(".qcowx-cache");
                d.into()
            }
            (None, None) => std::env::temp_dir().join(format!("qcowx-cache-{:016x}", base.uid)),
        };
        Self::load(store, base.uid, &dir, cache_bytes).map_err(wrap)
    }

    /// The layer of snapshot `uid` of `store`, caching into `dir` within `cache_bytes`.
    pub fn load(store: Store, uid: u64, dir: &Path, cache_bytes: u64) -> Result<RemoteLayer> {
        let manifest = store.manifest()?;
        let chain = manifest.chain(uid).ok_or_else(|| RemoteError::NoSnapshot {
            url: store.url().to_string(),
            name: format!("uid {uid:016x} (or a base of its chain)"),
            listed: super::listed(&manifest),
        })?;
        let top = chain.last().map_or(0, |e| e.virtual_size);
        let bucket = store.client().bucket().to_string();
        let mut streams = Vec::with_capacity(chain.len());
        let mut map = BTreeMap::new();
        for e in &chain {
            let key = store.index_key(e.uid);
            let size = |why: String| RemoteError::Size {
                bucket: bucket.clone(),
                key: key.clone(),
                why,
            };
            if e.virtual_size != top {
                return Err(size(format!(
                    "its snapshot is {} bytes, the top of the chain {top}",
                    e.virtual_size
                ))
                .into());
            }
            let max = max_index_bytes(top);
            if e.index_len > max {
                return Err(size(format!(
                    "the manifest gives it {} bytes, more than a disk of {top} bytes needs",
                    e.index_len
                ))
                .into());
            }
            let bytes = store.client().get(&key, e.index_len)?;
            if bytes.len() as u64 != e.index_len {
                return Err(size(format!(
                    "{} bytes, where the manifest says {}",
                    bytes.len(),
                    e.index_len
                ))
                .into());
            }
            let index =
                Index::decode(&bytes, top, e.stream_len).map_err(|source| RemoteError::Layout {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    source,
                })?;
            let stream = streams.len();
            for (i, r) in index.entries.iter().enumerate() {
                let src = match r.kind {
                    RecordKind::Data => Src::Data { stream, entry: i },
                    _ => Src::Zero,
                };
                overlay(&mut map, r.offset, r.offset + r.length, src);
            }
            streams.push(Stream {
                uid: e.uid,
                key: store.stream_key(e.uid),
                index,
            });
        }
        let name_of = chain.last().map_or("", |e| e.name.as_str());
        Ok(RemoteLayer {
            name: format!("{}@{name_of}", store.url()),
            cache: Cache::open(dir, cache_bytes)?,
            store,
            size: top,
            streams,
            map,
            recent: Mutex::new(VecDeque::new()),
        })
    }

    /// Requests sent to the store so far.
    pub fn requests(&self) -> u64 {
        self.store.client().requests()
    }

    /// The cache.
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The decoded bytes of entry `entry` of stream `stream`: from memory, the cache
    /// or the store.
    fn record(&self, stream: usize, entry: usize) -> Result<Arc<Vec<u8>>> {
        let s = &self.streams[stream];
        let e: &IndexEntry = &s.index.entries[entry];
        let key = format!("{:016x}-{:012x}", s.uid, e.object_offset);
        {
            let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, d)) = recent.iter().find(|(k, _)| *k == key) {
                return Ok(d.clone());
            }
        }
        let mut data = Vec::new();
        if !self.cache.get(&key, e.length as usize, &mut data) {
            data = self.fetch(s, e)?;
            self.cache.put(&key, &data)?;
        }
        let data = Arc::new(data);
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() >= RECENT {
            recent.pop_front();
        }
        recent.push_back((key, data.clone()));
        Ok(data)
    }

    /// Fetches one record with a ranged GET and decodes it, refusing it unless it is
    /// the record the index describes.
    fn fetch(&self, s: &Stream, e: &IndexEntry) -> Result<Vec<u8>> {
        let start = e.object_offset;
        let end = start + u64::from(e.stored_len) - 1;
        let bytes = self.store.client().get_range(&s.key, start, end)?;
        let refuse = |why: String| -> Error {
            RemoteError::Record {
                bucket: self.store.client().bucket().to_string(),
                key: s.key.clone(),
                start,
                end,
                why,
            }
            .into()
        };
        if start < STREAM_HEADER_BYTES as u64 || bytes.len() < RECORD_HEADER_BYTES {
            return Err(refuse("shorter than a record header".into()));
        }
        let (head, payload) = bytes.split_at(RECORD_HEADER_BYTES);
        let head: &[u8; RECORD_HEADER_BYTES] = head.try_into().expect("split at the header");
        let rec = RecordHeader::decode(head, start).map_err(|e| refuse(e.to_string()))?;
        let computed = RecordHeader::computed_crc(head, payload);
        if computed != rec.crc || rec.crc != e.crc {
            return Err(refuse(format!(
                "checksum mismatch (stored {:#010x}, computed {computed:#010x}, index {:#010x})",
                rec.crc, e.crc
            )));
        }
        if rec.kind != e.kind
            || rec.offset != e.offset
            || rec.length != e.length
            || rec.compressed != e.compressed
            || rec.payload_len as usize != payload.len()
        {
            return Err(refuse(
                "the record is not the one its index describes".into(),
            ));
        }
        let mut out = Vec::new();
        record_data(&rec, payload, &mut out).map_err(refuse)?;
        Ok(out)
    }
}

impl Layer for RemoteLayer {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_layer(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let piece = self
                .map
                .range(..=at)
                .next_back()
                .filter(|(_, &(pe, _))| pe > at)
                .map(|(&ps, &(pe, src))| (ps, pe, src));
            let (stop, src) = match piece {
                Some((_, pe, src)) => (pe.min(end), Some(src)),
                None => {
                    let next = self.map.range(at..).next().map_or(end, |(&s, _)| s);
                    (next.min(end), None)
                }
            };
            let dst = &mut buf[(at - offset) as usize..(stop - offset) as usize];
            match src {
                Some(Src::Data { stream, entry }) => {
                    let data = self.record(stream, entry)?;
                    let from = (at - self.streams[stream].index.entries[entry].offset) as usize;
                    dst.copy_from_slice(&data[from..from + dst.len()]);
                }
                _ => dst.fill(0),
            }
            at = stop;
        }
        Ok(())
    }

    fn layer_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |s: u64, e: u64, status: ExtentStatus| {
            if e <= s {
                return;
            }
            match out.last_mut() {
                Some(l) if l.status == status && l.offset + l.length == s => l.length += e - s,
                _ => out.push(Extent {
                    offset: s,
                    length: e - s,
                    status,
                    depth: 0,
                    host_offset: None,
                }),
            }
        };
        let mut at = offset;
        let first = self
            .map
            .range(..=offset)
            .next_back()
            .map_or(offset, |(&s, _)| s);
        for (&s, &(e, src)) in self.map.range(first..end) {
            if e <= at {
                continue;
            }
            push(at, s.max(at), ExtentStatus::Unallocated);
            let status = match src {
                Src::Data { .. } => ExtentStatus::Data,
                Src::Zero => ExtentStatus::Zero,
            };
            push(s.max(at), e.min(end), status);
            at = e.min(end);
        }
        push(at, end, ExtentStatus::Unallocated);
        Ok(out)
    }

    fn chain_len(&self) -> u32 {
        1
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn remote_requests(&self) -> Option<u64> {
        Some(self.requests())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_keeps_the_newest_source() {
        let mut m = BTreeMap::new();
        overlay(&mut m, 0, 100, Src::Zero);
        overlay(
            &mut m,
            40,
            60,
            Src::Data {
                stream: 1,
                entry: 0,
            },
        );
        overlay(&mut m, 50, 200, Src::Zero);
        let v: Vec<_> = m.into_iter().collect();
        assert_eq!(
            v,
            [
                (0, (40, Src::Zero)),
                (
                    40,
                    (
                        50,
                        Src::Data {
                            stream: 1,
                            entry: 0
                        }
                    )
                ),
                (50, (200, Src::Zero)),
            ]
        );
    }
}
