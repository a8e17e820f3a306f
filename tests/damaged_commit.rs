//! QEMU's iotest 176 (`tests/qemu-iotests/176` in QEMU): commit out of an image with an
//! internal snapshot or a persistent bitmap, rebuilt with `qemu-img` and `qemu-io`
//! (the bitmap with `qemu-img bitmap` where the iotest uses QMP), and qcowx compared
//! with QEMU on every layer, with the assertions of `qcowx_tests::damaged` (see
//! `damaged_more.rs` for the other iotests). Its 2 GiB disks are not saved as fuzz
//! seeds (over `damaged::MAX_SEED`).

use qcowx_tests::cli::stderr;
use qcowx_tests::damaged::{Case, IMAGE};
use qcowx_tests::{qemu_check, qemu_img_create, qemu_io_ok};

// ---- 176: commit out of an image with a snapshot or a bitmap ----------------------------

/// 176: a chain base <- itmd <- top of 2100 MiB + 512 bytes, the top image given an
/// internal snapshot (or a persistent bitmap, made with `qemu-img bitmap` where the
/// iotest uses QMP) so that `qemu-img commit` cannot empty it the fast way, data near
/// the 2 GiB mark in each layer, then committed (pass 0: into itmd, the top emptied;
/// 3: into base with `-b`, the top kept). qcowx must check every layer as QEMU does
/// and read in each what QEMU reads (the iotest's patterns); then a qcowx write into
/// the emptied top must leave it clean for QEMU, the snapshot or bitmap kept.
fn commit_176(reason: &str, pass: u32) {
    let len: u64 = (2100 << 20) + 512;
    let c = Case::create(&format!("176-{reason}-{pass}"), len, "compat=1.1");
    let dir = c.path().to_path_buf();
    let base = dir.join("base.qcow2");
    let itmd = dir.join("itmd.qcow2");
    qemu_img_create(&base, len, "compat=1.1");
    qemu_img_create(
        &itmd,
        len,
        "compat=1.1,backing_file=base.qcow2,backing_fmt=qcow2",
    );
    qemu_img_create(
        &c.img,
        len,
        "compat=1.1,backing_file=itmd.qcow2,backing_fmt=qcow2",
    );
    match reason {
        "snapshot" => {
            let q = c.qemu_img(&["snapshot", "-c", "snap", IMAGE]);
            assert!(q.status.success(), "oracle: qemu-img snapshot");
        }
        _ => {
            let q = c.qemu_img(&["bitmap", "--add", IMAGE, "bitmap0"]);
            assert!(q.status.success(), "oracle: qemu-img bitmap --add");
        }
    }
    qemu_io_ok("qcow2", &base, &["write -P 1 0x7ffd0000 192k"]);
    qemu_io_ok("qcow2", &itmd, &["write -P 2 0x7ffe0000 128k"]);
    let tail = format!("{} 512", len - 512);
    c.qemu_io(&["write -P 3 0x7fff0000 64k", &format!("write -P 4 {tail}")]);
    let q = if pass == 0 {
        c.qemu_img(&["commit", IMAGE])
    } else {
        c.qemu_img(&["commit", "-b", "base.qcow2", IMAGE])
    };
    assert!(
        q.status.success(),
        "oracle: qemu-img commit: {}",
        stderr(&q)
    );
    let c = c.damaged();

    // What each layer reads, as the iotest checks it: all four patterns where the
    // commit put them.
    let all = vec![
        "read -P 1 0x7ffd0000 64k".to_string(),
        "read -P 2 0x7ffe0000 64k".into(),
        "read -P 3 0x7fff0000 64k".into(),
        format!("read -P 4 {tail}"),
    ];
    let reads: Vec<(&str, Vec<String>)> = if pass == 0 {
        vec![
            (
                "base.qcow2",
                vec![
                    "read -P 1 0x7ffd0000 192k".to_string(),
                    format!("read -P 0 {tail}"),
                ],
            ),
            ("itmd.qcow2", all.clone()),
            (IMAGE, all),
        ]
    } else {
        vec![
            ("base.qcow2", all.clone()),
            (
                "itmd.qcow2",
                vec![
                    "read -P 1 0x7ffd0000 64k".to_string(),
                    "read -P 2 0x7ffe0000 128k".into(),
                    format!("read -P 4 {tail}"),
                ],
            ),
            (IMAGE, all),
        ]
    };
    for (file, cmds) in &reads {
        let path = dir.join(file);
        for cmd in cmds {
            qemu_io_ok("qcow2", &path, &[cmd]);
            c.qcowx_reads_pattern(file, cmd);
        }
    }
    for file in ["base.qcow2", "itmd.qcow2", IMAGE] {
        let q = qemu_check(&dir.join(file));
        let x = c.qcowx_check(file);
        assert_eq!(
            x.code, q.code,
            "{}: qcowx check {file} exits {} where qemu-img check exits {}:\n{}",
            c.name, x.code, q.code, x.text
        );
    }

    if reason == "bitmap" {
        let info = qcowx_tests::qemu_info(&c.img, true);
        assert!(
            info["format-specific"]["data"]["bitmaps"][0]["name"] == "bitmap0",
            "oracle: the commit dropped the bitmap: {info}"
        );
    }

    // A qcowx write into the top image, then QEMU's view of it.
    let out = c.qcowx_io(IMAGE, &["write -P 5 0x7fff8000 32k"]);
    qcowx_tests::cli::assert_ok(&out, &format!("{}: qcowx io write into the top", c.name));
    qemu_check(&c.img).assert_clean(&format!("{}: after qcowx's write", c.name));
    c.qemu_io(&["read -P 3 0x7fff0000 32k", "read -P 5 0x7fff8000 32k"]);
    let info = qcowx_tests::qemu_info(&c.img, true);
    if reason == "snapshot" {
        let snaps = info["snapshots"].as_array().cloned().unwrap_or_default();
        assert!(
            snaps.iter().any(|s| s["name"] == "snap"),
            "{}: the snapshot is gone: {info}",
            c.name
        );
    } else {
        let bitmaps = info["format-specific"]["data"]["bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // qcowx does not update bitmaps: a writable open clears the bitmaps autoclear
        // bit (spec/qcowx-format.md §10), as the qcow2 format asks of a writer that
        // does not; QEMU then treats the bitmap as inconsistent and drops it. Either
        // the bitmap is still valid or the bit is clear, never a stale valid bitmap.
        let autoclear = c.peek64(88);
        assert!(
            bitmaps.iter().any(|b| b["name"] == "bitmap0") || autoclear & 1 == 0,
            "{}: the bitmap is gone with the bitmaps autoclear bit still set: {info}",
            c.name
        );
    }
}

#[test]
fn iotest_176_commit_snapshot_into_itmd() {
    commit_176("snapshot", 0);
}

#[test]
fn iotest_176_commit_snapshot_into_base() {
    commit_176("snapshot", 3);
}

#[test]
fn iotest_176_commit_bitmap_into_itmd() {
    commit_176("bitmap", 0);
}

#[test]
fn iotest_176_commit_bitmap_into_base() {
    commit_176("bitmap", 3);
}
