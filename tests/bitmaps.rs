//! Persistent dirty bitmaps through qcowx's programs, judged by QEMU and libnbd: writes
//! through `qcowx io` and `qcowx-nbd` keep the bitmaps consistent and mark exactly the
//! ranges written; `qcowx-nbd -B NAME` exports `qemu:dirty-bitmap:NAME` as `qemu-nbd
//! -B NAME` does; a SIGKILLed server leaves them in use; an incremental backup loop
//! through `qcowx-nbd -B` restores the disk exactly.

use std::path::{Path, PathBuf};

use qcowx_tests::cli;
use qcowx_tests::{
    assert_qemu_check_clean, assert_qemu_compare_eq, convert_to_raw, libnbd_read_ranges,
    nbdinfo_dirty, qemu_bitmaps, qemu_img_create, qemu_img_ok, qemu_io_ok, qemu_nbd_dirty,
    require_qemu_tools, tempdir, QcowxNbd, QemuBitmap, Rng,
};

const MIB: u64 = 1 << 20;
const G: u64 = 65536;

fn image_with_bitmaps(dir: &Path) -> PathBuf {
    require_qemu_tools();
    let path = dir.join("disk.qcow2");
    qemu_img_create(&path, 64 * MIB, "");
    let p = path.to_str().unwrap();
    qemu_img_ok(&["bitmap", "--add", "-g", "65536", p, "b0"]);
    qemu_img_ok(&["bitmap", "--add", "--disable", "-g", "65536", p, "b1"]);
    path
}

fn consistent() -> Vec<QemuBitmap> {
    vec![
        QemuBitmap {
            name: "b0".into(),
            flags: vec!["auto".into()],
            granularity: G,
        },
        QemuBitmap {
            name: "b1".into(),
            flags: vec![],
            granularity: G,
        },
    ]
}

/// qemu-io over NBD (raw protocol) at `uri`.
fn nbd_io(uri: &str, cmds: &[&str]) {
    qemu_io_ok("raw", Path::new(uri), cmds);
}

#[test]
fn qcowx_io_writes_keep_bitmaps_consistent() {
    let dir = tempdir();
    let path = image_with_bitmaps(dir.path());
    cli::ok(
        dir.path(),
        &[
            "io",
            "-c",
            "write -P 0x11 0 4k",
            "-c",
            "write -z 8M 128k",
            "-c",
            "discard 16M 64k",
            "disk.qcow2",
        ],
    );
    assert_eq!(qemu_bitmaps(&path, false), consistent());
    assert_qemu_check_clean(&path);
    assert_eq!(
        qemu_nbd_dirty(&path, "b0", dir.path()),
        vec![(0, G), (8 * MIB, 2 * G), (16 * MIB, G)]
    );
    // qcowx info lists them as qemu-img info does, in JSON and in text.
    let ours = cli::json(&cli::ok(
        dir.path(),
        &["info", "--output=json", "disk.qcow2"],
    ));
    let theirs = qcowx_tests::qemu_info(&path, false);
    let key = |v: &serde_json::Value| v["format-specific"]["data"]["bitmaps"].clone();
    assert_eq!(key(&ours), key(&theirs));
    let block = |text: String| -> Vec<String> {
        text.lines()
            .skip_while(|l| l.trim() != "bitmaps:")
            .take_while(|l| !l.trim_start().starts_with("refcount bits"))
            .map(String::from)
            .collect()
    };
    let ours = block(cli::stdout(&cli::ok(dir.path(), &["info", "disk.qcow2"])));
    let theirs = block(cli::stdout(&cli::qemu_ok(
        dir.path(),
        &["info", "disk.qcow2"],
    )));
    assert!(ours.len() > 5, "{ours:?}");
    assert_eq!(ours, theirs);
    assert_eq!(qemu_nbd_dirty(&path, "b1", dir.path()), vec![]);
}

