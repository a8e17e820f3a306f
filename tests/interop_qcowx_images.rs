//! Interoperability matrix against QEMU's own tools: images qcowx makes, block status
//! and locks.
//!
//! * Images qcowx creates pass `qemu-img check`, `qemu-io read -P` finds the written
//!   patterns, and qcowx reads what QEMU writes into them.
//! * A hand-made layout's block status, checked extent by extent.
//! * Image locks keep QEMU and qcowx from writing the same image at once.
//!
//! Every test needs `qemu-img` and `qemu-io` and fails when they are missing.

use std::time::Duration;

use qcowx_core::{CompressionType, CreateOptions, Error, ExtentStatus, Image};
use qcowx_tests::interop_tools::*;
use qcowx_tests::{
    apply_random_ops, assert_block_status_matches_qemu, assert_image_eq_file,
    assert_image_matches_qemu, assert_qemu_check_clean, assert_qemu_compare_eq, describe, open_ro,
    open_rw, pattern, qemu_img, qemu_img_create, qemu_io_ok, qemu_io_run, run, tempdir,
    ExpectedDisk, OpMix, QemuIoSession, Rng,
};

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
