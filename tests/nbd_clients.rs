//! `qcowx-nbd` against real NBD clients reading and writing exports: QEMU's
//! (`qemu-io`, `qemu-img convert` and `qemu-img map` with `nbd+unix://` and `nbd://`
//! URIs) and libnbd's tools (`nbdinfo`, `nbdcopy`), on one export and on several
//! exports (VDIs and snapshots) at once.
//!
//! Every test starts its own server process and checks the image afterwards with
//! qcowx and `qemu-img check`; the shared helpers and the conventions (tools, the
//! server binary, `QCOWX_NBD`) are in `qcowx_tests::nbd_tools` (tests/src/nbd_tools.rs).

use std::sync::Arc;
use std::thread;

use qcowx_core::{CreateOptions, Image};
use qcowx_tests::nbd_tools::*;
use qcowx_tests::*;

// ---- QEMU's client -----------------------------------------------------------------------

#[test]
fn qemu_io_reads_writes_flushes_discards_and_zeroes_over_a_unix_socket() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    let size = 64 << 20;
    new_image(&img, size);
    let pidfile = dir.path().join("server.pid");
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock_in(&dir)),
        &[
            "-t",
            "--discard=unmap",
            "--pid-file",
            pidfile.to_str().unwrap(),
        ],
    );
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert_eq!(pid, server.pid());
    assert!(server
        .banner()
        .contains("qemu-system-x86_64 -drive file=nbd+unix:///default?socket="));
    let uri = server.uri("default");
    qemu_io_nbd(
        &uri,
        &[
            "write -P 0xa5 0 1M",
            "write -P 0x5a 4M 64k",
            "write -f -P 0x11 12M 4k",
            "write -P 0x22 12582912 512",
            "read -P 0xa5 0 1M",
            "read -P 0x5a 4M 64k",
            "read -P 0 5M 1M",
            "flush",
            "discard 0 128k",
            "read -P 0 0 128k",
            "write -z 8M 1M",
            "write -P 0x33 9M 64k",
            "write -z 9M 4k",
            "read -P 0 9M 4k",
            "read -P 0x33 9220k 60k",
            "aio_write -P 0x44 20M 64k",
            "aio_write -P 0x45 21M 64k",
            "aio_flush",
        ],
    );
    // The same through an nbd:// URI needs TCP; reads through a second connection.
    qemu_io_nbd(&uri, &["read -P 0x44 20M 64k", "read -P 0x45 21M 64k"]);
    server.stop();
    assert!(!pidfile.exists(), "pid file left behind");

    let mut want = ExpectedDisk::zeroed(size, 65536);
    want.write(0, &[0xa5; 1 << 20]);
    want.write(4 << 20, &[0x5a; 65536]);
    want.write(12 << 20, &[0x11; 4096]);
    want.write(12582912, &[0x22; 512]);
    want.discard(0, 128 << 10);
    want.zero(8 << 20, 1 << 20);
    want.write(9 << 20, &[0x33; 65536]);
    want.zero(9 << 20, 4096);
    want.write(20 << 20, &[0x44; 65536]);
    want.write(21 << 20, &[0x45; 65536]);
    let image = open_ro(&img);
    assert_image_eq_bytes(&image, want.as_bytes());
    assert!(
        !image.info().expect("info").dirty,
        "dirty after a clean shutdown"
    );
    drop(image);
    assert_qemu_check_clean(&img);
}

#[test]
fn qemu_img_converts_to_and_from_an_export_over_tcp() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    let size: u64 = 16 << 20;
    new_image(&img, size);
    // A source with data, zeros and a tail that is not cluster-aligned.
    let src = dir.path().join("src.raw");
    let mut bytes = vec![0u8; size as usize];
    Rng::new(7).fill(&mut bytes[..3 << 20]);
    Rng::new(8).fill(&mut bytes[(9 << 20)..(9 << 20) + 77777]);
    std::fs::write(&src, &bytes).unwrap();

    let server = QcowxNbd::listen(&img, Listen::Tcp, &["-t"]);
    let uri = server.uri("default");
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    run_ok(
        qemu_img()
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let back = dir.path().join("back.raw");
    run_ok(
        qemu_img()
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&back),
    );
    assert_eq!(
        std::fs::read(&back).unwrap(),
        bytes,
        "raw copy of the export"
    );
    let q = dir.path().join("back.qcow2");
    run_ok(
        qemu_img()
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&uri)
            .arg(&q),
    );
    assert_qemu_compare_eq(&q, "qcow2", &src, "raw");
    // qemu-io over nbd:// as well.
    qemu_io_nbd(&uri, &["write -P 0x77 15M 4k", "read -P 0x77 15M 4k"]);
    server.stop();

    bytes[15 << 20..(15 << 20) + 4096].fill(0x77);
    let image = open_ro(&img);
    assert_image_eq_bytes(&image, &bytes);
    drop(image);
    assert_qemu_check_clean(&img);
}

