//! Model-based property tests on real image files, with QEMU as the judge.
//!
//! Random sequences of writes, zero writes, discards, flushes, grows, close/reopen
//! cycles and writes made by `qemu-io` in between run against a qcowx image file and
//! against a `Vec<u8>` holding what the guest should see. Some images have a qcow2
//! backing file (created by `qemu-img`, filled by `qemu-io`) or a raw one. qcowx must
//! read back what the model says after every step; after the last close `qemu-img
//! check` must find the image clean (no corruption, no leak, dirty bit clear) and
//! `qemu-img compare` must find it identical to a raw file holding the model.
//!
//! The tests that write and read through one `Arc<Image>` from several threads at once
//! are in `model_concurrent.rs`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::Config;
use qcowx_core::{CreateOptions, Image, OpenOptions};
use qcowx_tests::strategies::{guest_pattern, range, Range};
use qcowx_tests::{
    describe, first_difference, qemu_check, qemu_img, qemu_img_create, qemu_info, qemu_io_run, run,
    Rng,
};

/// The largest disk a sequence may grow to.
const MAX_DISK: u64 = 12 << 20;

// ---- operations -----------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Write {
        at: Range,
        seed: u8,
    },
    Zeroes {
        at: Range,
        unmap: bool,
    },
    Discard {
        at: Range,
    },
    Flush,
    Grow {
        by: u64,
    },
    /// Close, `qemu-img check`, reopen with qcowx.
    Reopen {
        small_cache: bool,
    },
    /// Close; `qemu-io` writes a byte pattern (or zeros) to the image; reopen.
    Qemu {
        at: Range,
        byte: u8,
        zero: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (range(), 1u8..=255).prop_map(|(at, seed)| Op::Write { at, seed }),
        3 => (range(), any::<bool>()).prop_map(|(at, unmap)| Op::Zeroes { at, unmap }),
        3 => range().prop_map(|at| Op::Discard { at }),
        2 => Just(Op::Flush),
        1 => (0u64..(2 << 20)).prop_map(|by| Op::Grow { by }),
        1 => any::<bool>().prop_map(|small_cache| Op::Reopen { small_cache }),
        1 => (range(), 1u8..=255, prop::bool::weighted(0.25))
            .prop_map(|(at, byte, zero)| Op::Qemu { at, byte, zero }),
    ]
}

// ---- the backing file ---------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Backing {
    None,
    /// A qcow2 backing file with this cluster size (extended L2 if asked).
    Qcow2 {
        cluster_size: u64,
        extended_l2: bool,
    },
    Raw,
}

/// Creates the backing file `base` of `size` bytes in `dir`, filled with a few random
/// `qemu-io` writes; returns its content as the guest sees it.
fn make_backing(dir: &Path, kind: Backing, size: u64, seed: u64) -> (Option<String>, Vec<u8>) {
    let mut content = vec![0u8; size as usize];
    let (name, fmt) = match kind {
        Backing::None => return (None, Vec::new()),
        Backing::Qcow2 {
            cluster_size,
            extended_l2,
        } => {
            let name = "base.qcow2";
            let ext = if extended_l2 { ",extended_l2=on" } else { "" };
            qemu_img_create(
                &dir.join(name),
                size,
                &format!("cluster_size={cluster_size}{ext}"),
            );
            (name, "qcow2")
        }
        Backing::Raw => {
            let name = "base.raw";
            std::fs::File::create(dir.join(name))
                .and_then(|f| f.set_len(size))
                .expect("create raw backing file");
            (name, "raw")
        }
    };
    let mut rng = Rng::new(seed);
    let mut cmds = Vec::new();
    for _ in 0..8 {
        let off = rng.below(size);
        let len = (1 + rng.below(256 << 10)).min(size - off);
        let byte = 1 + rng.below(255) as u8;
        cmds.push(format!("write -P {byte:#x} {off} {len}"));
        content[off as usize..(off + len) as usize].fill(byte);
    }
    // A zero write over part of the data.
    let off = rng.below(size);
    let len = (1 + rng.below(128 << 10)).min(size - off);
    cmds.push(format!("write -z {off} {len}"));
    content[off as usize..(off + len) as usize].fill(0);
    let out = qemu_io_run(fmt, &dir.join(name), &cmds);
    assert!(
        out.status.success(),
        "filling the backing file: {}",
        describe(&out)
    );
    (Some(name.to_string()), content)
}

