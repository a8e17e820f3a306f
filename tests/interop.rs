//! Interoperability matrix against QEMU's own tools.
//!
//! * Images made and written by `qemu-img` / `qemu-io` (cluster sizes 512 B … 2 MiB,
//!   compat 0.10 and 1.1, extended L2 on and off, a disk size that is not a cluster
//!   multiple, zero clusters with and without unmap, discards, compressed clusters in
//!   zlib and zstd, internal snapshots, backing chains of depth 1, 4 and 16 over raw
//!   and qcow2 bases, backing files shorter than the overlay) read byte-for-byte like
//!   `qemu-img convert -O raw` in qcowx, and qcowx's `block_status` classifies every
//!   byte like `qemu-img map`.
//! * qcowx writes into those images (version 3 only) leave them `qemu-img check`
//!   clean and `qemu-img compare`-equal to an expected raw file kept by the test;
//!   internal snapshots keep their content.
//! * Images qcowx creates pass `qemu-img check`, `qemu-io read -P` finds the written
//!   patterns, and qcowx reads what QEMU writes into them.
//! * Image locks keep QEMU and qcowx from writing the same image at once.
//!
//! Every test needs `qemu-img` and `qemu-io` and fails when they are missing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qcowx_core::{CompressionType, CreateOptions, Error, ExtentStatus, Image, OpenOptions};
use qcowx_tests::{
    apply_random_ops, assert_block_status_matches_qemu, assert_image_eq_bytes,
    assert_image_eq_file, assert_image_matches_qemu, assert_info_matches_qemu,
    assert_qemu_check_clean, assert_qemu_compare_eq, compressible, convert_snapshot_to_raw,
    convert_to_raw, describe, open_retry, open_ro, open_rw, pattern, qemu_img, qemu_img_create,
    qemu_io, qemu_io_ok, qemu_io_run, run, run_ok, tempdir, ExpectedDisk, OpMix, QemuIoSession,
    Rng,
};

/// A disk size that is not a multiple of any cluster size used (5 MiB + 3 sectors).
const ODD_SIZE: u64 = 5 * 1024 * 1024 + 3 * 512;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// One qcow2 configuration of the matrix.
#[derive(Debug, Clone, Copy)]
struct Config {
    cluster: u64,
    compat: &'static str,
    extended_l2: bool,
    /// More `-o` options for `qemu-img create`.
    extra: &'static str,
}

impl Config {
    const fn new(cluster: u64, compat: &'static str, extended_l2: bool) -> Config {
        Config {
            cluster,
            compat,
            extended_l2,
            extra: "",
        }
    }

    const fn with(mut self, extra: &'static str) -> Config {
        self.extra = extra;
        self
    }

    fn qemu_opts(&self) -> String {
        let mut s = format!("cluster_size={},compat={}", self.cluster, self.compat);
        if self.extended_l2 {
            s.push_str(",extended_l2=on");
        }
        if !self.extra.is_empty() {
            s.push(',');
            s.push_str(self.extra);
        }
        s
    }

    fn v3(&self) -> bool {
        self.compat == "1.1"
    }
}

/// `(off, len)` moved and shortened to lie inside a disk of `size` bytes.
fn clamp(off: u64, len: u64, size: u64) -> (u64, u64) {
    let off = off.min(size - 1);
    (off, len.min(size - off).max(1))
}

/// `write -P` clamped to the disk.
fn w(pat: u8, off: u64, len: u64, size: u64) -> String {
    let (off, len) = clamp(off, len, size);
    format!("write -P {pat:#04x} {off} {len}")
}

/// `write -z [-u]` clamped to the disk.
fn z(off: u64, len: u64, unmap: bool, size: u64) -> String {
    let (off, len) = clamp(off, len, size);
    let u = if unmap { " -u" } else { "" };
    format!("write -z{u} {off} {len}")
}

/// `discard` clamped to the disk.
fn d(off: u64, len: u64, size: u64) -> String {
    let (off, len) = clamp(off, len, size);
    format!("discard {off} {len}")
}