/// A metadata-preallocated image QEMU made and wrote a little, served: `base:
/// allocation` says zero (not a hole) where the file holds holes under allocated
/// clusters and data where QEMU wrote, as qemu-nbd reports them (from `qemu-img map`'s
/// `data` and `zero`); the content reads as QEMU reads it.
#[test]
fn a_metadata_preallocated_image_maps_over_nbd_as_qemu_nbd_would() {
    let dir = tempdir();
    let img = dir.path().join("pm.qcow2");
    run_ok(
        qemu_img()
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata",
            ])
            .arg(&img)
            .arg("16M"),
    );
    qemu_io_ok(
        "qcow2",
        &img,
        &["write -P 0x31 1M 64k", "write -P 0x32 9M 4k"],
    );
    let file_map = cli::json(&run_ok(
        qemu_img()
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(&img),
    ));
    // qemu-nbd's flags: hole unless `data`, zero where `zero`.
    let want = merge_runs(map_entries(&file_map).into_iter().map(|(s, l, e)| {
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        (s, s + l, u64::from(!data) | (u64::from(zero) << 1))
    }));
    assert!(
        want.iter().any(|r| r.2 == 2),
        "zero-but-allocated expected: {want:?}"
    );
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t", "-r"]);
    let uri = server.uri("default");
    let base_map = cli::json(&run_ok(nbdinfo().args(["--map", "--json"]).arg(&uri)));
    let got = merge_runs(
        map_entries(&base_map)
            .into_iter()
            .map(|(s, l, e)| (s, s + l, e["type"].as_u64().unwrap())),
    );
    assert_eq!(got, want, "nbdinfo --map vs qemu-img map's data and zero");
    let copy = export_bytes(&server, "default", &dir.path().join("copy.raw"));
    let mut expect = vec![0u8; 16 << 20];
    expect[1 << 20..(1 << 20) + 65536].fill(0x31);
    expect[9 << 20..(9 << 20) + 4096].fill(0x32);
    assert!(copy == expect, "content over NBD");
    drop(server);
    assert_qemu_check_clean(&img);
}