// ---- one run -------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct ModelConfig {
    cluster_size: u64,
    extended_l2: bool,
    backing: Backing,
}

struct Run {
    cfg: ModelConfig,
    _dir: tempfile::TempDir,
    path: PathBuf,
    model_path: PathBuf,
    img: Option<Image>,
    model: Vec<u8>,
    trace: String,
}

impl Run {
    fn fail(&self, msg: impl std::fmt::Display) -> TestCaseError {
        TestCaseError::fail(format!(
            "{msg}\nconfig: {:?}\nresolved operations:\n{}",
            self.cfg, self.trace
        ))
    }

    fn img(&self) -> &Image {
        self.img.as_ref().expect("the image is open between steps")
    }

    fn compare(&self, off: u64, len: u64, when: &str) -> Result<(), TestCaseError> {
        if len == 0 {
            return Ok(());
        }
        let mut got = vec![0u8; len as usize];
        self.img()
            .read_at(&mut got, off)
            .map_err(|e| self.fail(format!("{when}: read {off}+{len}: {e}")))?;
        let want = &self.model[off as usize..(off + len) as usize];
        if got != want {
            let i = first_difference(&got, want).unwrap_or(0);
            return Err(self.fail(format!(
                "{when}: mismatch at guest offset {} (read {:#04x}, model {:#04x})",
                off + i as u64,
                got[i],
                want[i]
            )));
        }
        Ok(())
    }

    fn compare_all(&self, when: &str) -> Result<(), TestCaseError> {
        if self.img().size() != self.model.len() as u64 {
            return Err(self.fail(format!(
                "{when}: size {} but the model has {}",
                self.img().size(),
                self.model.len()
            )));
        }
        self.compare(0, self.model.len() as u64, when)
    }

    fn close(&mut self, when: &str) -> Result<(), TestCaseError> {
        if let Some(img) = self.img.take() {
            img.close()
                .map_err(|e| self.fail(format!("{when}: close: {e}")))?;
        }
        Ok(())
    }

    fn open(&mut self, write: bool, small_cache: bool, when: &str) -> Result<(), TestCaseError> {
        let mut opts = OpenOptions::new().write(write);
        if small_cache {
            opts = opts.cache_bytes(2 * self.cfg.cluster_size as usize);
        }
        let img = opts
            .open(&self.path)
            .map_err(|e| self.fail(format!("{when}: open (write {write}): {e}")))?;
        self.img = Some(img);
        Ok(())
    }

    /// `qemu-img check` must find the closed image clean.
    fn qemu_check_clean(&self, when: &str) -> Result<(), TestCaseError> {
        let c = qemu_check(&self.path);
        if c.code != 0
            || c.count("leaks") != 0
            || c.count("corruptions") != 0
            || c.count("check-errors") != 0
        {
            return Err(self.fail(format!(
                "{when}: qemu-img check is not clean: {}",
                describe(&c.output)
            )));
        }
        Ok(())
    }