#[test]
fn writes_through_qcowx_nbd_keep_bitmaps_consistent() {
    let dir = tempdir();
    let path = image_with_bitmaps(dir.path());
    let server = QcowxNbd::in_dir(dir.path(), &path, &["--discard=unmap"]);
    nbd_io(
        &server.uri(""),
        &["write -P 0x22 1M 100k", "write -z 2M 64k", "discard 32M 1M"],
    );
    server.stop();
    assert_eq!(qemu_bitmaps(&path, false), consistent());
    assert_qemu_check_clean(&path);
    assert_eq!(
        qemu_nbd_dirty(&path, "b0", dir.path()),
        vec![(MIB, 2 * G), (2 * MIB, G), (32 * MIB, MIB)]
    );
}

#[test]
fn qcowx_nbd_exports_a_bitmap_as_qemu_nbd_does() {
    let dir = tempdir();
    let path = image_with_bitmaps(dir.path());
    // QEMU dirties b0; a snapshot named like the bitmap shows which name wins.
    qemu_io_ok(
        "qcow2",
        &path,
        &["write 0 1k", "write 5M 300k", "write 63M 1M"],
    );
    qemu_img_ok(&["snapshot", "-c", "b0", path.to_str().unwrap()]);
    let theirs = qemu_nbd_dirty(&path, "b0", dir.path());
    assert_eq!(theirs.len(), 3, "{theirs:?}");

    let server = QcowxNbd::in_dir(
        dir.path(),
        &path,
        &["-t", "-r", "-B", "b0", "--bitmap", "b1"],
    );
    let uri = server.uri("");
    assert_eq!(nbdinfo_dirty(&uri, "b0"), theirs);
    assert_eq!(nbdinfo_dirty(&uri, "b1"), vec![]);
    server.stop();

    // An enabled bitmap on a writable export is refused, as qemu-nbd refuses it; a
    // missing one too.
    for (args, needle) in [
        (&["-B", "b0"][..], "incompatible with a writable export"),
        (&["-r", "-B", "nope"][..], "bitmap 'nope' not found"),
    ] {
        let out = qcowx_tests::run(
            std::process::Command::new(qcowx_tests::qcowx_nbd_bin())
                .arg("-k")
                .arg(dir.path().join("refused.sock"))
                .args(args)
                .arg(&path)
                .env("QCOWX_RUNTIME_DIR", dir.path()),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_killed_server_leaves_the_bitmaps_in_use() {
    let dir = tempdir();
    let path = image_with_bitmaps(dir.path());
    // Persistent (-t): without it the server closes cleanly (storing the bitmaps) as
    // soon as its one client leaves, before the kill could land.
    let server = QcowxNbd::in_dir(dir.path(), &path, &["-t", "--discard=unmap"]);
    nbd_io(&server.uri(""), &["write -P 0x33 0 1M"]);
    server.kill9();
    let after = qemu_bitmaps(&path, true);
    assert!(
        after
            .iter()
            .all(|b| b.flags.contains(&"in-use".to_string())),
        "{after:?}"
    );
    let img = qcowx_core::Image::open(&path).unwrap();
    assert!(img.bitmaps().unwrap().iter().all(|b| b.in_use));
    assert!(img.bitmap_dirty("b0").is_err());
    drop(img);
    // As in QEMU, an inconsistent bitmap can only be removed; the other stays in use
    // through a writable session, and the image checks clean.
    cli::fails(
        dir.path(),
        &["bitmap", "--clear", "disk.qcow2", "b0"],
        &["inconsistent"],
    );
    cli::ok(dir.path(), &["bitmap", "--remove", "disk.qcow2", "b0"]);
    assert_qemu_check_clean(&path);
    assert_eq!(
        qemu_bitmaps(&path, false),
        vec![QemuBitmap {
            name: "b1".into(),
            flags: vec!["in-use".into()],
            granularity: G,
        }]
    );
}

#[test]
fn incremental_backup_through_qcowx_nbd_restores_the_disk() {
    let dir = tempdir();
    let path = image_with_bitmaps(dir.path());
    let backup = dir.path().join("backup.raw");
    let mut rng = Rng::new(19);
    // Full copy, then the bitmap starts from clean.
    nbd_writes(&path, dir.path(), &mut rng);
    convert_to_raw(&path, &backup);
    cli::ok(dir.path(), &["bitmap", "--clear", "disk.qcow2", "b0"]);
    assert_qemu_check_clean(&path);
    for round in 0..3 {
        nbd_writes(&path, dir.path(), &mut rng);
        assert_qemu_check_clean(&path);
        let server = QcowxNbd::in_dir(dir.path(), &path, &["-t", "-r", "-B", "b0"]);
        let uri = server.uri("");
        let dirty = nbdinfo_dirty(&uri, "b0");
        assert!(!dirty.is_empty(), "round {round}: nothing dirty");
        let bytes = libnbd_read_ranges(&[(uri, dirty.clone())], dir.path()).remove(0);
        server.stop();
        let mut at = 0usize;
        for (off, len) in &dirty {
            qcowx_tests::patch(&backup, *off, &bytes[at..at + *len as usize]);
            at += *len as usize;
        }
        assert_qemu_compare_eq(&backup, "raw", &path, "qcow2");
        let copied: u64 = dirty.iter().map(|r| r.1).sum();
        assert!(
            copied < 64 * MIB / 2,
            "round {round}: copied {copied} bytes"
        );
        cli::ok(dir.path(), &["bitmap", "--clear", "disk.qcow2", "b0"]);
        assert_qemu_check_clean(&path);
        assert_eq!(qemu_nbd_dirty(&path, "b0", dir.path()), vec![]);
    }
}

/// A few random writes, zero writes and discards through a writable qcowx-nbd.
fn nbd_writes(path: &Path, dir: &Path, rng: &mut Rng) {
    let server = QcowxNbd::in_dir(dir, path, &["--discard=unmap"]);
    let mut cmds = Vec::new();
    for _ in 0..6 {
        let off = rng.below(64 * MIB - 256 * 1024) & !511;
        let len = (1 + rng.below(256)) * 512;
        let pat = rng.below(255) + 1;
        cmds.push(match rng.below(4) {
            0 => format!("write -z {off} {len}"),
            1 => format!("discard {off} {len}"),
            _ => format!("write -P {pat} {off} {len}"),
        });
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    nbd_io(&server.uri(""), &cmds);
    server.stop();
}

#[test]
fn qcowx_bitmap_on_a_served_image_goes_to_its_server() {
    let dir = tempdir();
    let path = image_with_bitmaps(dir.path());
    let server = QcowxNbd::in_dir(dir.path(), &path, &["-t", "--discard=unmap"]);
    let uri = server.uri("");
    nbd_io(&uri, &["write -P 0x44 0 64k"]);
    let p = path.to_str().unwrap();
    for args in [
        ["bitmap", "--add", "-g", "4096", p, "nb"],
        ["bitmap", "--clear", "--merge", "b0", p, "b1"],
    ] {
        let out = qcowx_tests::run(server.qcowx().args(args));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            qcowx_tests::describe(&out)
        );
    }
    nbd_io(&uri, &["write -P 0x55 1M 4k"]);
    server.stop();
    assert_qemu_check_clean(&path);
    let names: Vec<String> = qemu_bitmaps(&path, false)
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["b0", "b1", "nb"]);
    // b1 got b0's bits (the first write) through the server; nb only saw the second.
    assert_eq!(qemu_nbd_dirty(&path, "b1", dir.path()), vec![(0, G)]);
    assert_eq!(qemu_nbd_dirty(&path, "nb", dir.path()), vec![(MIB, 4096)]);
}

/// The dirty ranges of every bitmap of `path`, as qcowx reads them.
fn dirty_of(path: &Path) -> Vec<(String, Vec<(u64, u64)>)> {
    let img = qcowx_core::Image::open(path).unwrap();
    let mut out: Vec<_> = img
        .bitmaps()
        .unwrap()
        .into_iter()
        .map(|b| (b.name.clone(), img.bitmap_dirty(&b.name).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn convert_bitmaps_copies_them_as_qemu_img_does() {
    let dir = tempdir();
    let src = image_with_bitmaps(dir.path());
    let p = src.to_str().unwrap();
    // b0 (enabled) sees these writes; b2 (4 KiB granules) sees them and is then
    // disabled, keeping its bits; b1 stays empty and disabled.
    qemu_img_ok(&["bitmap", "--add", "-g", "4096", p, "b2"]);
    qemu_io_ok(
        "qcow2",
        &src,
        &[
            "write -P 1 0 100k",
            "write -P 2 10M 4k",
            "write -P 3 63M 1M",
        ],
    );
    qemu_img_ok(&["bitmap", "--disable", p, "b2"]);
    let run_both =
        |extra: &[&str], q: &str, x: &str| -> (std::process::Output, std::process::Output) {
            let mut qa = vec!["convert"];
            qa.extend_from_slice(extra);
            qa.extend(["-O", "qcow2", p]);
            let qo = qcowx_tests::qemu_img_run(&[&qa[..], &[q]].concat());
            let xo = std::process::Command::new(qcowx_tests::qcowx_cli_bin())
                .args(&qa[..])
                .arg(x)
                .output()
                .unwrap();
            (qo, xo)
        };
    let (q, x) = (dir.path().join("q.qcow2"), dir.path().join("x.qcow2"));
    let (qo, xo) = run_both(&["--bitmaps"], q.to_str().unwrap(), x.to_str().unwrap());
    assert!(qo.status.success() && xo.status.success(), "{qo:?} {xo:?}");
    assert_eq!(qemu_bitmaps(&x, false), qemu_bitmaps(&q, false));
    assert_eq!(qemu_bitmaps(&x, false).len(), 3);
    let dirty = dirty_of(&x);
    assert_eq!(dirty, dirty_of(&q));
    assert_eq!(dirty, dirty_of(&src), "the bits are the source's");
    assert!(dirty
        .iter()
        .any(|(n, d)| n == "b2" && d.contains(&(10 * MIB, 4096))));
    assert_qemu_check_clean(&x);
    assert_qemu_compare_eq(&x, "qcow2", &src, "qcow2");

    // Bitmaps left in use (a server killed while serving) refuse the conversion, or
    // with --skip-broken-bitmaps are left out; one added after the kill is copied.
    let server = QcowxNbd::in_dir(dir.path(), &src, &["-t"]);
    nbd_io(&server.uri(""), &["write -P 9 0 64k"]);
    server.kill9();
    qemu_img_ok(&["bitmap", "--add", "-g", "65536", p, "fresh"]);
    let (q2, x2) = (dir.path().join("q2.qcow2"), dir.path().join("x2.qcow2"));
    let (qo, xo) = run_both(&["--bitmaps"], q2.to_str().unwrap(), x2.to_str().unwrap());
    assert!(
        !qo.status.success() && !xo.status.success(),
        "{qo:?} {xo:?}"
    );
    assert!(
        String::from_utf8_lossy(&xo.stderr).contains("inconsistent"),
        "{xo:?}"
    );
    assert!(!x2.exists(), "nothing written");
    let (qo, xo) = run_both(
        &["--bitmaps", "--skip-broken-bitmaps"],
        q2.to_str().unwrap(),
        x2.to_str().unwrap(),
    );
    assert!(qo.status.success() && xo.status.success(), "{qo:?} {xo:?}");
    assert_eq!(qemu_bitmaps(&x2, false), qemu_bitmaps(&q2, false));
    let names: Vec<String> = qemu_bitmaps(&x2, false)
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["fresh"]);
    assert!(String::from_utf8_lossy(&xo.stderr).contains("skipping inconsistent bitmap"));
}

#[test]
fn bitmap_merge_from_another_file_marks_what_qemu_img_marks() {
    let dir = tempdir();
    let src = image_with_bitmaps(dir.path());
    qemu_io_ok("qcow2", &src, &["write -P 1 0 4k", "write -P 2 5M 100k"]);
    let (q, x) = (dir.path().join("q.qcow2"), dir.path().join("x.qcow2"));
    for f in [&q, &x] {
        qemu_img_create(f, 64 * MIB, "");
        qemu_img_ok(&["bitmap", "--add", f.to_str().unwrap(), "dst"]);
    }
    let s = src.to_str().unwrap();
    qemu_img_ok(&[
        "bitmap",
        "--merge",
        "b0",
        "-b",
        s,
        "-F",
        "qcow2",
        q.to_str().unwrap(),
        "dst",
    ]);
    cli::ok(
        dir.path(),
        &[
            "bitmap",
            "--merge",
            "b0",
            "-b",
            "disk.qcow2",
            "-F",
            "qcow2",
            "x.qcow2",
            "dst",
        ],
    );
    let dirty = dirty_of(&x);
    assert_eq!(dirty, dirty_of(&q));
    assert_eq!(dirty, [("dst".to_string(), vec![(0, G), (5 * MIB, 2 * G)])]);
    assert_qemu_check_clean(&x);
    // The source file is only read.
    assert_eq!(qemu_bitmaps(&src, false), consistent());
    // A merge file without --merge, or a bitmap it does not hold, is refused.
    cli::fails(
        dir.path(),
        &[
            "bitmap",
            "--merge",
            "nope",
            "-b",
            "disk.qcow2",
            "x.qcow2",
            "dst",
        ],
        &["nope"],
    );
}

/// Growing a disk grows its bitmaps, as `qemu-img resize` and `amend -o size=` do:
/// the same steps by QEMU and by qcowx on two copies leave the same bitmaps, each
/// marking what was written before and after the resize (one write lands past the
/// old end), and both images check clean. The last resize takes b2 (4 KiB
/// granularity) past one cluster of bitmap data: a 64 KiB cluster covers 2 GiB at
/// 4 KiB granularity, so its table grows from 1 entry to 2.
#[test]
fn a_resize_grows_the_bitmaps_as_qemu_does() {
    let dir = tempdir();
    let path = image_with_bitmaps(dir.path());
    let p = path.to_str().unwrap();
    qemu_img_ok(&["bitmap", "--add", "-g", "4096", p, "b2"]);
    qemu_io_ok("qcow2", &path, &["write -P 0x11 1M 64k"]);
    let (q, x) = (dir.path().join("q.qcow2"), dir.path().join("x.qcow2"));
    std::fs::copy(&path, &q).unwrap();
    std::fs::copy(&path, &x).unwrap();
    let qs = q.to_str().unwrap();

    qemu_img_ok(&["resize", qs, "128M"]);
    qemu_io_ok("qcow2", &q, &["write -P 0x22 100M 64k"]);
    qemu_img_ok(&["amend", "-o", "size=3G", qs]);
    qemu_io_ok("qcow2", &q, &["write -P 0x33 2500M 4k"]);

    cli::ok(dir.path(), &["resize", "x.qcow2", "128M"]);
    cli::ok(
        dir.path(),
        &["io", "-c", "write -P 0x22 100M 64k", "x.qcow2"],
    );
    cli::ok(dir.path(), &["amend", "-o", "size=3G", "x.qcow2"]);
    cli::ok(
        dir.path(),
        &["io", "-c", "write -P 0x33 2500M 4k", "x.qcow2"],
    );

    assert_qemu_check_clean(&x);
    assert_eq!(qemu_bitmaps(&x, false), qemu_bitmaps(&q, false));
    for b in ["b0", "b1", "b2"] {
        let theirs = qemu_nbd_dirty(&q, b, dir.path());
        assert_eq!(qemu_nbd_dirty(&x, b, dir.path()), theirs, "{b}");
        if b != "b1" {
            assert_eq!(theirs.len(), 3, "{b}: the three writes: {theirs:?}");
        }
    }
    assert_eq!(dirty_of(&x), dirty_of(&q));
    assert_qemu_compare_eq(&x, "qcow2", &q, "qcow2");
}