/// The qemu-io commands that fill an image of `cfg` and `size`: patterned writes at
/// aligned and unaligned offsets (within and across clusters and subclusters), zero
/// writes with and without unmap (whole and partial clusters), discards, writes at the
/// very end of the disk and a few random writes.
fn qemu_fill_commands(cfg: Config, size: u64, seed: u64) -> Vec<String> {
    let cs = cfg.cluster;
    let sub = if cfg.extended_l2 { cs / 32 } else { cs };
    let full = (size / cs).max(1);
    let c = |i: u64| (i % full) * cs;
    let mut v = vec![
        w(0x11, 0, 512, size),
        w(0x12, cs + 300, 1000, size),
        w(0x13, c(3).max(cs) - 100, cs + 200, size),
        w(0xa1, c(4), 4 * cs, size),
        z(c(5), cs, false, size),
        z(c(6), cs, true, size),
        d(c(7), cs, size),
        z(c(4) + cs / 3, cs / 5, false, size),
        w(0xa2, c(9), 2 * cs, size),
        d(c(9) + cs / 2, 2 * cs, size),
    ];
    if cfg.extended_l2 {
        v.push(w(0xb1, c(8) + 3 * sub + 100, sub / 2, size));
        v.push(w(0xb2, c(8) + 10 * sub, 2 * sub, size));
        v.push(z(c(8) + 20 * sub, sub, false, size));
        v.push(z(c(8) + 22 * sub, 2 * sub, true, size));
    }
    let mut rng = Rng::new(seed);
    let max_len = (2 * cs).min(200 * KIB);
    for _ in 0..10 {
        let len = rng.range(1, max_len + 1);
        let off = rng.below(size - len);
        v.push(w(0x20 + rng.below(0x40) as u8, off, len, size));
    }
    v.push(w(0xee, size - 1000, 1000, size));
    v
}

/// Converts `img_path` with qemu-img and returns the expected-content model.
fn model_from_qemu(img_path: &Path, scratch: &Path, cluster: u64) -> ExpectedDisk {
    let raw = scratch.join("model-src.raw");
    let _ = std::fs::remove_file(&raw);
    convert_to_raw(img_path, &raw);
    let m = ExpectedDisk::from_raw_file(&raw, cluster);
    let _ = std::fs::remove_file(&raw);
    m
}

/// qcowx opens `path` read-write, issues `ops` random operations, closes it; then
/// `qemu-img check` must be clean, `qemu-img compare` must find the expected content,
/// and qcowx must read it back.
fn qcowx_random_writes(path: &Path, scratch: &Path, cluster: u64, seed: u64, ops: usize) {
    let mut model = model_from_qemu(path, scratch, cluster);
    let img = open_rw(path);
    let mut rng = Rng::new(seed);
    apply_random_ops(&img, &mut model, &mut rng, ops, OpMix::default());
    img.close()
        .unwrap_or_else(|e| panic!("close {}: {e}", path.display()));
    drop(img);
    assert_qemu_check_clean(path);
    let expected = scratch.join("expected.raw");
    model.save_raw(&expected);
    assert_qemu_compare_eq(path, "qcow2", &expected, "raw");
    let img = open_ro(path);
    assert_image_eq_bytes(&img, model.as_bytes());
    let report = img.check().expect("qcowx check");
    assert_eq!(
        report.exit_code(),
        0,
        "qcowx check after writes: {report:?}"
    );
}

/// The core of the matrix for one configuration.
fn qemu_written_image(cfg: Config, block_status: bool) {
    let dir = tempdir();
    let path = dir.path().join("disk.qcow2");
    qemu_img_create(&path, ODD_SIZE, &cfg.qemu_opts());
    let seed = cfg.cluster ^ u64::from(cfg.extended_l2) << 40 ^ cfg.compat.len() as u64;
    qemu_io_ok("qcow2", &path, &qemu_fill_commands(cfg, ODD_SIZE, seed));

    let img = open_ro(&path);
    let info = img.info().expect("info");
    assert_eq!(info.virtual_size, ODD_SIZE);
    assert_eq!(info.cluster_size, cfg.cluster);
    assert_eq!(info.compat, cfg.compat);
    assert_eq!(info.extended_l2, cfg.extended_l2);
    assert_info_matches_qemu(&img, &path);
    assert_image_matches_qemu(&img, &path, dir.path());
    let report = img.check().expect("qcowx check");
    assert_eq!(
        report.exit_code(),
        0,
        "qcowx check of a clean QEMU image ({cfg:?}): {report:?}"
    );
    if block_status {
        assert_block_status_matches_qemu(&img, &path);
    }
    drop(img);

    if cfg.v3() {
        qcowx_random_writes(&path, dir.path(), cfg.cluster, seed ^ 0x5eed, 150);
    } else {
        match open_retry(&OpenOptions::new().write(true), &path) {
            Err(Error::ReadOnly { .. }) => {}
            other => panic!("version 2 image opened for writing: {other:?}"),
        }
    }
}

