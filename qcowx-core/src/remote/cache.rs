//! The local cache of a remote base: one file per record read from the store (its
//! decoded guest bytes behind a CRC-32C), in a folder, within a byte bound. The least
//! recently used files go first when a new one would pass the bound; a file whose
//! checksum fails is dropped and read from the store again.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::RemoteError;

/// Bytes before the data in a cache file: magic and CRC-32C of the data.
const FILE_HEAD: usize = 8;
const FILE_MAGIC: [u8; 4] = *b"QXC1";
const SUFFIX: &str = ".rec";

#[derive(Debug, Default)]
struct State {
    /// Bytes of the cache files.
    used: u64,
    /// Use counter, for least-recently-used order.
    tick: u64,
    /// File name → (bytes, last use).
    files: HashMap<String, (u64, u64)>,
}

/// A bounded folder of cached records.
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    cap: u64,
    state: Mutex<State>,
}

impl Cache {
    /// Opens (creating it if needed) the cache folder `dir` with bound `cap` bytes;
    /// files already there count against it, oldest first out.
    pub fn open(dir: &Path, cap: u64) -> Result<Cache, RemoteError> {
        let err = |op: &'static str, source: std::io::Error| RemoteError::Cache {
            dir: dir.display().to_string(),
            op,
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| err("create", e))?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| err("list", e))? {
            let entry = entry.map_err(|e| err("list", e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let Ok(meta) = entry.metadata() else { continue };
            if !name.ends_with(SUFFIX) {
                // A temporary file a killed process left.
                if name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
                continue;
            }
            let mtime = meta.modified().ok();
            found.push((mtime, name, meta.len()));
        }
        found.sort();
        let mut state = State::default();
        for (_, name, len) in found {
            state.tick += 1;
            state.used += len;
            state.files.insert(name, (len, state.tick));
        }
        let cache = Cache {
            dir: dir.to_path_buf(),
            cap,
            state: Mutex::new(state),
        };
        cache.evict_to(
            &mut cache.state.lock().unwrap_or_else(|e| e.into_inner()),
            cap,
        );
        Ok(cache)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes the cache files take now.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file_name(key: &str) -> String {
        format!("{key}{SUFFIX}")
    }

    /// The cached bytes of `key` into `out` (exactly `len` bytes), if they are there
    /// and verify.
    pub fn get(&self, key: &str, len: usize, out: &mut Vec<u8>) -> bool {
        let name = Cache::file_name(key);
        if !self.lock().files.contains_key(&name) {
            return false;
        }
        let path = self.dir.join(&name);
        let ok = match std::fs::read(&path) {
            Ok(bytes) if bytes.len() == FILE_HEAD + len && bytes[..4] == FILE_MAGIC => {
                let crc = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
                if crc32c::crc32c(&bytes[FILE_HEAD..]) == crc {
                    out.clear();
                    out.extend_from_slice(&bytes[FILE_HEAD..]);
                    true
                } else {
                    false
                }
            }
            _ => false,
        };
        let mut st = self.lock();
        if ok {
            st.tick += 1;
            let tick = st.tick;
            if let Some(f) = st.files.get_mut(&name) {
                f.1 = tick;
            }
        } else if let Some((len, _)) = st.files.remove(&name) {
            // Damaged or gone: forget it; the store has the bytes.
            st.used -= len;
            let _ = std::fs::remove_file(&path);
        }
        ok
    }

    /// Caches `data` as `key`, making room by dropping the least recently used
    /// files. Data larger than the whole bound is not cached.
    pub fn put(&self, key: &str, data: &[u8]) -> Result<(), RemoteError> {
        let size = (FILE_HEAD + data.len()) as u64;
        if size > self.cap {
            return Ok(());
        }
        let name = Cache::file_name(key);
        let mut st = self.lock();
        if st.files.contains_key(&name) {
            return Ok(());
        }
        self.evict_to(&mut st, self.cap - size);
        let tmp = self.dir.join(format!("{key}.tmp"));
        let err = |op: &'static str, source: std::io::Error| RemoteError::Cache {
            dir: self.dir.display().to_string(),
            op,
            source,
        };
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&FILE_MAGIC)?;
            f.write_all(&crc32c::crc32c(data).to_be_bytes())?;
            f.write_all(data)?;
            std::fs::rename(&tmp, self.dir.join(&name))
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(err("write", e));
        }
        st.tick += 1;
        let tick = st.tick;
        st.used += size;
        st.files.insert(name, (size, tick));
        Ok(())
    }

    /// Drops least recently used files until at most `limit` bytes are used.
    fn evict_to(&self, st: &mut State, limit: u64) {
        if st.used <= limit {
            return;
        }
        let mut by_age: Vec<(u64, String, u64)> = st
            .files
            .iter()
            .map(|(n, &(len, tick))| (tick, n.clone(), len))
            .collect();
        by_age.sort();
        for (_, name, len) in by_age {
            if st.used <= limit {
                break;
            }
            let _ = std::fs::remove_file(self.dir.join(&name));
            st.files.remove(&name);
            st.used -= len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_its_bound_and_drops_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path(), 3 * 1032).unwrap();
        for i in 0..10u8 {
            c.put(&format!("k{i}"), &[i; 1024]).unwrap();
            assert!(c.used() <= 3 * 1032);
        }
        let mut out = Vec::new();
        assert!(!c.get("k0", 1024, &mut out));
        assert!(c.get("k9", 1024, &mut out));
        assert_eq!(out, [9u8; 1024]);
        let f = dir.path().join("k9.rec");
        let mut b = std::fs::read(&f).unwrap();
        b[100] ^= 1;
        std::fs::write(&f, b).unwrap();
        assert!(!c.get("k9", 1024, &mut out));
        assert!(!f.exists());
        // Reopened, the files there count.
        drop(c);
        let c = Cache::open(dir.path(), 1032).unwrap();
        assert!(c.used() <= 1032);
    }
}
