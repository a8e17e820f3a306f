//! The `image_ops` target: an image from hostile bytes, used every way the library
//! allows.
//!
//! An input is `IMAGE ‖ SCRIPT ‖ n`: its last byte `n` is the length of the op script
//! before it, and everything before the script is the image file (see [`split`] and
//! [`join`]). The image is first opened read-only, listed, checked, and read where
//! block status says there is data (every root). Then it is opened for writing (a
//! version 2 image upgraded first) and the script runs, at most [`MAX_OPS`] ops, each
//! decoded from a few script bytes (see [`Op`]). Finally the image is closed and
//! opened again.
//!
//! What must hold, whatever the bytes:
//! * nothing panics, hangs, or allocates without bound;
//! * a write or write-zeroes that succeeded reads back at once as written;
//! * an image that closed without error opens again — for writing, unless a write
//!   on its metadata was refused in the session (the image is then marked corrupt,
//!   as QEMU marks it): such an image opens read-only, and once a repair finds no
//!   corruption left it opens for writing again;
//! * once a write on metadata was refused, the handle changes nothing more: every
//!   later write, write-zeroes, discard, snapshot, fork, delete, revert, gc and
//!   resize (of a non-empty range, for the first three) fails;
//! * an image that checked clean (no corruption, no check error) after the writable
//!   open still checks clean after a successful gc and after close and reopen —
//!   unless its active layer maps one host cluster at two guest offsets. Such an
//!   image checks clean when its refcount says 2, but a write to one offset leaves the
//!   other link without the copied flag with a refcount of 1, in QEMU as in qcowx
//!   (`tests/damaged_more.rs` shows both); only a scan finds the other link.

use std::sync::Arc;

use qcowx_core::storage::MemStorage;
use qcowx_core::{Disk, ErrorKind, ExtentStatus, Image, OpenOptions, RootKind};

use crate::fixture;
use crate::script::Script;

/// Most ops run per input.
pub const MAX_OPS: usize = 64;
/// Largest read or write one op makes, in bytes.
pub const MAX_IO: u64 = 64 << 10;
/// Largest range one write-zeroes, discard or block status op covers, in bytes.
pub const MAX_RANGE: u64 = 16 << 20;
/// Bytes of data the read pass reads per root at most.
pub const READ_PASS_BYTES: u64 = 1 << 20;
/// Roots the read pass visits at most.
pub const READ_PASS_ROOTS: usize = 8;
/// Largest size a resize op asks for.
pub const MAX_RESIZE: u64 = 256 << 20;

/// Splits an input into the image bytes and the op script.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&n, rest)) = data.split_last() else {
        return (&[], &[]);
    };
    let n = usize::from(n).min(rest.len());
    rest.split_at(rest.len() - n)
}

/// The input [`split`] turns into `image` and `script` (at most 255 bytes of script;
/// the rest is dropped).
pub fn join(image: &[u8], script: &[u8]) -> Vec<u8> {
    let script = &script[..script.len().min(255)];
    let mut out = Vec::with_capacity(image.len() + script.len() + 1);
    out.extend_from_slice(image);
    out.extend_from_slice(script);
    out.push(script.len() as u8);
    out
}

/// An op script that touches every kind of op once or twice, for seeds: writes,
/// a snapshot, writes after it, a fork, a revert, deletes, gc, check, resize, close
/// and reopen, and reads of every root.
pub fn sample_script() -> Vec<u8> {
    let mut s = Vec::new();
    let mut op = |op: Op, args: &[u8]| {
        s.push(op.code());
        s.extend_from_slice(args);
    };
    // Root #0 (the default VDI): 8 KiB at sector 9, then zeroes over 64 KiB.
    op(Op::Write, &[0, 0, 0, 0, 0, 9, 0x20, 0, 0x31]);
    op(Op::WriteZeroes, &[0, 0x10, 0, 0, 0, 0x80, 0x80, 0, 1]);
    op(Op::Snapshot, &[0, 0]);
    op(Op::Write, &[0, 1, 0, 0, 0, 1, 7, 0x10, 0, 0x55]);
    op(Op::Fork, &[0, 2]);
    op(Op::Write, &[1, 0, 0, 0, 0, 0x40, 0x04, 0, 0x77]);
    op(Op::Discard, &[0, 0x30, 0, 0, 0, 0, 0x40, 0]);
    op(Op::BlockStatus, &[1, 0x60, 0, 0, 0, 0, 0xff, 0xff]);
    op(Op::Revert, &[0, 0]);
    op(Op::Snapshot, &[1, 3]);
    op(Op::DeleteSnapshot, &[0]);
    op(Op::DeleteVdi, &[1]);
    op(Op::Gc, &[]);
    op(Op::Resize, &[0, 0x10]);
    op(Op::Check, &[]);
    op(Op::Flush, &[]);
    op(Op::Reopen, &[]);
    op(Op::Read, &[0, 0, 0, 0, 0, 0, 0x10, 0]);
    op(Op::ReadAll, &[]);
    s
}