#[test]
fn qemu_512_compat_010() {
    qemu_written_image(Config::new(512, "0.10", false), false);
}

#[test]
fn qemu_512_compat_11() {
    qemu_written_image(Config::new(512, "1.1", false), true);
}

#[test]
fn qemu_4k_compat_010() {
    qemu_written_image(Config::new(4 * KIB, "0.10", false), false);
}

#[test]
fn qemu_4k_compat_11() {
    qemu_written_image(Config::new(4 * KIB, "1.1", false), false);
}

#[test]
fn qemu_16k_extended_l2() {
    qemu_written_image(Config::new(16 * KIB, "1.1", true), true);
}

#[test]
fn qemu_64k_compat_010() {
    qemu_written_image(Config::new(64 * KIB, "0.10", false), true);
}

#[test]
fn qemu_64k_compat_11() {
    qemu_written_image(Config::new(64 * KIB, "1.1", false), true);
}

#[test]
fn qemu_64k_extended_l2() {
    qemu_written_image(Config::new(64 * KIB, "1.1", true), true);
}

#[test]
fn qemu_64k_refcount_bits_1() {
    qemu_written_image(
        Config::new(64 * KIB, "1.1", false).with("refcount_bits=1"),
        true,
    );
}

#[test]
fn qemu_4k_refcount_bits_64() {
    qemu_written_image(
        Config::new(4 * KIB, "1.1", false).with("refcount_bits=64"),
        false,
    );
}

#[test]
fn qemu_64k_lazy_refcounts() {
    qemu_written_image(
        Config::new(64 * KIB, "1.1", false).with("lazy_refcounts=on"),
        true,
    );
}

#[test]
fn qemu_64k_preallocation_metadata() {
    qemu_written_image(
        Config::new(64 * KIB, "1.1", false).with("preallocation=metadata"),
        true,
    );
}

#[test]
fn qemu_64k_extended_l2_preallocation_falloc() {
    qemu_written_image(
        Config::new(64 * KIB, "1.1", true).with("preallocation=falloc"),
        true,
    );
}

/// `qemu-img resize` grows the L1 table of a small-cluster image; data written before
/// and after the resize reads back.
#[test]
fn qemu_resized() {
    let dir = tempdir();
    let path = dir.path().join("r.qcow2");
    qemu_img_create(&path, MIB, "cluster_size=512");
    qemu_io_ok(
        "qcow2",
        &path,
        &[w(0x61, 1000, 100_000, MIB), w(0x62, MIB - 700, 700, MIB)],
    );
    run_ok(
        qemu_img()
            .arg("resize")
            .arg(&path)
            .arg(ODD_SIZE.to_string()),
    );
    qemu_io_ok(
        "qcow2",
        &path,
        &[
            w(0x63, MIB - 100, 5000, ODD_SIZE),
            w(0x64, 4 * MIB + 3, 9999, ODD_SIZE),
        ],
    );
    let img = open_ro(&path);
    assert_eq!(img.size(), ODD_SIZE);
    assert_info_matches_qemu(&img, &path);
    assert_image_matches_qemu(&img, &path, dir.path());
    assert_block_status_matches_qemu(&img, &path);
    drop(img);
    qcowx_random_writes(&path, dir.path(), 512, 0x7e5, 150);
}

#[test]
fn qemu_2m_compat_010() {
    qemu_written_image(Config::new(2 * MIB, "0.10", false), false);
}

#[test]
fn qemu_2m_compat_11() {
    qemu_written_image(Config::new(2 * MIB, "1.1", false), false);
}

#[test]
fn qemu_2m_extended_l2() {
    qemu_written_image(Config::new(2 * MIB, "1.1", true), true);
}

// ---- compressed clusters -------------------------------------------------------------

/// Content with compressible, incompressible and zero stretches of assorted lengths.
fn mixed_content(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(size);
    while v.len() < size {
        let n = rng.range(1024, 300 * 1024) as usize;
        match rng.below(3) {
            0 => v.extend(compressible(rng.next_u64(), n)),
            1 => v.extend(pattern(rng.next_u64(), n)),
            _ => v.extend(std::iter::repeat_n(0u8, n)),
        }
    }
    v.truncate(size);
    v
}

