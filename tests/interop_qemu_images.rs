//! Interoperability matrix against QEMU's own tools: images QEMU makes.
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
//!
//! Every test needs `qemu-img` and `qemu-io` and fails when they are missing.

use std::path::{Path, PathBuf};

use qcowx_core::{Error, OpenOptions};
use qcowx_tests::interop_tools::*;
use qcowx_tests::{
    assert_block_status_matches_qemu, assert_image_eq_bytes, assert_image_matches_qemu,
    assert_info_matches_qemu, compressible, convert_snapshot_to_raw, describe, open_retry, open_ro,
    pattern, qemu_img, qemu_img_create, qemu_io, qemu_io_ok, run_ok, tempdir, Rng,
};

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