#[test]
fn qemu_img_map_over_nbd_matches_the_image_allocation() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let size: u64 = 8 << 20;
    qemu_img_create(&base, size, "");
    qemu_io_ok(
        "qcow2",
        &base,
        &["write -P 0xb0 0 2M", "write -P 0xb1 6M 512k"],
    );
    let mut opts = CreateOptions::new(size);
    opts.backing_file = Some("base.qcow2".into());
    opts.backing_format = Some("qcow2".into());
    let image = Image::create(&top, &opts).expect("create top");
    image.write_at(&[0xc0; 65536 * 3], 1 << 20).unwrap();
    image.write_zeroes(4 << 20, 1 << 20, false).unwrap();
    image.write_at(&[0xc1; 4096], 7 << 20).unwrap();
    image.close().unwrap();

    let server = QcowxNbd::listen(&top, Listen::Unix(&sock_in(&dir)), &["-t", "-r"]);
    let uri = server.uri("default");
    // The file's own map, as QEMU sees it (the server holds a shared lock only).
    let file_map = cli::json(&run_ok(
        qemu_img()
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(&top),
    ));
    let nbd_map = cli::json(&run_ok(
        qemu_img()
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&uri),
    ));
    let data_of = |v: &serde_json::Value| {
        merge_runs(
            map_entries(v)
                .into_iter()
                .map(|(s, l, e)| (s, s + l, e["data"].as_bool().expect("data"))),
        )
    };
    assert_eq!(
        data_of(&nbd_map),
        data_of(&file_map),
        "data extents over NBD differ from the file's\nnbd: {nbd_map}\nfile: {file_map}"
    );
    // qemu:allocation-depth: 0 unallocated, 1 this image, 2 the backing file.
    let depth_map = cli::json(&run_ok(
        nbdinfo()
            .args(["--map=qemu:allocation-depth", "--json"])
            .arg(&uri),
    ));
    let depths = merge_runs(
        map_entries(&depth_map)
            .into_iter()
            .map(|(s, l, e)| (s, s + l, e["type"].as_u64().expect("type"))),
    );
    let want = merge_runs(map_entries(&file_map).into_iter().map(|(s, l, e)| {
        let d = if e["present"].as_bool().unwrap() {
            e["depth"].as_u64().unwrap() + 1
        } else {
            0
        };
        (s, s + l, d)
    }));
    assert_eq!(depths, want, "allocation depth over NBD vs qemu-img map");
    assert!(
        depths.iter().any(|r| r.2 == 2),
        "backing data expected: {depths:?}"
    );
    assert!(
        depths.iter().any(|r| r.2 == 0),
        "unallocated expected: {depths:?}"
    );
    // base:allocation through nbdinfo: data where qemu-img says data.
    let base_map = cli::json(&run_ok(nbdinfo().args(["--map", "--json"]).arg(&uri)));
    let nbd_data = merge_runs(
        map_entries(&base_map)
            .into_iter()
            .map(|(s, l, e)| (s, s + l, e["type"].as_u64().unwrap() & 1 == 0)),
    );
    assert_eq!(
        nbd_data,
        data_of(&file_map),
        "nbdinfo --map vs qemu-img map"
    );
    // Content, with the backing file showing through.
    let copy = export_bytes(&server, "default", &dir.path().join("copy.raw"));
    let raw = dir.path().join("top.raw");
    run_ok(
        qemu_img()
            .args(["convert", "-U", "-O", "raw"])
            .arg(&top)
            .arg(&raw),
    );
    assert_eq!(
        copy,
        std::fs::read(&raw).unwrap(),
        "export content vs qemu-img convert"
    );
    server.stop();
}

// ---- libnbd's tools ----------------------------------------------------------------------

#[test]
fn nbdinfo_lists_every_vdi_and_snapshot() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock_in(&dir)),
        &["-t", "-D", "main disk"],
    );
    let list = cli::json(&run_ok(
        nbdinfo().args(["--list", "--json"]).arg(server.uri("")),
    ));
    let exports = list["exports"].as_array().expect("exports");
    let mut seen: Vec<(String, bool)> = exports
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["is_read_only"].as_bool().unwrap(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("default".to_string(), false),
            ("default@s1".to_string(), true),
            ("web".to_string(), false),
            ("web@w1".to_string(), true),
        ]
    );
    let main = exports
        .iter()
        .find(|e| e["export-name"] == "default")
        .unwrap();
    assert_eq!(main["description"], "main disk");

    let info = cli::json(&run_ok(nbdinfo().arg("--json").arg(server.uri("web@w1"))));
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 4 << 20);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 65536);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(info["structured"], true);
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(contexts.contains(&"base:allocation") && contexts.contains(&"qemu:allocation-depth"));

    // --map of each export shows its own allocation.
    let map = |export: &str| {
        let v = cli::json(&run_ok(
            nbdinfo().args(["--map", "--json"]).arg(server.uri(export)),
        ));
        merge_runs(
            map_entries(&v)
                .into_iter()
                .map(|(s, l, e)| (s, s + l, e["type"].as_u64().unwrap() & 1 == 0)),
        )
    };
    let m = 1u64 << 20;
    assert_eq!(
        map("default@s1"),
        vec![(0, 65536, true), (65536, 4 * m, false)]
    );
    assert_eq!(
        map("web"),
        vec![
            (0, 65536, true),
            (65536, m, false),
            (m, m + 65536, true),
            (m + 65536, 4 * m, false)
        ]
    );
    // The default export "" is the default VDI.
    let plain = run_ok(nbdinfo().arg(server.uri("")));
    assert!(String::from_utf8_lossy(&plain.stdout).contains("export=\"default\""));
    server.stop();
}