fn qemu_compressed(cluster: u64, ctype: &str, compat: &str, extended_l2: bool) {
    let dir = tempdir();
    let size = 4 * MIB + 512;
    let content = mixed_content(size as usize, cluster ^ ctype.len() as u64);
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &content).expect("write source");
    let path = dir.path().join("c.qcow2");
    let mut opts = format!("cluster_size={cluster},compat={compat}");
    if compat == "1.1" {
        opts.push_str(&format!(",compression_type={ctype}"));
    }
    if extended_l2 {
        opts.push_str(",extended_l2=on");
    }
    run_ok(
        qemu_img()
            .args(["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts])
            .arg(&src)
            .arg(&path),
    );

    let img = open_ro(&path);
    assert_eq!(img.info().expect("info").compression_type, ctype);
    assert_info_matches_qemu(&img, &path);
    let compressed = img.check().expect("qcowx check");
    assert_eq!(compressed.exit_code(), 0, "{compressed:?}");
    assert!(
        compressed.compressed_clusters > 0,
        "qemu-img convert -c made no compressed cluster?"
    );
    assert_image_eq_bytes(&img, &content);
    assert_image_matches_qemu(&img, &path, dir.path());
    assert_block_status_matches_qemu(&img, &path);
    drop(img);

    // QEMU overwrites parts of compressed clusters; qcowx reads the merge.
    qemu_io_ok(
        "qcow2",
        &path,
        &[
            w(0x71, cluster + 100, 700, size),
            w(0x72, 3 * cluster - 200, 400, size),
            z(5 * cluster, cluster, false, size),
            w(0x73, MIB + 5, 3 * cluster, size),
        ],
    );
    let img = open_ro(&path);
    assert_image_matches_qemu(&img, &path, dir.path());
    drop(img);

    if compat == "1.1" {
        qcowx_random_writes(&path, dir.path(), cluster, cluster ^ 0xc0, 120);
    }
}

#[test]
fn compressed_zlib_4k() {
    qemu_compressed(4 * KIB, "zlib", "1.1", false);
}

#[test]
fn compressed_zlib_64k() {
    qemu_compressed(64 * KIB, "zlib", "1.1", false);
}

#[test]
fn compressed_zlib_64k_compat_010() {
    qemu_compressed(64 * KIB, "zlib", "0.10", false);
}

#[test]
fn compressed_zstd_64k() {
    qemu_compressed(64 * KIB, "zstd", "1.1", false);
}

#[test]
fn compressed_zstd_64k_extended_l2() {
    qemu_compressed(64 * KIB, "zstd", "1.1", true);
}

#[test]
fn compressed_zstd_2m() {
    qemu_compressed(2 * MIB, "zstd", "1.1", false);
}

#[test]
fn compressed_zlib_2m() {
    qemu_compressed(2 * MIB, "zlib", "1.1", false);
}

// ---- internal snapshots ----------------------------------------------------------------

fn qemu_snapshot(cfg: Config) {
    let dir = tempdir();
    let path = dir.path().join("snap.qcow2");
    let size = ODD_SIZE;
    qemu_img_create(&path, size, &cfg.qemu_opts());
    qemu_io_ok(
        "qcow2",
        &path,
        &qemu_fill_commands(cfg, size, 0x51 ^ cfg.cluster),
    );
    run_ok(qemu_img().args(["snapshot", "-c", "s1"]).arg(&path));
    let s1_raw = dir.path().join("s1.raw");
    convert_snapshot_to_raw(&path, "s1", &s1_raw);
    let s1_before = std::fs::read(&s1_raw).expect("read s1.raw");

    // The active layer diverges: overwrite, zero and discard what s1 holds.
    let cs = cfg.cluster;
    qemu_io_ok(
        "qcow2",
        &path,
        &[
            w(0x91, 0, 4096, size),
            w(0x92, cs * 4 + 17, 3 * cs, size),
            z(0, cs, true, size),
            d((4 * cs).min(size - cs) / cs * cs, cs, size),
            w(0x93, size - 5000, 5000, size),
        ],
    );

    let img = open_ro(&path);
    let info = img.info().expect("info");
    assert_eq!(info.snapshots.len(), 1, "{:?}", info.snapshots);
    assert_eq!(info.snapshots[0].name, "s1");
    assert_eq!(info.snapshots[0].id, "1");
    // QEMU records the disk size in the extra data of version 2 images too.
    assert_eq!(info.snapshots[0].disk_size, Some(size));
    assert_info_matches_qemu(&img, &path);
    assert_image_matches_qemu(&img, &path, dir.path());
    let report = img.check().expect("qcowx check");
    assert_eq!(report.exit_code(), 0, "{report:?}");
    drop(img);

    if !cfg.v3() {
        return;
    }
    qcowx_random_writes(&path, dir.path(), cs, 0x5a5a ^ cs, 150);
    // The snapshot still holds exactly what it held.
    let s1_after = dir.path().join("s1-after.raw");
    convert_snapshot_to_raw(&path, "s1", &s1_after);
    let after = std::fs::read(&s1_after).expect("read s1-after.raw");
    assert!(
        after == s1_before,
        "snapshot s1 changed after qcowx wrote the active layer (first difference at {:?})",
        after.iter().zip(&s1_before).position(|(a, b)| a != b)
    );
    let out = run_ok(qemu_img().args(["snapshot", "-l"]).arg(&path));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("s1"),
        "qemu-img snapshot -l lost s1: {}",
        describe(&out)
    );
}