/// Runs one input (see the [module documentation](self)).
pub fn run(data: &[u8]) {
    let (image, script) = split(data);
    exercise(image, script);
}

/// Runs the read-only pass on `image`, then `script` on it opened for writing.
pub fn exercise(image: &[u8], script: &[u8]) {
    read_only_pass(image);
    let storage = Arc::new(MemStorage::from_vec(image.to_vec()));
    // Version 2 images are upgraded first, so hostile ones drive the upgrade too.
    let Ok(img) = fixture::open_upgrading(&storage) else {
        return;
    };
    let clean = img
        .check()
        .is_ok_and(|r| r.corruptions == 0 && r.check_errors == 0)
        && !maps_a_cluster_twice(&img);
    note(
        format_args!("opened for writing (checks clean: {clean})"),
        &img.list(),
    );
    let mut run = Runner {
        img,
        storage,
        clean,
        refused: false,
    };
    let mut s = Script::new(script);
    for _ in 0..MAX_OPS {
        if s.is_done() {
            break;
        }
        let op = Op::decode(&mut s);
        if !run.apply(op, &mut s) {
            return;
        }
    }
    run.close_and_reopen(false);
}

/// Opens `image` read-only; lists, checks and reads every root (bounded).
pub fn read_only_pass(image: &[u8]) {
    let Ok(img) = fixture::open(image, false) else {
        return;
    };
    let _ = img.info();
    let _ = img.check();
    read_roots(&img);
}

/// Whether the active layer maps one host cluster at two guest offsets (looked at in
/// its first [`MAX_RESIZE`] bytes; compressed clusters, which share host clusters by
/// design, report no host offset).
fn maps_a_cluster_twice(img: &Arc<Image>) -> bool {
    let Ok(d) = img.open_root("default") else {
        return false;
    };
    let Ok(extents) = d.block_status(0, d.size().min(MAX_RESIZE)) else {
        return false;
    };
    let cs = img.cluster_size();
    // Host cluster → the guest cluster mapping it (one guest cluster may show as
    // several extents, as subclusters do).
    let mut seen = std::collections::HashMap::new();
    for e in extents.iter().filter(|e| e.depth == 0 && e.length > 0) {
        let Some(host) = e.host_offset else { continue };
        let mut at = e.offset;
        while at < e.offset + e.length {
            let guest = at / cs;
            let hc = (host + (at - e.offset)) / cs;
            if *seen.entry(hc).or_insert(guest) != guest {
                return true;
            }
            at = (guest + 1) * cs;
        }
    }
    false
}

/// Reads the data of up to [`READ_PASS_ROOTS`] roots of `img` (where block status
/// says there is data, at most [`READ_PASS_BYTES`] per root).
pub fn read_roots(img: &Arc<Image>) {
    let roots = img.list().unwrap_or_default();
    for r in roots.iter().take(READ_PASS_ROOTS) {
        if let Ok(d) = img.open_root(&r.name) {
            read_data(&d);
        }
    }
}