    /// `qemu-img compare` must find the closed image identical to the model.
    fn qemu_compare(&self, when: &str) -> Result<(), TestCaseError> {
        std::fs::write(&self.model_path, &self.model).expect("write the model file");
        let out = run(qemu_img()
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&self.path)
            .arg(&self.model_path));
        if !out.status.success() {
            return Err(self.fail(format!(
                "{when}: qemu-img compare with the model: {}",
                describe(&out)
            )));
        }
        let info = qemu_info(&self.path, false);
        let dirty = &info["dirty-flag"];
        if dirty != &serde_json::Value::Bool(false) {
            return Err(self.fail(format!(
                "{when}: qemu-img info says dirty-flag {dirty} after a clean close"
            )));
        }
        Ok(())
    }

    fn step(&mut self, i: usize, op: &Op) -> Result<(), TestCaseError> {
        let cs = self.cfg.cluster_size;
        let size = self.model.len() as u64;
        let touched = match *op {
            Op::Write { at, seed } => {
                let (off, len) = at.resolve(size, cs);
                writeln!(self.trace, "{i}: write {off}+{len} seed {seed}").ok();
                let data = guest_pattern(seed, off, len);
                self.img()
                    .write_at(&data, off)
                    .map_err(|e| self.fail(format!("step {i}: write: {e}")))?;
                self.model[off as usize..(off + len) as usize].copy_from_slice(&data);
                Some((off, len))
            }
            Op::Zeroes { at, unmap } => {
                let (off, len) = at.resolve(size, cs);
                writeln!(self.trace, "{i}: write_zeroes {off}+{len} unmap {unmap}").ok();
                self.img()
                    .write_zeroes(off, len, unmap)
                    .map_err(|e| self.fail(format!("step {i}: write_zeroes: {e}")))?;
                self.model[off as usize..(off + len) as usize].fill(0);
                Some((off, len))
            }
            Op::Discard { at } => {
                let (off, len) = at.resolve(size, cs);
                writeln!(self.trace, "{i}: discard {off}+{len}").ok();
                self.img()
                    .discard(off, len)
                    .map_err(|e| self.fail(format!("step {i}: discard: {e}")))?;
                // Whole clusters (the partial last cluster of the disk counts as whole
                // when the range reaches the end) read as zeros, even over a backing
                // file; partial clusters at the edges are unchanged.
                let end = off + len;
                let mut c = off.next_multiple_of(cs);
                while c < end {
                    let stop = (c + cs).min(size);
                    if stop <= end {
                        self.model[c as usize..stop as usize].fill(0);
                    }
                    c += cs;
                }
                Some((off, len))
            }
            Op::Flush => {
                writeln!(self.trace, "{i}: flush").ok();
                self.img()
                    .flush()
                    .map_err(|e| self.fail(format!("step {i}: flush: {e}")))?;
                None
            }
            Op::Grow { by } => {
                let new = (size + by).min(MAX_DISK).max(size);
                writeln!(self.trace, "{i}: resize {new}").ok();
                self.img()
                    .resize(new)
                    .map_err(|e| self.fail(format!("step {i}: resize: {e}")))?;
                self.model.resize(new.next_multiple_of(512) as usize, 0);
                let from = size.saturating_sub(cs);
                Some((from, self.model.len() as u64 - from))
            }
            Op::Reopen { small_cache } => {
                writeln!(
                    self.trace,
                    "{i}: close, qemu-img check, reopen (small cache {small_cache})"
                )
                .ok();
                let when = format!("step {i}");
                self.close(&when)?;
                self.qemu_check_clean(&when)?;
                self.open(true, small_cache, &when)?;
                None
            }
            Op::Qemu { at, byte, zero } => {
                let (off, len) = at.resolve(size, cs);
                let cmd = if zero {
                    format!("write -z {off} {len}")
                } else {
                    format!("write -P {byte:#x} {off} {len}")
                };
                writeln!(self.trace, "{i}: close, qemu-io '{cmd}', reopen").ok();
                let when = format!("step {i}");
                self.close(&when)?;
                let out = qemu_io_run("qcow2", &self.path, &[cmd.as_str()]);
                if !out.status.success() {
                    return Err(self.fail(format!("{when}: qemu-io: {}", describe(&out))));
                }
                self.model[off as usize..(off + len) as usize].fill(if zero { 0 } else { byte });
                self.open(true, false, &when)?;
                Some((off, len))
            }
        };
        if let Some((off, len)) = touched {
            let size = self.model.len() as u64;
            let lo = off.saturating_sub(cs);
            let hi = (off + len + cs).min(size);
            self.compare(lo, hi - lo, &format!("after step {i}"))?;
        }
        if (i + 1).is_multiple_of(8) {
            self.compare_all(&format!("after step {i}"))?;
        }
        Ok(())
    }

    /// The final judgement: close; QEMU checks and compares; qcowx reads it all back.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        self.compare_all("at the end")?;
        self.close("at the end")?;
        self.qemu_check_clean("at the end")?;
        self.qemu_compare("at the end")?;
        self.open(false, false, "at the end")?;
        self.compare_all("at the end, reopened read-only")?;
        let report = self
            .img()
            .check()
            .map_err(|e| self.fail(format!("at the end: qcowx check: {e}")))?;
        if report.exit_code() != 0 {
            return Err(self.fail(format!("at the end: qcowx check: {report:?}")));
        }
        Ok(())
    }
}