#[test]
fn snapshot_64k() {
    qemu_snapshot(Config::new(64 * KIB, "1.1", false));
}

#[test]
fn snapshot_4k() {
    qemu_snapshot(Config::new(4 * KIB, "1.1", false));
}

#[test]
fn snapshot_64k_extended_l2() {
    qemu_snapshot(Config::new(64 * KIB, "1.1", true));
}

#[test]
fn snapshot_64k_compat_010() {
    qemu_snapshot(Config::new(64 * KIB, "0.10", false));
}

// ---- backing chains ----------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    Raw,
    Qcow2,
}

/// Builds `depth` qcow2 layers over a base of `base_size` bytes in `dir`, every name
/// relative (the tools run inside `dir`). Layer 1 has `top_size` bytes; later layers
/// inherit it. Returns the top's path and the chain's files, base first.
fn build_chain(
    dir: &Path,
    base: Base,
    depth: usize,
    base_size: u64,
    top_size: u64,
) -> (PathBuf, Vec<PathBuf>) {
    let mut files = Vec::new();
    let (mut prev, mut prev_fmt) = match base {
        Base::Raw => {
            // Fully written (no holes), so QEMU's map sees data everywhere, as qcowx does.
            std::fs::write(dir.join("base.raw"), pattern(0xba5e, base_size as usize))
                .expect("write base.raw");
            ("base.raw".to_string(), "raw")
        }
        Base::Qcow2 => {
            qemu_img_create(&dir.join("base.qcow2"), base_size, "cluster_size=65536");
            qemu_io_ok(
                "qcow2",
                &dir.join("base.qcow2"),
                &[
                    w(0x01, 0, base_size / 2, base_size),
                    w(0x02, base_size / 2 + 4096, 200 * KIB, base_size),
                    w(0x03, base_size - 70 * KIB, 70 * KIB, base_size),
                ],
            );
            ("base.qcow2".to_string(), "qcow2")
        }
    };
    files.push(dir.join(&prev));
    for i in 1..=depth {
        let name = format!("layer{i:02}.qcow2");
        let mut cmd = qemu_img();
        cmd.current_dir(dir)
            .args(["create", "-q", "-f", "qcow2", "-b", &prev, "-F", prev_fmt])
            .args(["-o", "cluster_size=65536"])
            .arg(&name);
        if i == 1 {
            cmd.arg(top_size.to_string());
        }
        run_ok(&mut cmd);
        // Every layer writes its own ranges; odd layers also zero something below.
        let step = top_size / (depth as u64 + 2);
        let at = step * i as u64 + (i as u64 * 4099) % 65536;
        let mut cmds = vec![
            w(0x40 + i as u8, at, 64 * KIB + 333, top_size),
            w(
                0x80 + i as u8,
                (i as u64 * 37 * 4096) % top_size,
                5000,
                top_size,
            ),
        ];
        if i % 2 == 1 {
            cmds.push(z((at + step / 2) / 65536 * 65536, 65536, false, top_size));
        }
        let mut io = qemu_io();
        io.current_dir(dir).args(["-f", "qcow2"]);
        for c in &cmds {
            io.args(["-c", c]);
        }
        run_ok(io.arg(&name));
        files.push(dir.join(&name));
        prev = name;
        prev_fmt = "qcow2";
    }
    (dir.join(prev), files)
}