fn read_data(d: &Disk) {
    let size = d.size();
    let Ok(extents) = d.block_status(0, size.min(MAX_RANGE)) else {
        // Block status failed: read the start of the disk anyway.
        let mut buf = vec![0u8; size.min(MAX_IO) as usize];
        let _ = d.read_at(&mut buf, 0);
        return;
    };
    let mut budget = READ_PASS_BYTES;
    let mut buf = Vec::new();
    for e in extents {
        if budget == 0 {
            break;
        }
        if e.status != ExtentStatus::Data {
            continue;
        }
        let mut off = e.offset;
        let end = e.offset.saturating_add(e.length).min(size);
        while off < end && budget > 0 {
            let n = (end - off).min(MAX_IO).min(budget);
            buf.resize(n as usize, 0);
            let _ = d.read_at(&mut buf, off);
            off += n;
            budget -= n;
        }
    }
}

/// Whether `QCOWX_FUZZ_TRACE` is set: ops and their results are then printed to
/// stderr (for triaging a failing input).
fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("QCOWX_FUZZ_TRACE").is_some())
}

/// Notes what an op did (see [`tracing`]).
fn note<T: std::fmt::Debug>(what: std::fmt::Arguments<'_>, r: &qcowx_core::Result<T>) {
    if tracing() {
        match r {
            Ok(v) => eprintln!("{what}: ok {v:?}"),
            Err(e) => eprintln!("{what}: {e}"),
        }
    }
}

/// One decoded op. Roots and names are chosen by script bytes among the image's
/// current roots (see [`Runner::apply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read from a root.
    Read,
    /// Write a pattern to a root and read it back.
    Write,
    /// Write-zeroes on a root (with or without unmap) and read it back.
    WriteZeroes,
    /// Discard a range of a root.
    Discard,
    /// Snapshot a VDI.
    Snapshot,
    /// Fork a snapshot into a new VDI.
    Fork,
    /// Delete a snapshot.
    DeleteSnapshot,
    /// Delete a VDI.
    DeleteVdi,
    /// Revert a VDI to a snapshot.
    Revert,
    /// Collect garbage.
    Gc,
    /// Check the image.
    Check,
    /// Flush.
    Flush,
    /// Block status of a range of a root.
    BlockStatus,
    /// Grow the virtual disk.
    Resize,
    /// Close the image and open it again for writing.
    Reopen,
    /// Read every root (the read pass).
    ReadAll,
    /// Close as a version 2 image (`amend -o compat=0.10`) and open it again with
    /// the upgrade to version 3: the default VDI must read as before. Op code 255
    /// only, so that the other codes decode as before it existed.
    Downgrade,
}

impl Op {
    const ALL: [Op; 16] = [
        Op::Read,
        Op::Write,
        Op::WriteZeroes,
        Op::Discard,
        Op::Snapshot,
        Op::Fork,
        Op::DeleteSnapshot,
        Op::DeleteVdi,
        Op::Revert,
        Op::Gc,
        Op::Check,
        Op::Flush,
        Op::BlockStatus,
        Op::Resize,
        Op::Reopen,
        Op::ReadAll,
    ];

    /// Decodes the op code (one byte).
    pub fn decode(s: &mut Script<'_>) -> Op {
        match s.u8() {
            DOWNGRADE_CODE => Op::Downgrade,
            b => Op::ALL[usize::from(b) % Op::ALL.len()],
        }
    }

    /// The op code byte of `self`.
    pub fn code(self) -> u8 {
        match self {
            Op::Downgrade => DOWNGRADE_CODE,
            op => Op::ALL.iter().position(|&o| o == op).unwrap_or(0) as u8,
        }
    }
}

/// The op code of [`Op::Downgrade`].
const DOWNGRADE_CODE: u8 = 255;

/// The writable image an op script drives.
struct Runner {
    img: Arc<Image>,
    /// Where the image lives.
    storage: Arc<MemStorage>,
    /// The image checked clean after the writable open.
    clean: bool,
    /// A write on metadata was refused through the current handle: the image is
    /// marked corrupt and the handle must change nothing more.
    refused: bool,
}

/// A name from a small set (so that names collide), or now and then an invalid one.
fn name(s: &mut Script<'_>, prefix: &str) -> String {
    match s.u8() {
        255 => String::new(),
        254 => "-bad".into(),
        253 => "x".repeat(200),
        252 => "default".into(),
        b => format!("{prefix}{}", b % 6),
    }
}