fn run_model(
    cfg: ModelConfig,
    size: u64,
    backing_delta: i64,
    seed: u64,
    probe_format: bool,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let size = size.next_multiple_of(512);
    // The backing file may be shorter than the image (the rest reads zeros) or longer
    // (growing the image must not reveal the rest).
    let backing_size = (size as i64 + backing_delta).max(size as i64 / 2) as u64;
    let backing_size = backing_size.next_multiple_of(512);
    let (backing_name, backing_content) = make_backing(dir.path(), cfg.backing, backing_size, seed);
    let mut model = vec![0u8; size as usize];
    let visible = backing_content.len().min(model.len());
    model[..visible].copy_from_slice(&backing_content[..visible]);

    let path = dir.path().join("disk.qcow2");
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cfg.cluster_size;
    opts.extended_l2 = cfg.extended_l2;
    opts.backing_format = match cfg.backing {
        Backing::Qcow2 { .. } if !probe_format => Some("qcow2".into()),
        Backing::Raw if !probe_format => Some("raw".into()),
        _ => None,
    };
    opts.backing_file = backing_name;
    let img = Image::create(&path, &opts)
        .map_err(|e| TestCaseError::fail(format!("create {cfg:?} size {size}: {e}")))?;
    let mut run = Run {
        cfg,
        model_path: dir.path().join("model.raw"),
        _dir: dir,
        path,
        img: Some(img),
        model,
        trace: format!(
            "create size {size}, backing {:?} of {backing_size} bytes (seed {seed})\n",
            cfg.backing
        ),
    };
    run.compare_all("after create")?;
    for (i, op) in ops.iter().enumerate() {
        run.step(i, op)?;
    }
    run.finish()
}

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    Config {
        cases,
        // Failures print the resolved operation list; minimal reproductions become
        // named tests rather than files written into the source tree.
        failure_persistence: None,
        // Every case runs QEMU processes: keep shrinking bounded.
        max_shrink_iters: 256,
        ..Config::default()
    }
}

fn disk_size(min: u64, max: u64) -> impl Strategy<Value = u64> {
    (min / 512..=max / 512).prop_map(|s| s * 512)
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 1..50)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn model_64k_no_backing(size in disk_size(1 << 20, 6 << 20), seed in any::<u64>(), ops in ops()) {
        let cfg = ModelConfig { cluster_size: 65536, extended_l2: false, backing: Backing::None };
        run_model(cfg, size, 0, seed, false, &ops)?;
    }

    #[test]
    fn model_4k_qcow2_backing(
        size in disk_size(1 << 20, 4 << 20),
        delta in prop_oneof![Just(0i64), -(1i64 << 20)..(1 << 20)],
        backing_cs in prop::sample::select(vec![4096u64, 65536]),
        seed in any::<u64>(),
        probe in any::<bool>(),
        ops in ops(),
    ) {
        let backing = Backing::Qcow2 { cluster_size: backing_cs, extended_l2: false };
        let cfg = ModelConfig { cluster_size: 4096, extended_l2: false, backing };
        run_model(cfg, size, delta, seed, probe, &ops)?;
    }

    #[test]
    fn model_512_qcow2_extended_backing(
        size in disk_size(256 << 10, 1 << 20),
        seed in any::<u64>(),
        ops in ops(),
    ) {
        let backing = Backing::Qcow2 { cluster_size: 32768, extended_l2: true };
        let cfg = ModelConfig { cluster_size: 512, extended_l2: false, backing };
        run_model(cfg, size, 0, seed, false, &ops)?;
    }

    #[test]
    fn model_extended_l2_raw_backing(
        size in disk_size(1 << 20, 4 << 20),
        delta in prop_oneof![Just(0i64), -(1i64 << 20)..(1 << 20)],
        cs in prop::sample::select(vec![16384u64, 65536]),
        seed in any::<u64>(),
        probe in any::<bool>(),
        ops in ops(),
    ) {
        let cfg = ModelConfig { cluster_size: cs, extended_l2: true, backing: Backing::Raw };
        run_model(cfg, size, delta, seed, probe, &ops)?;
    }

    #[test]
    fn model_extended_l2_no_backing(size in disk_size(1 << 20, 4 << 20), seed in any::<u64>(), ops in ops()) {
        let cfg = ModelConfig { cluster_size: 32768, extended_l2: true, backing: Backing::None };
        run_model(cfg, size, 0, seed, false, &ops)?;
    }
}