fn chain_case(base: Base, depth: usize, block_status: bool, write: bool) {
    let dir = tempdir();
    let size = 4 * MIB;
    let (top, files) = build_chain(dir.path(), base, depth, size, size);
    let img = open_ro(&top);
    let info = img.info().expect("info");
    assert!(
        info.backing_file
            .as_deref()
            .is_some_and(|b| !b.starts_with('/')),
        "backing name should be relative: {info:?}"
    );
    assert_info_matches_qemu(&img, &top);
    assert_image_matches_qemu(&img, &top, dir.path());
    if block_status {
        assert_block_status_matches_qemu(&img, &top);
    }
    drop(img);
    if write {
        let before: Vec<Vec<u8>> = files[..files.len() - 1]
            .iter()
            .map(|f| std::fs::read(f).expect("read layer"))
            .collect();
        qcowx_random_writes(&top, dir.path(), 65536, depth as u64 ^ 0xbac, 150);
        for (f, b) in files.iter().zip(&before) {
            assert!(
                std::fs::read(f).expect("read layer") == *b,
                "qcowx changed backing file {}",
                f.display()
            );
        }
    }
}

#[test]
fn chain_raw_depth_1() {
    chain_case(Base::Raw, 1, true, true);
}

#[test]
fn chain_raw_depth_4() {
    chain_case(Base::Raw, 4, true, false);
}

#[test]
fn chain_raw_depth_16() {
    chain_case(Base::Raw, 16, false, false);
}

#[test]
fn chain_qcow2_depth_1() {
    chain_case(Base::Qcow2, 1, true, false);
}

#[test]
fn chain_qcow2_depth_4() {
    chain_case(Base::Qcow2, 4, true, true);
}

#[test]
fn chain_qcow2_depth_16() {
    chain_case(Base::Qcow2, 16, true, false);
}

/// A backing file half as long as the overlay: the overlay's tail reads zeros.
fn short_backing(base: Base) {
    let dir = tempdir();
    let (top, _) = build_chain(dir.path(), base, 1, 2 * MIB, 4 * MIB);
    qemu_io_ok(
        "qcow2",
        &top,
        &[
            w(0x61, 2 * MIB - 3000, 6000, 4 * MIB),
            w(0x62, 3 * MIB, 512, 4 * MIB),
        ],
    );
    let img = open_ro(&top);
    assert_eq!(img.size(), 4 * MIB);
    assert_image_matches_qemu(&img, &top, dir.path());
    drop(img);
    qcowx_random_writes(&top, dir.path(), 65536, 0x5407, 100);
}

#[test]
fn short_backing_raw() {
    short_backing(Base::Raw);
}

#[test]
fn short_backing_qcow2() {
    short_backing(Base::Qcow2);
}

/// Block status past the end of a short backing file: QEMU reports those bytes as not
/// allocated anywhere.
#[test]
fn short_backing_block_status() {
    for base in [Base::Raw, Base::Qcow2] {
        let dir = tempdir();
        let (top, _) = build_chain(dir.path(), base, 1, 2 * MIB, 4 * MIB);
        let img = open_ro(&top);
        assert_block_status_matches_qemu(&img, &top);
    }
}

// ---- images qcowx creates ------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Backing {
    None,
    Raw,
    Qcow2,
}