/// An offset and length inside a disk of `size` bytes: small ones (up to
/// [`MAX_IO`]) or, with `big`, up to [`MAX_RANGE`]. One time in eight the range may
/// run past the end.
fn range(s: &mut Script<'_>, size: u64, big: bool) -> (u64, u64) {
    let sel = s.u8();
    let mut off = (u64::from(s.u32()) << 9).checked_rem(size).unwrap_or(0);
    if sel & 1 != 0 {
        off += u64::from(s.u8());
    }
    let mut len = u64::from(s.u16());
    if big {
        len = (len << (sel >> 4)).min(MAX_RANGE);
    } else {
        len = len.min(MAX_IO);
    }
    if sel & 0x0e != 0x0e {
        off = off.min(size);
        len = len.min(size - off);
    }
    (off, len)
}

impl Runner {
    fn roots(&self, kind: Option<RootKind>) -> Vec<String> {
        self.img
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter(|r| kind.is_none_or(|k| r.kind == k))
            .map(|r| r.name)
            .collect()
    }

    fn pick(&self, s: &mut Script<'_>, kind: Option<RootKind>) -> Option<String> {
        let roots = self.roots(kind);
        let i = s.pick(roots.len());
        roots.into_iter().nth(i)
    }

    fn disk(&self, s: &mut Script<'_>) -> Option<Disk> {
        let name = self.pick(s, None)?;
        self.img.open_root(&name).ok()
    }

    fn assert_clean(&self, when: &str) {
        if !self.clean {
            return;
        }
        match self.img.check() {
            Ok(r) => assert!(
                r.corruptions == 0 && r.check_errors == 0,
                "the image checked clean when opened, but not {when}: {:?}",
                r.messages
            ),
            Err(e) => panic!("the image checked clean when opened, but check fails {when}: {e}"),
        }
    }

    /// Closes the image and opens it again (for writing with `write`). Returns false
    /// when the close failed (the script then stops).
    fn close_and_reopen(&mut self, write: bool) -> bool {
        let r = self.img.close();
        note(format_args!("close"), &r);
        if r.is_err() {
            return false;
        }
        if self.refused {
            return self.reopen_after_refusal();
        }
        let img = fixture::open_in(&self.storage, write).unwrap_or_else(|e| {
            panic!("an image qcowx closed without error does not open again: {e}")
        });
        self.img = img;
        self.assert_clean("after close and reopen");
        if !write {
            read_roots(&self.img);
        }
        true
    }

    /// After a session in which a write on metadata was refused: the image opens
    /// read-only only; a repair that leaves no corruption makes it writable again.
    /// False when the script must stop.
    fn reopen_after_refusal(&mut self) -> bool {
        match fixture::open_in(&self.storage, true) {
            Err(e) if e.kind() == ErrorKind::ReadOnly => {}
            Err(e) => panic!("an image marked corrupt does not open (expected read-only): {e}"),
            Ok(_) => panic!("an image marked corrupt after a refused write opens for writing"),
        }
        let ro = fixture::open_in(&self.storage, false).unwrap_or_else(|e| {
            panic!("an image marked corrupt after a refused write does not open read-only: {e}")
        });
        read_roots(&ro);
        drop(ro);
        let opts = OpenOptions::new().repair(true).open_backing(false);
        let Ok(img) = Image::from_storage(self.storage.clone(), &opts) else {
            return false;
        };
        let r = img.repair();
        note(format_args!("repair"), &r);
        let repaired = r.is_ok_and(|r| r.corruptions == 0);
        let closed = img.close();
        note(format_args!("close after repair"), &closed);
        if !repaired || closed.is_err() {
            return false;
        }
        let img = fixture::open_in(&self.storage, true).unwrap_or_else(|e| {
            panic!("an image repaired without corruption left does not open for writing: {e}")
        });
        self.img = img;
        self.refused = false;
        // The repair decided what the image holds now: judge it from here on.
        self.clean = self
            .img
            .check()
            .is_ok_and(|r| r.corruptions == 0 && r.check_errors == 0)
            && !maps_a_cluster_twice(&self.img);
        true
    }