/// QEMU creates images with 512-byte clusters and a backing file (it writes no feature
/// name table, which would not fit in the first cluster with the backing file name);
/// qcowx must create them too, and QEMU must read them through the backing file.
#[test]
fn create_512_byte_clusters_with_backing_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = dir.path().join("base.qcow2");
    qemu_img_create(&base, 1 << 20, "");
    let out = qemu_io_run("qcow2", &base, &["write -P 0x42 0 1M"]);
    assert!(out.status.success(), "qemu-io: {}", describe(&out));
    let path = dir.path().join("disk.qcow2");
    let mut opts = CreateOptions::new(1 << 20);
    opts.cluster_size = 512;
    opts.backing_file = Some("base.qcow2".into());
    opts.backing_format = Some("qcow2".into());
    let img =
        Image::create(&path, &opts).expect("create with 512-byte clusters and a backing file");
    img.write_at(&[0x43; 700], 1000).expect("write");
    img.close().expect("close");
    let c = qemu_check(&path);
    assert_eq!(c.code, 0, "qemu-img check: {}", describe(&c.output));
    let info = qemu_info(&path, false);
    assert_eq!(info["backing-filename"], "base.qcow2", "{info}");
    assert_eq!(info["cluster-size"], 512, "{info}");
    let out = qemu_io_run(
        "qcow2",
        &path,
        &[
            "read -P 0x42 0 1000",
            "read -P 0x43 1000 700",
            "read -P 0x42 1700 1046876",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("Pattern verification failed"),
        "qemu-io: {}",
        describe(&out)
    );
}

/// Growing an image whose backing file is longer than the image must not make the
/// backing file's data beyond the old end visible: the new area reads zeros, as it
/// does when `qemu-img resize` grows such an image (QEMU writes zeros there).
#[test]
fn grow_over_longer_backing_file_reads_zeros() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = dir.path().join("base.qcow2");
    qemu_img_create(&base, 2 << 20, "");
    let out = qemu_io_run("qcow2", &base, &["write -P 0x55 0 2M"]);
    assert!(out.status.success(), "qemu-io: {}", describe(&out));
    // The old end is not cluster-aligned: the tail of its last cluster is new too.
    let old = (1 << 20) + 512;
    let new = 2 << 20;
    let mut model = vec![0x55u8; old as usize];
    model.resize(new as usize, 0);

    // QEMU's behaviour, for reference.
    let qemu_path = dir.path().join("qemu.qcow2");
    let out = run(qemu_img()
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ])
        .arg(&qemu_path)
        .arg(old.to_string()));
    assert!(out.status.success(), "qemu-img create: {}", describe(&out));
    let out = run(qemu_img()
        .arg("resize")
        .arg(&qemu_path)
        .arg(new.to_string()));
    assert!(out.status.success(), "qemu-img resize: {}", describe(&out));
    let model_path = dir.path().join("model.raw");
    std::fs::write(&model_path, &model).expect("write model");
    let out = run(qemu_img()
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&qemu_path)
        .arg(&model_path));
    assert!(
        out.status.success(),
        "QEMU's own resize: {}",
        describe(&out)
    );

    let path = dir.path().join("disk.qcow2");
    let mut opts = CreateOptions::new(old);
    opts.backing_file = Some("base.qcow2".into());
    opts.backing_format = Some("qcow2".into());
    let img = Image::create(&path, &opts).expect("create");
    img.resize(new).expect("resize");
    let mut got = vec![0u8; new as usize];
    img.read_at(&mut got, 0).expect("read");
    if got != model {
        let i = first_difference(&got, &model).unwrap_or(0);
        panic!(
            "after growing from {old} to {new}, byte {i} reads {:#04x}, expected {:#04x}",
            got[i], model[i]
        );
    }
    img.close().expect("close");
    let c = qemu_check(&path);
    assert_eq!(c.code, 0, "qemu-img check: {}", describe(&c.output));
    let out = run(qemu_img()
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&path)
        .arg(&model_path));
    assert!(out.status.success(), "qemu-img compare: {}", describe(&out));
}