fn qcowx_created(cluster: u64, extended_l2: bool, backing: Backing) {
    let dir = tempdir();
    let size = ODD_SIZE;
    let path = dir.path().join("ours.qcow2");
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cluster;
    opts.extended_l2 = extended_l2;
    let mut model = ExpectedDisk::zeroed(size, cluster);
    match backing {
        Backing::None => {}
        Backing::Raw => {
            let data = pattern(0xbbbb, size as usize);
            std::fs::write(dir.path().join("base.raw"), &data).expect("write base");
            model = ExpectedDisk::from_bytes(data, cluster);
            opts.backing_file = Some("base.raw".into());
            opts.backing_format = Some("raw".into());
        }
        Backing::Qcow2 => {
            let base = dir.path().join("base.qcow2");
            qemu_img_create(&base, size, "cluster_size=4096");
            qemu_io_ok(
                "qcow2",
                &base,
                &[w(0x0b, 0, size / 2, size), w(0x0c, size - 9000, 9000, size)],
            );
            model = model_from_qemu(&base, dir.path(), cluster);
            opts.backing_file = Some("base.qcow2".into());
            opts.backing_format = Some("qcow2".into());
        }
    }

    // Patterned, non-overlapping writes that qemu-io verifies afterwards.
    let img = Image::create(&path, &opts).expect("create");
    let cs = cluster;
    let patterned: Vec<(u8, u64, u64)> = vec![
        (0x31, 0, 512),
        (0x32, cs + 100, 1000.min(cs - 100)),
        (0x33, 2 * cs, 3 * cs),
        (0x34, 5 * cs + 7, cs),
        (0x35, size - 2048, 2048),
    ]
    .into_iter()
    .map(|(p, o, l)| {
        let l = l.min(size / 4);
        (p, o.min(size - l), l)
    })
    .collect();
    // (The 2 MiB-cluster case wraps offsets into the disk; later writes win.)
    for &(p, off, len) in &patterned {
        let buf = vec![p; len as usize];
        img.write_at(&buf, off).expect("write pattern");
        model.write(off, &buf);
    }
    img.close().expect("close");
    drop(img);
    assert_qemu_check_clean(&path);
    let mut verify = Vec::new();
    for (i, &(p, off, len)) in patterned.iter().enumerate() {
        // Only ranges no later pattern overwrote.
        let later = &patterned[i + 1..];
        if later
            .iter()
            .all(|&(_, o, l)| o + l <= off || off + len <= o)
        {
            verify.push(format!("read -P {p:#04x} {off} {len}"));
        }
    }
    assert!(!verify.is_empty());
    qemu_io_ok("qcow2", &path, &verify);

    // Random operations through qcowx.
    let img = open_rw(&path);
    let mut rng = Rng::new(cs ^ u64::from(extended_l2));
    apply_random_ops(&img, &mut model, &mut rng, 120, OpMix::default());
    img.close().expect("close");
    drop(img);
    assert_qemu_check_clean(&path);
    let expected = dir.path().join("expected.raw");
    model.save_raw(&expected);
    assert_qemu_compare_eq(&path, "qcow2", &expected, "raw");

    // QEMU writes into it; qcowx reads those writes.
    let qemu_cmds = vec![
        w(0xc1, cs / 2, cs, size),
        w(0xc2, 7 * cs + 1, 2 * cs, size),
        z((3 * cs).min(size / cs * cs - cs), cs, false, size),
        d((4 * cs).min(size / cs * cs - cs), cs, size),
        w(0xc3, size - 513, 513, size),
    ];
    qemu_io_ok("qcow2", &path, &qemu_cmds);
    assert_qemu_check_clean(&path);
    let img = open_ro(&path);
    assert_image_matches_qemu(&img, &path, dir.path());
    let report = img.check().expect("qcowx check");
    assert_eq!(report.exit_code(), 0, "{report:?}");
    drop(img);

    // And qcowx can keep writing after QEMU did.
    qcowx_random_writes(&path, dir.path(), cs, cs ^ 0xfeed, 60);
}

#[test]
fn ours_512() {
    qcowx_created(512, false, Backing::None);
}

#[test]
fn ours_4k() {
    qcowx_created(4 * KIB, false, Backing::None);
}

#[test]
fn ours_64k() {
    qcowx_created(64 * KIB, false, Backing::None);
}

#[test]
fn ours_16k_extended_l2() {
    qcowx_created(16 * KIB, true, Backing::None);
}

#[test]
fn ours_64k_extended_l2() {
    qcowx_created(64 * KIB, true, Backing::None);
}

#[test]
fn ours_2m() {
    qcowx_created(2 * MIB, false, Backing::None);
}

#[test]
fn ours_2m_extended_l2() {
    qcowx_created(2 * MIB, true, Backing::None);
}

#[test]
fn ours_64k_backing_raw() {
    qcowx_created(64 * KIB, false, Backing::Raw);
}

#[test]
fn ours_64k_extended_l2_backing_qcow2() {
    qcowx_created(64 * KIB, true, Backing::Qcow2);
}