    /// Notes what an op that changes the image did (`empty`: it names no bytes, so
    /// it changes nothing); after a refusal on this handle, it must fail.
    fn changed<T: std::fmt::Debug>(
        &self,
        what: std::fmt::Arguments<'_>,
        r: &qcowx_core::Result<T>,
        empty: bool,
    ) {
        note(what, r);
        assert!(
            !(self.refused && !empty && r.is_ok()),
            "{what} succeeded after a write on metadata was refused"
        );
    }

    /// [`Op::Downgrade`]; false when the script must stop.
    fn downgrade_and_upgrade(&mut self) -> bool {
        let read = |img: &Arc<Image>| -> Option<Vec<u8>> {
            let d = img.open_root("default").ok()?;
            let mut buf = vec![0u8; d.size().min(READ_PASS_BYTES) as usize];
            d.read_at(&mut buf, 0).ok().map(|_| buf)
        };
        let before = read(&self.img);
        let r = self.img.close_as_v2();
        self.changed(format_args!("close as version 2"), &r, false);
        if r.is_err() {
            // Refused (nothing written, the handle open) or failed: go on only with
            // a handle that still works.
            return self.img.flush().is_ok();
        }
        let img = fixture::open_upgrading(&self.storage).unwrap_or_else(|e| {
            panic!("an image qcowx closed as version 2 does not open with the upgrade: {e}")
        });
        self.img = img;
        self.assert_clean("after a downgrade and an upgrade");
        if let Some(before) = before {
            assert!(
                read(&self.img).as_ref() == Some(&before),
                "the default VDI reads otherwise after a downgrade and an upgrade"
            );
        }
        true
    }

    /// Runs one op; false when the script must stop.
    fn apply(&mut self, op: Op, s: &mut Script<'_>) -> bool {
        let go_on = self.apply_one(op, s);
        // A refusal marks the image corrupt (the only thing that does in a session
        // that opened for writing, which a corrupt image cannot).
        if !self.refused {
            self.refused = self.img.info().is_ok_and(|i| i.corrupt);
        }
        go_on
    }