#[test]
fn nbdcopy_copies_into_and_out_of_exports() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock_in(&dir)),
        &["-t", "--discard=unmap"],
    );
    let size = 4usize << 20;
    let mut src = vec![0u8; size];
    Rng::new(42).fill(&mut src[..(1 << 20) + 12345]);
    let src_path = dir.path().join("src.raw");
    std::fs::write(&src_path, &src).unwrap();
    // Into the forked VDI; then back out, and the snapshots unchanged.
    run_ok(nbdcopy().arg(&src_path).arg(server.uri("web")));
    let back = export_bytes(&server, "web", &dir.path().join("back.raw"));
    assert!(back == src, "nbdcopy round trip differs");
    let w1 = export_bytes(&server, "web@w1", &dir.path().join("w1.raw"));
    assert!(w1[..65536].iter().all(|&b| b == 0x01));
    assert!(w1[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0x03));
    let s1 = export_bytes(&server, "default@s1", &dir.path().join("s1.raw"));
    assert!(s1[..65536].iter().all(|&b| b == 0x01) && s1[65536..].iter().all(|&b| b == 0));
    let d = export_bytes(&server, "default", &dir.path().join("d.raw"));
    assert!(d[..65536].iter().all(|&b| b == 0x02), "default VDI changed");
    // Export to export.
    run_ok(
        nbdcopy()
            .arg(server.uri("web@w1"))
            .arg(server.uri("default")),
    );
    let d = export_bytes(&server, "default", &dir.path().join("d2.raw"));
    assert!(d == w1, "export-to-export copy differs");
    server.stop();

    let image = Arc::new(open_ro(&img));
    let web = image.open_root("web").unwrap();
    let mut got = vec![0u8; size];
    web.read_at(&mut got, 0).unwrap();
    assert!(got == src, "web VDI content after shutdown");
    drop(web);
    drop(image);
    assert_qemu_check_clean(&img);
}

#[test]
fn concurrent_clients_on_several_exports_stay_isolated() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t", "-e", "8"]);
    let jobs: Vec<(String, u8)> = vec![
        (server.uri("default"), 0xd0),
        (server.uri("web"), 0xe0),
        (server.uri("default"), 0xd8),
        (server.uri("web"), 0xe8),
    ];
    let handles: Vec<_> = jobs
        .into_iter()
        .enumerate()
        .map(|(i, (uri, p))| {
            thread::spawn(move || {
                // Each writer owns its own 512 KiB region of its VDI.
                let base = (4 + (i as u64 / 2)) << 19;
                let cmds: Vec<String> = (0..8u64)
                    .map(|k| format!("write -P {} {} 64k", p + k as u8, base + k * 65536))
                    .chain(std::iter::once("flush".to_string()))
                    .collect();
                let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
                qemu_io_nbd(&uri, &refs);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("writer");
    }
    let d = export_bytes(&server, "default", &dir.path().join("d.raw"));
    let w = export_bytes(&server, "web", &dir.path().join("w.raw"));
    for k in 0..8u64 {
        let at = |i: u64| (((4 + i / 2) << 19) + k * 65536) as usize;
        assert!(d[at(0)..at(0) + 65536].iter().all(|&b| b == 0xd0 + k as u8));
        assert!(d[at(2)..at(2) + 65536].iter().all(|&b| b == 0xd8 + k as u8));
        assert!(w[at(1)..at(1) + 65536].iter().all(|&b| b == 0xe0 + k as u8));
        assert!(w[at(3)..at(3) + 65536].iter().all(|&b| b == 0xe8 + k as u8));
    }
    // Nothing of default in web and the other way round, and the snapshots as taken.
    assert!(d[1 << 20..(1 << 20) + 65536].iter().all(|&b| b == 0));
    assert!(w[..65536].iter().all(|&b| b == 0x01));
    let s1 = export_bytes(&server, "default@s1", &dir.path().join("s1.raw"));
    assert!(s1[..65536].iter().all(|&b| b == 0x01) && s1[65536..].iter().all(|&b| b == 0));
    let w1 = export_bytes(&server, "web@w1", &dir.path().join("w1.raw"));
    assert!(w1[65536..1 << 20].iter().all(|&b| b == 0));
    assert!(w1[(1 << 20) + 65536..].iter().all(|&b| b == 0));
    server.stop();
    assert_qemu_check_clean(&img);
}
