//! `qcowx amend -o compat=0.10`: the downgrade to version 2, judged against
//! `qemu-img amend -o compat=0.10` on a copy of the same image. The images are QEMU's
//! iotest 061 cases (zero clusters in the active layer, in snapshots, in L2 tables
//! shared with a snapshot, over a backing file; a dirty image; unknown feature bits)
//! and an image of qcowx's own VDIs and snapshots. After each: version 2, `qemu-img
//! check` clean, and every layer reads in QEMU as after QEMU's own downgrade. What
//! qemu-img refuses, qcowx refuses, leaving the file as it was; persistent bitmaps,
//! which qemu-img leaves behind broken, qcowx removes.

use qcowx_tests::cli::{assert_ok, stderr};
use qcowx_tests::damaged::{Case, IMAGE};
use qcowx_tests::{qemu_check, qemu_img_create, qemu_info, qemu_io_ok, require_qemu_tools};

const M64: u64 = 64 << 20;

/// The image's version as QEMU reports it.
fn compat(c: &Case, file: &str) -> String {
    qemu_info(&c.path().join(file), false)["format-specific"]["data"]["compat"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Downgrades a copy of the case image with each tool and compares them: both
/// version 2, QEMU's check clean on qcowx's, the same bytes in every layer (the
/// active one and each of `snapshots`) as QEMU reads them, qcowx reading its own
/// result as QEMU does.
fn downgrade_like_qemu(c: &Case, snapshots: &[&str]) {
    let (x, q) = (c.copy("by-qcowx"), c.copy("by-qemu"));
    let out = c.qemu_img(&["amend", "-o", "compat=0.10", &q]);
    assert!(out.status.success(), "{}: oracle: {}", c.name, stderr(&out));
    assert_ok(
        &c.qcowx(&["amend", "-o", "compat=0.10", &x]),
        &format!("{}: qcowx amend -o compat=0.10", c.name),
    );
    assert_eq!(compat(c, &x), "0.10", "{}", c.name);
    qemu_check(&c.path().join(&x)).assert_clean(&format!("{}: after qcowx's downgrade", c.name));
    let layers = std::iter::once(None).chain(snapshots.iter().map(|s| Some(*s)));
    for layer in layers {
        assert!(
            c.qemu_reads(&x, layer) == c.qemu_reads(&q, layer),
            "{}: QEMU reads {layer:?} differently after qcowx's downgrade",
            c.name
        );
    }
    c.reads_like_qemu(&x, snapshots);
    // QEMU can use what it got: revert to each snapshot, write, check.
    for s in snapshots {
        let out = c.qemu_img(&["snapshot", "-a", s, &x]);
        assert!(out.status.success(), "{}: qemu-img snapshot -a {s}", c.name);
        qemu_io_ok("qcow2", &c.path().join(&x), &["write -P 0x77 0 4k"]);
        qemu_check(&c.path().join(&x)).assert_clean(&format!("{}: QEMU wrote it", c.name));
    }
}

#[test]
fn iotest_061_zero_clusters_are_expanded_as_qemu_expands_them() {
    require_qemu_tools();
    let c = Case::create("active", M64, "compat=1.1,lazy_refcounts=on");
    c.qemu_io(&["write -P 0x11 256k 64k", "write -z 0 128k"]);
    downgrade_like_qemu(&c, &[]);

    // Preallocated zero clusters (data first, then zeroed in place).
    let c = Case::create("preallocated", 8 << 20, "");
    c.qemu_io(&["write -P 0x2a 0 8M", "write -z 0 8M"]);
    downgrade_like_qemu(&c, &[]);

    // Zero clusters a snapshot holds, under data the active layer wrote since.
    let c = Case::create("inactive", M64, "");
    c.qemu_io(&["write -z 0 128k"]);
    assert!(c
        .qemu_img(&["snapshot", "-c", "foo", IMAGE])
        .status
        .success());
    c.qemu_io(&["write -P 0x2a 0 128k"]);
    downgrade_like_qemu(&c, &["foo"]);

    // Zero clusters in an L2 table the active layer shares with a snapshot.
    let c = Case::create("shared-l2", M64, "");
    c.qemu_io(&["write -z 0 128k", "write -P 0x5 1M 64k"]);
    assert!(c
        .qemu_img(&["snapshot", "-c", "foo", IMAGE])
        .status
        .success());
    downgrade_like_qemu(&c, &["foo"]);
}

#[test]
fn iotest_061_zero_clusters_over_a_backing_file_become_zeros() {
    require_qemu_tools();
    for (name, snapshot) in [("backed", false), ("backed-shared-l2", true)] {
        let c = Case::create(name, M64, "");
        let base = c.path().join("base.qcow2");
        qemu_img_create(&base, M64, "");
        qemu_io_ok("qcow2", &base, &["write -P 0x2a 0 128k"]);
        let out = c.qemu_img(&["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", IMAGE]);
        assert!(out.status.success(), "{}", stderr(&out));
        c.qemu_io(&["write -z 0 64k"]);
        if snapshot {
            assert!(c
                .qemu_img(&["snapshot", "-c", "foo", IMAGE])
                .status
                .success());
            c.qemu_io(&["write -P 0x42 64k 64k"]);
            downgrade_like_qemu(&c, &["foo"]);
        } else {
            downgrade_like_qemu(&c, &[]);
        }
        // (The first 4 KiB were written by QEMU after a revert in the second case.)
        qemu_io_ok(
            "qcow2",
            &c.path().join("by-qcowx.qcow2"),
            &["read -P 0 4k 60k"],
        );
    }
}

#[test]
fn iotest_061_dirty_images_and_unknown_bits_are_downgraded() {
    require_qemu_tools();
    let c = Case::create("dirty", M64, "compat=1.1,lazy_refcounts=on");
    let out = c.qemu_io_raw(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x2a 0 128k",
        "-c",
        "flush",
        "-c",
        "abort",
        IMAGE,
    ]);
    assert!(!out.status.success(), "qemu-io aborted");
    assert_eq!(c.bytes()[79] & 1, 1, "oracle: QEMU left the dirty bit set");
    downgrade_like_qemu(&c, &[]);

    let c = Case::create("unknown-bits", M64, "");
    let (compatible, autoclear) = (c.peek64(80), c.peek64(88));
    c.poke64(80, compatible | 1 << 42);
    c.poke64(88, autoclear | 1 << 42);
    downgrade_like_qemu(&c, &[]);
}

/// qcowx's own VDIs and snapshots (16-bit refcounts, as version 2 has): every entry
/// of the snapshot table reads in QEMU, after the downgrade, what qcowx read before.
#[test]
fn an_image_of_vdis_and_snapshots_downgrades_with_every_root_intact() {
    require_qemu_tools();
    let c = Case::create("vdis", 8 << 20, "refcount_bits=16");
    let steps: [&[&str]; 6] = [
        &[
            "io",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -z 2M 1M",
            IMAGE,
        ],
        &["snapshot", IMAGE, "s1"],
        &["fork", IMAGE, "s1", "web"],
        &["io", "--vdi", "web", "-c", "write -z 0 64k", IMAGE],
        &["snapshot", "--vdi", "web", IMAGE, "w1"],
        &[
            "io",
            "-c",
            "write -z 512k 128k",
            "-c",
            "write -P 0x22 4M 64k",
            IMAGE,
        ],
    ];
    for args in steps {
        assert_ok(&c.qcowx(args), &format!("qcowx {args:?}"));
    }
    let info = qemu_info(&c.img, false);
    let entries: Vec<String> = info["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert!(entries.len() >= 3, "{entries:?}");
    let before: Vec<Vec<u8>> = std::iter::once(None)
        .chain(entries.iter().map(|s| Some(s.as_str())))
        .map(|l| c.qemu_reads(IMAGE, l))
        .collect();
    assert_ok(
        &c.qcowx(&["amend", "-o", "compat=0.10", IMAGE]),
        "downgrade",
    );
    assert_eq!(compat(&c, IMAGE), "0.10");
    qemu_check(&c.img).assert_clean("qcowx's image downgraded");
    let after: Vec<Vec<u8>> = std::iter::once(None)
        .chain(entries.iter().map(|s| Some(s.as_str())))
        .map(|l| c.qemu_reads(IMAGE, l))
        .collect();
    assert!(
        before == after,
        "a root reads otherwise after the downgrade"
    );
    // And back: the upgrade gives an image qcowx writes again, reading the same.
    assert_ok(&c.qcowx(&["amend", "-o", "compat=1.1", IMAGE]), "upgrade");
    assert_ok(
        &c.qcowx(&["io", "-c", "write -P 0x33 6M 4k", IMAGE]),
        "write",
    );
    qemu_check(&c.img).assert_clean("upgraded again and written");
    assert!(c.qemu_reads(IMAGE, Some("s1")) == before[1]);
}

/// Persistent bitmaps, which version 2 cannot hold: qemu-img goes on and leaves them
/// in the file, their clusters leaked and a warning at every open; qcowx removes
/// them, names each, and leaves an image QEMU opens without a word and checks clean,
/// reading as QEMU's result reads.
#[test]
fn a_downgrade_removes_persistent_bitmaps() {
    require_qemu_tools();
    let c = Case::create("bitmaps", M64, "");
    for b in ["b0", "b1"] {
        let out = c.qemu_img(&["bitmap", "--add", IMAGE, b]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    c.qemu_io(&["write -P 0x3 0 192k", "write -z 1M 64k"]);
    let (x, q) = (c.copy("by-qcowx"), c.copy("by-qemu"));
    let out = c.qemu_img(&["amend", "-o", "compat=0.10", &q]);
    assert!(out.status.success(), "oracle: {}", stderr(&out));

    let out = c.qcowx(&["amend", "-o", "compat=0.10", &x]);
    assert_ok(&out, "qcowx amend -o compat=0.10 with bitmaps");
    for b in ["'b0'", "'b1'"] {
        assert!(
            stderr(&out).contains(&format!("removed persistent bitmap {b}")),
            "{b} named: {}",
            stderr(&out)
        );
    }
    assert_eq!(compat(&c, &x), "0.10");
    qemu_check(&c.path().join(&x)).assert_clean("after qcowx's downgrade of an image with bitmaps");
    let info = c.qemu_img(&["info", "--output=json", &x]);
    assert!(
        info.status.success() && stderr(&info).is_empty(),
        "QEMU opens it without a warning: {}",
        stderr(&info)
    );
    let json: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        json["format-specific"]["data"].get("bitmaps").is_none(),
        "no bitmaps left: {json:#}"
    );
    assert!(
        c.qemu_reads(&x, None) == c.qemu_reads(&q, None),
        "QEMU reads both alike"
    );
    // And it upgrades and takes writes again.
    assert_ok(
        &c.qcowx(&["amend", "-o", "compat=1.1", &x]),
        "upgrade again",
    );
    qemu_io_ok("qcow2", &c.path().join(&x), &["write -P 0x9 64k 4k"]);
    qemu_check(&c.path().join(&x)).assert_clean("upgraded again and written");
}

/// What qemu-img refuses to downgrade, qcowx refuses, the file unchanged: refcounts
/// wider than 16 bits, subclusters (an incompatible feature), zstd-compressed
/// clusters, a snapshot of another size.
#[test]
fn refused_downgrades_leave_the_file_as_it_was() {
    require_qemu_tools();
    let cases: [(&str, &str, &[&str]); 4] = [
        ("refcount-bits-32", "refcount_bits=32", &[]),
        ("subclusters", "extended_l2=on", &[]),
        ("zstd", "compression_type=zstd", &["write -c -P 0x3 0 64k"]),
        ("resized-snapshot", "", &["snapshot-then-resize"]),
    ];
    for (name, opts, setup) in cases {
        let c = Case::create(name, M64, opts);
        for step in setup {
            match *step {
                "snapshot-then-resize" => {
                    assert!(c
                        .qemu_img(&["snapshot", "-c", "foo", IMAGE])
                        .status
                        .success());
                    assert!(c.qemu_img(&["resize", IMAGE, "128M"]).status.success());
                }
                cmd => c.qemu_io(&[cmd]),
            }
        }
        let q = c.copy("by-qemu");
        let out = c.qemu_img(&["amend", "-o", "compat=0.10", &q]);
        assert!(!out.status.success(), "{name}: oracle refuses");
        let before = c.bytes();
        let out = c.qcowx(&["amend", "-o", "compat=0.10", IMAGE]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("compat=0.10"),
            "{name}: the message names the downgrade: {}",
            stderr(&out)
        );
        assert!(
            c.bytes() == before,
            "{name}: the refused downgrade changed the file"
        );
    }
}
