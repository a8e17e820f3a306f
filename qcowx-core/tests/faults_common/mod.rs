//! The failing storage and the helpers of the storage-fault tests (`faults_disk_full.rs`,
//! `faults_io_errors.rs`, `faults_gc_table.rs`).
//!
//! [`Faulty`] is an in-memory file that fails on demand: once it is "full", writes
//! that need a block not yet allocated fail with `ENOSPC` (what fits is written, as a
//! real short write leaves it; punched holes give space back), and the k-th write or sync of a run fails with `EIO`,
//! either once (a transient error) or from then on (a dead disk).

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use qcowx_core::storage::{MemStorage, Storage};
use qcowx_core::{CreateOptions, Error, Image, OpenOptions};

// ---- the failing storage -------------------------------------------------------------------

/// Which calls a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `write_at` (and `set_len`, `punch_hole`: every change of the file).
    Write,
    /// `sync_data`.
    Sync,
}

/// Fail the `index`-th call (1-based) of `kind` with `errno`; with `sticky`, fail
/// every later write and sync too.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub kind: Kind,
    pub index: u64,
    pub sticky: bool,
    pub errno: i32,
}

#[derive(Debug, Default)]
struct FaultState {
    writes: u64,
    syncs: u64,
    rule: Option<Rule>,
    dead: bool,
    /// 4 KiB blocks of the file that hold data (a sparse file's allocation).
    blocks: BTreeSet<u64>,
    /// At most this many blocks may be allocated (ENOSPC past it).
    budget: Option<usize>,
    /// The errors handed out, with the call index.
    failures: Vec<(Kind, u64)>,
}

/// The allocation unit of [`Faulty`]'s simulated file system.
const BLOCK: u64 = 4096;

#[derive(Debug, Default)]
pub struct Faulty {
    pub inner: MemStorage,
    state: Mutex<FaultState>,
}

impl Faulty {
    pub fn from_vec(data: Vec<u8>) -> Faulty {
        let blocks = (0..(data.len() as u64).div_ceil(BLOCK)).collect();
        Faulty {
            inner: MemStorage::from_vec(data),
            state: Mutex::new(FaultState {
                blocks,
                ..FaultState::default()
            }),
        }
    }

    /// Makes the file system full: no block beyond those allocated now.
    pub fn fill_up(&self) {
        let mut st = self.state.lock().unwrap();
        st.budget = Some(st.blocks.len());
    }

    pub fn set_rule(&self, rule: Option<Rule>) {
        let mut st = self.state.lock().unwrap();
        st.rule = rule;
        st.dead = false;
    }

    /// Space returns.
    pub fn free_up(&self) {
        self.state.lock().unwrap().budget = None;
    }

    pub fn counts(&self) -> (u64, u64) {
        let st = self.state.lock().unwrap();
        (st.writes, st.syncs)
    }

    pub fn failures(&self) -> Vec<(Kind, u64)> {
        self.state.lock().unwrap().failures.clone()
    }

    /// Counts a call of `kind`; `Err` if it must fail.
    fn enter(&self, kind: Kind) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        let n = match kind {
            Kind::Write => {
                st.writes += 1;
                st.writes
            }
            Kind::Sync => {
                st.syncs += 1;
                st.syncs
            }
        };
        if st.dead {
            st.failures.push((kind, n));
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if let Some(r) = st.rule {
            if r.kind == kind && r.index == n {
                st.dead = r.sticky;
                st.failures.push((kind, n));
                return Err(io::Error::from_raw_os_error(r.errno));
            }
        }
        Ok(())
    }
}

impl Storage for Faulty {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.enter(Kind::Write)?;
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let mut st = self.state.lock().unwrap();
        // Allocate the blocks in order; on a full file system the write stops at the
        // first block that has no room (a short write), then fails with ENOSPC.
        let mut room_until = end;
        for b in offset / BLOCK..end.div_ceil(BLOCK) {
            if st.blocks.contains(&b) {
                continue;
            }
            if st.budget.is_some_and(|max| st.blocks.len() >= max) {
                room_until = (b * BLOCK).max(offset);
                break;
            }
            st.blocks.insert(b);
        }
        drop(st);
        if room_until > offset {
            self.inner
                .write_at(&buf[..(room_until - offset) as usize], offset)?;
        }
        if room_until < end {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.enter(Kind::Write)?;
        self.state
            .lock()
            .unwrap()
            .blocks
            .retain(|&b| b < len.div_ceil(BLOCK));
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.enter(Kind::Sync)?;
        self.inner.sync_data()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.enter(Kind::Write)?;
        let whole = offset.div_ceil(BLOCK)..(offset + len) / BLOCK;
        self.state
            .lock()
            .unwrap()
            .blocks
            .retain(|b| !whole.contains(b));
        self.inner.punch_hole(offset, len)
    }

    fn path(&self) -> Option<&Path> {
        None
    }
}

// ---- helpers -------------------------------------------------------------------------------

pub fn rw() -> OpenOptions {
    OpenOptions::new().write(true)
}

pub fn os_error(e: &Error) -> Option<i32> {
    match e {
        Error::Io { source, .. } | Error::NoSpace { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

/// Content of a 512-byte sector written with `seed` at guest offset `offset`: the
/// offset, then the seed. Seed 0 is the never-written (zero) sector.
pub fn sector(seed: u8, offset: u64) -> [u8; 512] {
    let mut s = [0u8; 512];
    if seed != 0 {
        s[..8].copy_from_slice(&offset.to_le_bytes());
        s[8..].fill(seed);
    }
    s
}

pub fn data(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (0..len / 512)
        .flat_map(|i| sector(seed, offset + i * 512))
        .collect()
}

/// The `op` of an `Error::Io` ("write L2 table", "fdatasync", …).
pub fn io_op(e: &Error) -> String {
    match e {
        Error::Io { op, .. } | Error::NoSpace { op, .. } => (*op).to_string(),
        other => format!("{other:?}"),
    }
}

// ---- the test image -------------------------------------------------------------------------

pub const CS: u64 = 4096;
pub const SIZE: u64 = 8 << 20;

/// A new image (4 KiB clusters, 8 MiB disk) with `before` written at 0, closed.
pub fn base_image(before: &[u8]) -> Vec<u8> {
    let mem = Arc::new(MemStorage::new());
    let mut opts = CreateOptions::new(SIZE);
    opts.cluster_size = CS;
    let img = Image::create_in(mem.clone(), &opts).expect("create");
    img.write_at(before, 0).expect("write");
    img.close().expect("close");
    mem.to_vec()
}