#[test]
fn ours_4k_backing_qcow2() {
    qcowx_created(4 * KIB, false, Backing::Qcow2);
}

#[test]
fn ours_zstd_reads_in_qemu() {
    let dir = tempdir();
    let path = dir.path().join("z.qcow2");
    let mut opts = CreateOptions::new(MIB);
    opts.compression = CompressionType::Zstd;
    let img = Image::create(&path, &opts).expect("create");
    img.write_at(&[7u8; 3000], 4096).expect("write");
    img.close().expect("close");
    drop(img);
    assert_qemu_check_clean(&path);
    let info = qcowx_tests::qemu_info(&path, false);
    assert_eq!(
        info["format-specific"]["data"]["compression-type"], "zstd",
        "{info}"
    );
    qemu_io_ok("qcow2", &path, &["read -P 7 4096 3000", "read -P 0 0 4096"]);
}

// ---- block status spot checks ------------------------------------------------------------

/// A hand-made layout checked extent by extent, besides the map comparison.
#[test]
fn block_status_known_layout() {
    let dir = tempdir();
    let path = dir.path().join("bs.qcow2");
    qemu_img_create(&path, 1024 * KIB, "cluster_size=65536");
    qemu_io_ok(
        "qcow2",
        &path,
        &[
            "write -P 1 0 65536",
            "write -P 2 131072 65536",
            "write -z 131072 65536",
            "write -z -u 262144 65536",
        ],
    );
    let img = open_ro(&path);
    let st = img.block_status(0, 1024 * KIB).expect("block_status");
    let at = |off: u64| {
        st.iter()
            .find(|e| e.offset <= off && off < e.offset + e.length)
            .map(|e| e.status)
    };
    assert_eq!(at(0), Some(ExtentStatus::Data));
    assert_eq!(at(65536), Some(ExtentStatus::Unallocated));
    assert_eq!(at(131072), Some(ExtentStatus::Zero));
    assert_eq!(at(262144), Some(ExtentStatus::Zero));
    assert_eq!(at(512 * KIB), Some(ExtentStatus::Unallocated));
    assert_block_status_matches_qemu(&img, &path);
}

// ---- locks -----------------------------------------------------------------------------------

#[test]
fn qemu_cannot_write_while_qcowx_writes() {
    let dir = tempdir();
    let path = dir.path().join("l.qcow2");
    qemu_img_create(&path, MIB, "");
    let img = open_rw(&path);
    img.write_at(&[1u8; 512], 0).expect("write");
    let out = qemu_io_run("qcow2", &path, &["write 0 512"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("lock"),
        "qemu-io wrote an image qcowx holds open for writing: {}",
        describe(&out)
    );
    img.close().expect("close");
    drop(img);
    // Released: QEMU may write now.
    qemu_io_ok("qcow2", &path, &["write -P 3 0 512", "read -P 3 0 512"]);
}

#[test]
fn qcowx_cannot_write_while_qemu_writes() {
    let dir = tempdir();
    let path = dir.path().join("l.qcow2");
    qemu_img_create(&path, MIB, "");
    let log = dir.path().join("qemu-io.log");
    let mut session = QemuIoSession::start("qcow2", &path, false, &log, Duration::from_secs(30));
    match Image::open_rw(&path) {
        Err(Error::Locked { .. }) => {}
        other => panic!(
            "open_rw of an image qemu-io holds for writing: expected Error::Locked, got {other:?}; log: {}",
            session.log_text()
        ),
    }
    assert!(
        session.finish(Duration::from_secs(30)),
        "qemu-io did not exit"
    );
    let img = open_rw(&path);
    img.close().expect("close");
}

/// `qemu-img info` of a non-existent file fails; used to make sure `run` reports
/// failures as failures (the helpers must not hide them).
#[test]
fn helpers_report_failures() {
    let dir = tempdir();
    let out = run(qemu_img().arg("info").arg(dir.path().join("missing.qcow2")));
    assert!(!out.status.success());
    let raw = dir.path().join("r.raw");
    std::fs::write(&raw, [1u8; 1024]).expect("write");
    let img_path = dir.path().join("x.qcow2");
    qemu_img_create(&img_path, 1024, "");
    let img = open_ro(&img_path);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_image_eq_file(&img, &raw)
    }));
    assert!(
        r.is_err(),
        "assert_image_eq_file accepted different content"
    );
}