    fn apply_one(&mut self, op: Op, s: &mut Script<'_>) -> bool {
        let img = Arc::clone(&self.img);
        match op {
            Op::Read => {
                if let Some(d) = self.disk(s) {
                    let size = d.size();
                    let (off, len) = range(s, size, false);
                    let mut buf = vec![0u8; len as usize];
                    note(
                        format_args!("read {} {off}+{len}", d.name()),
                        &d.read_at(&mut buf, off),
                    );
                }
            }
            Op::Write => {
                if let Some(d) = self.disk(s) {
                    let size = d.size();
                    let (off, len) = range(s, size, false);
                    let seed = s.u8();
                    let buf: Vec<u8> = (0..len as usize)
                        .map(|i| seed.wrapping_add((i / 509) as u8) | 1)
                        .collect();
                    let r = d.write_at(&buf, off);
                    self.changed(format_args!("write {} {off}+{len}", d.name()), &r, len == 0);
                    if r.is_ok() {
                        let mut back = vec![0u8; buf.len()];
                        d.read_at(&mut back, off).unwrap_or_else(|e| {
                            panic!(
                                "{}: write of {len} at {off} succeeded, read back fails: {e}",
                                d.name()
                            )
                        });
                        assert!(
                            back == buf,
                            "{}: write of {len} bytes at {off} succeeded but reads back differently",
                            d.name()
                        );
                    }
                }
            }
            Op::WriteZeroes => {
                if let Some(d) = self.disk(s) {
                    let size = d.size();
                    let (off, len) = range(s, size, true);
                    let unmap = s.u8() & 1 != 0;
                    let r = d.write_zeroes(off, len, unmap);
                    self.changed(
                        format_args!("write-zeroes {} {off}+{len} unmap {unmap}", d.name()),
                        &r,
                        len == 0,
                    );
                    if r.is_ok() {
                        let n = len.min(MAX_IO) as usize;
                        let mut back = vec![0xa5u8; n];
                        d.read_at(&mut back, off).unwrap_or_else(|e| {
                            panic!("{}: write-zeroes of {len} at {off} succeeded, read back fails: {e}", d.name())
                        });
                        assert!(
                            back.iter().all(|&b| b == 0),
                            "{}: write-zeroes of {len} bytes at {off} succeeded but does not read back as zeros",
                            d.name()
                        );
                    }
                }
            }
            Op::Discard => {
                if let Some(d) = self.disk(s) {
                    let size = d.size();
                    let (off, len) = range(s, size, true);
                    self.changed(
                        format_args!("discard {} {off}+{len}", d.name()),
                        &d.discard(off, len),
                        len == 0,
                    );
                }
            }
            Op::Snapshot => {
                if let Some(vdi) = self.pick(s, Some(RootKind::Vdi)) {
                    let n = name(s, "s");
                    self.changed(
                        format_args!("snapshot {vdi} as {n}"),
                        &img.snapshot(&vdi, &n),
                        false,
                    );
                }
            }
            Op::Fork => {
                if let Some(snap) = self.pick(s, Some(RootKind::Snapshot)) {
                    let n = name(s, "v");
                    self.changed(
                        format_args!("fork {snap} as {n}"),
                        &img.fork(&snap, &n),
                        false,
                    );
                }
            }
            Op::DeleteSnapshot => {
                if let Some(snap) = self.pick(s, Some(RootKind::Snapshot)) {
                    self.changed(
                        format_args!("delete snapshot {snap}"),
                        &img.delete_snapshot(&snap),
                        false,
                    );
                }
            }
            Op::DeleteVdi => {
                if let Some(vdi) = self.pick(s, Some(RootKind::Vdi)) {
                    self.changed(
                        format_args!("delete VDI {vdi}"),
                        &img.delete_vdi(&vdi),
                        false,
                    );
                }
            }
            Op::Revert => {
                let vdi = self.pick(s, Some(RootKind::Vdi));
                let snap = self.pick(s, Some(RootKind::Snapshot));
                if let (Some(v), Some(sn)) = (vdi, snap) {
                    self.changed(
                        format_args!("revert {v} to {sn}"),
                        &img.revert(&v, &sn),
                        false,
                    );
                }
            }
            Op::Gc => {
                let r = img.gc();
                self.changed(format_args!("gc"), &r, false);
                if r.is_ok() {
                    self.assert_clean("after gc");
                }
            }
            Op::Check => {
                note(format_args!("check"), &img.check());
            }
            Op::Flush => {
                note(format_args!("flush"), &img.flush());
            }
            Op::BlockStatus => {
                if let Some(d) = self.disk(s) {
                    let size = d.size();
                    let (off, len) = range(s, size, true);
                    note(
                        format_args!("block status {} {off}+{len}", d.name()),
                        &d.block_status(off, len),
                    );
                }
            }
            Op::Resize => {
                let size = img.size();
                let grow = u64::from(s.u16()) << 12;
                let new = size.saturating_add(grow).min(MAX_RESIZE.max(size));
                self.changed(
                    format_args!("resize {size} to {new}"),
                    &img.resize(new),
                    false,
                );
            }
            Op::Reopen => return self.close_and_reopen(true),
            Op::ReadAll => read_roots(&img),
            Op::Downgrade => return self.downgrade_and_upgrade(),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_undoes_join() {
        let input = join(b"image", b"ops");
        assert_eq!(split(&input), (&b"image"[..], &b"ops"[..]));
        assert_eq!(split(&[]), (&[][..], &[][..]));
        // A length byte larger than what precedes it: all of it is script.
        assert_eq!(split(&[1, 2, 200]), (&[][..], &[1, 2][..]));
    }

    #[test]
    fn every_op_runs_on_the_fixture() {
        let mut script = Vec::new();
        for op in Op::ALL {
            script.push(op.code());
            script.extend_from_slice(&[1, 3, 0, 0, 1, 0, 0x20, 9]);
        }
        exercise(crate::fixture::image_bytes(), &script);
        // Every op with no arguments at all.
        let codes: Vec<u8> = Op::ALL.iter().map(|o| o.code()).collect();
        exercise(crate::fixture::image_bytes(), &codes);
    }
}
