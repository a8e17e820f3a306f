//! `qcowx-nbd` against real NBD clients: QEMU's (`qemu-io`, `qemu-img` with
//! `nbd+unix://` and `nbd://` URIs) and libnbd's (`nbdinfo`, `nbdcopy`, `nbdsh`).
//!
//! Every test starts its own server process on a temporary Unix socket (or a free TCP
//! port), talks to it with the tools, stops it (SIGTERM, or SIGKILL where the test is
//! about crashes) and waits for it with a time limit, then checks the image with
//! qcowx and with `qemu-img check`. The tools come from Debian packages `qemu-utils`,
//! `libnbd-bin` and `python3-libnbd`; a missing tool fails the test with a message
//! naming its package (scripts/test installs them).
//!
//! The server binary is built on first use with the same cargo profile as this test
//! (`cargo build -p qcowx-nbd`); set `QCOWX_NBD=/path/to/qcowx-nbd` to use another.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use qcowx_core::{CreateOptions, Image};
use qcowx_tests::*;

// ---- tools ------------------------------------------------------------------------------

/// Python helpers prepended to every nbdsh script.
const PY_PRELUDE: &str = r#"
import nbd
def expect_err(name, f, *a, **k):
    try:
        f(*a, **k)
    except nbd.Error as e:
        assert e.errno == name, "%s%r: expected %s, got %s: %s" % (f.__name__, a, name, e.errno, e.string)
        return
    raise AssertionError("%s%r: expected %s, but it succeeded" % (f.__name__, a, name))
"#;

/// Runs an nbdsh script (the handle is `h`, not yet connected); fails the test if
/// the script fails. Returns stdout.
fn nbdsh_ok(script: &str) -> String {
    let full = format!("{PY_PRELUDE}\n{script}");
    let out = run(nbdsh().args(["-c", &full]));
    assert!(
        out.status.success(),
        "nbdsh script failed:\n{script}\n{}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---- the server under test ---------------------------------------------------------------

fn sock_in(dir: &TempDir) -> PathBuf {
    dir.path().join("nbd.sock")
}

/// A new qcowx image of `size` bytes (64 KiB clusters), closed.
fn new_image(path: &Path, size: u64) {
    let img = Image::create(path, &CreateOptions::new(size)).expect("create image");
    img.close().expect("close");
}

/// `qemu-io -f raw URI -c ...`, which must succeed.
fn qemu_io_nbd(uri: &str, cmds: &[&str]) -> Output {
    let mut c = qemu_io();
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run_ok(&mut c);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("Pattern verification failed") && !text.contains("failed:"),
        "qemu-io {uri}: {}",
        describe(&out)
    );
    out
}

/// The bytes of an export, through nbdcopy.
fn export_bytes(server: &QcowxNbd, export: &str, scratch: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(scratch);
    run_ok(nbdcopy().arg(server.uri(export)).arg(scratch));
    std::fs::read(scratch).expect("read copy")
}

/// Per-byte runs `(start, end, value)` merged where the value repeats.
fn merge_runs<T: PartialEq + Copy>(
    runs: impl IntoIterator<Item = (u64, u64, T)>,
) -> Vec<(u64, u64, T)> {
    let mut out: Vec<(u64, u64, T)> = Vec::new();
    for (s, e, v) in runs {
        if e <= s {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == s && last.2 == v => last.1 = e,
            _ => out.push((s, e, v)),
        }
    }
    out
}

/// `qemu-img map --output=json` entries as (start, length, JSON object).
fn map_entries(v: &serde_json::Value) -> Vec<(u64, u64, serde_json::Value)> {
    v.as_array()
        .expect("map JSON is an array")
        .iter()
        .map(|e| {
            let g = |k: &str| {
                e[k].as_u64()
                    .unwrap_or_else(|| panic!("{k} missing in {e}"))
            };
            let (s, l) = if e.get("start").is_some() {
                (g("start"), g("length"))
            } else {
                (g("offset"), g("length"))
            };
            (s, l, e.clone())
        })
        .collect()
}

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

/// An image with a default VDI, a snapshot of it, a forked VDI and its snapshot:
/// `default` (0x01 at 0, later 0x02), `default@s1` (0x01), `web` (forked from s1,
/// then 0x03 at 1M), `web@w1`.
fn image_with_vdis(path: &Path) {
    let image = Arc::new(Image::create(path, &CreateOptions::new(4 << 20)).expect("create"));
    image.write_at(&[0x01; 65536], 0).unwrap();
    image.snapshot("default", "s1").unwrap();
    image.write_at(&[0x02; 65536], 0).unwrap();
    image.fork("s1", "web").unwrap();
    let web = image.open_root("web").unwrap();
    web.write_at(&[0x03; 65536], 1 << 20).unwrap();
    image.snapshot("web", "w1").unwrap();
    image.close().unwrap();
}

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

// ---- protocol edge cases with nbdsh ---------------------------------------------------------

#[test]
fn nbdsh_edge_cases_with_structured_replies() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t", "-v"]);
    let script = format!(
        r#"
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.set_strict_mode(0)
h.connect_uri("{uri}")
size = h.get_size()
assert size == 4 << 20
assert h.get_structured_replies_negotiated()
assert h.can_df() and h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero()
assert h.can_fast_zero() and h.can_cache() and h.can_multi_conn()
assert h.can_meta_context("base:allocation") and h.can_meta_context("qemu:allocation-depth")
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20

# Sparse read: a data chunk for the written cluster, holes for the rest.
chunks = []
def cb(sub, off, status, err):
    chunks.append((off, len(sub), status))
    return 0
buf = h.pread_structured(3 * 65536, 0, cb)
assert buf[:65536] == b"\x02" * 65536 and buf[65536:] == bytes(2 * 65536), "content"
assert (0, 65536, nbd.READ_DATA) in chunks, chunks
assert any(s == nbd.READ_HOLE for (_, _, s) in chunks), chunks
# DF: one content chunk.
chunks.clear()
h.pread_structured(3 * 65536, 0, cb, nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0] == (0, 3 * 65536, nbd.READ_DATA), chunks

# FUA writes, unaligned, read back.
h.pwrite(b"fua!" * 300, 1000001, nbd.CMD_FLAG_FUA)
assert h.pread(1200, 1000001) == b"fua!" * 300
h.zero(4096, 70000, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 70000) == bytes(4096)
h.flush()
h.cache(1 << 20, 0)

# Fast zero: a partial cluster holding data cannot be zeroed by metadata alone.
h.pwrite(b"x" * 512, 2 * 65536 + 512)
expect_err("ENOTSUP", h.zero, 512, 2 * 65536 + 512, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(512, 2 * 65536 + 512) == b"x" * 512
h.zero(65536, 2 * 65536, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 2 * 65536) == bytes(65536)

# Block status: two contexts, REQ_ONE gives one extent each.
seen = {{}}
def bs(ctx, off, entries, err):
    seen[ctx] = list(entries)
    return 0
h.block_status(size, 0, bs)
assert seen["base:allocation"][1] == 0, seen
assert seen["qemu:allocation-depth"][1] == 1, seen
h.block_status(size, 0, bs, nbd.CMD_FLAG_REQ_ONE)
assert len(seen["base:allocation"]) == 2 and len(seen["qemu:allocation-depth"]) == 2, seen

# Out of range: EINVAL for reads, trims and block status; ENOSPC for writes.
expect_err("EINVAL", h.pread, 512, size - 256)
expect_err("ENOSPC", h.pwrite, b"y" * 512, size - 256)
expect_err("ENOSPC", h.zero, 512, size)
expect_err("EINVAL", h.trim, 512, size)
expect_err("EINVAL", h.block_status, 512, size, bs)
expect_err("EINVAL", h.pread, 512, 1 << 62)
# Oversized requests get EINVAL and the connection goes on.
expect_err("EINVAL", h.pread, 48 << 20, 0)
expect_err("EINVAL", h.pwrite, bytes(48 << 20), 0)
# Unknown flags and flags of another command.
expect_err("EINVAL", h.pread, 512, 0, 1 << 7)
expect_err("EINVAL", h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
expect_err("EINVAL", h.pwrite, b"z" * 512, 0, nbd.CMD_FLAG_NO_HOLE)
expect_err("EINVAL", h.flush, nbd.CMD_FLAG_DF)
assert h.pread(4, 1000001) == b"fua!"
h.shutdown()

# A snapshot export is read-only: writes get EPERM.
r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri("{snap}")
assert r.is_read_only()
assert not r.can_trim() and not r.can_zero()
expect_err("EPERM", r.pwrite, b"w" * 512, 0)
expect_err("EPERM", r.trim, 65536, 0)
expect_err("EPERM", r.zero, 65536, 0)
assert r.pread(4, 0) == b"\x01" * 4
r.shutdown()

# Repeated and informational options before GO.
o = nbd.NBD()
o.set_opt_mode(True)
o.connect_uri("{uri}")
names = []
o.opt_list(lambda n, d: names.append(n) or 0)
o.opt_list(lambda n, d: names.append(n) or 0)
assert sorted(names) == sorted(["default", "default@s1", "web", "web@w1"] * 2), names
ctxs = []
o.opt_list_meta_context(lambda c: ctxs.append(c) or 0)
o.opt_list_meta_context(lambda c: ctxs.append(c) or 0)
want = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:w1"]
assert sorted(ctxs) == sorted(want * 2), ctxs
o.set_export_name("web")
o.opt_info()
o.opt_info()
assert o.get_size() == 4 << 20
o.set_export_name("nope")
expect_err("ENOENT", o.opt_info)
o.set_export_name("web@w1")
o.opt_go()
assert o.is_read_only() and o.pread(4, 1 << 20) == b"\x03" * 4
o.shutdown()
print("ok")
"#,
        uri = server.uri("default"),
        snap = server.uri("default@s1"),
    );
    assert!(nbdsh_ok(&script).contains("ok"));
    // The errors came from the server, not from libnbd's own checks.
    for want in [
        "READ offset 4194048 length 512: error 22",
        "WRITE offset 4194048 length 512: error 28",
        "READ offset 0 length 50331648: error 22",
        "WRITE offset 0 length 50331648: error 22",
        "flags 0x80 are not valid for READ",
        "flags 0x8 are not valid for READ",
        "flags 0x2 are not valid for WRITE",
        "flags 0x4 are not valid for FLUSH",
        "WRITE on a read-only export",
        "TRIM on a read-only export",
        "WRITE_ZEROES on a read-only export",
        "error 95",
    ] {
        assert!(
            server.stderr_shows(want),
            "server log lacks {want:?}:\n{}",
            server.stderr()
        );
    }
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn nbdsh_edge_cases_with_simple_replies_and_a_minimum_block_size() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock_in(&dir)),
        &["-t", "-v", "--min-block-size", "4096"],
    );
    let script = format!(
        r#"
h.set_request_structured_replies(False)
h.add_meta_context("base:allocation")
h.set_strict_mode(0)
h.connect_uri("{uri}")
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
assert not h.can_meta_context("base:allocation")
assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096
h.pwrite(b"s" * 8192, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(8192, 4096) == b"s" * 8192
# Errors come as simple replies and leave the connection usable.
expect_err("EINVAL", h.pread, 4096, 512)
expect_err("EINVAL", h.pwrite, b"m" * 512, 4096)
expect_err("EINVAL", h.pread, 4096, 8 << 20)
expect_err("ENOSPC", h.pwrite, b"n" * 4096, 8 << 20)
expect_err("EINVAL", h.pread, 4096, 0, nbd.CMD_FLAG_DF)
expect_err("EINVAL", h.pread, 40 << 20, 0)
assert h.pread(4096, 4096)[:4] == b"ssss"
h.shutdown()
print("ok")
"#,
        uri = server.uri(""),
    );
    assert!(nbdsh_ok(&script).contains("ok"));
    for want in [
        "READ offset 512 length 4096: error 22: READ at offset 512 length 4096 is not aligned",
        "WRITE offset 4096 length 512: error 22",
        "WRITE offset 8388608 length 4096: error 28",
        "flags 0x4 are not valid for READ",
        "READ offset 0 length 41943040: error 22",
    ] {
        assert!(
            server.stderr_shows(want),
            "server log lacks {want:?}:\n{}",
            server.stderr()
        );
    }
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn an_abrupt_disconnect_mid_write_leaves_the_server_serving_others() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t"]);
    // A client connected throughout: one checked write per line on its stdin.
    let script = format!(
        r#"
import sys
h.connect_uri("{uri}")
print("ready", flush=True)
for line in sys.stdin:
    i = int(line)
    h.pwrite(bytes([i]) * 4096, 3 << 20)
    assert h.pread(4096, 3 << 20) == bytes([i]) * 4096
    print("ok", i, flush=True)
"#,
        uri = server.uri("default")
    );
    let mut keeper = nbdsh()
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdsh");
    let mut keeper_in = keeper.stdin.take().unwrap();
    let mut keeper_out = BufReader::new(keeper.stdout.take().unwrap());
    let mut line = String::new();
    keeper_out.read_line(&mut line).expect("nbdsh output");
    assert_eq!(line.trim(), "ready");
    for round in 0..3u8 {
        // A client that goes away in the middle of a write's payload.
        let mut s = UnixStream::connect(server.sock().unwrap()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(b"default");
        s.write_all(&opt).unwrap();
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply).unwrap();
        let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
        req.extend_from_slice(&9u64.to_be_bytes());
        req.extend_from_slice(&(1u64 << 20).to_be_bytes());
        req.extend_from_slice(&(1u32 << 20).to_be_bytes());
        req.extend_from_slice(&vec![0xeeu8; 300_000]);
        s.write_all(&req).unwrap();
        drop(s);
        // The server goes on serving.
        qemu_io_nbd(
            &server.uri("default"),
            &[
                &format!("write -P {} 0 64k", 0x40 + round),
                &format!("read -P {} 0 64k", 0x40 + round),
                "read -P 0 1M 1M",
            ],
        );
        writeln!(keeper_in, "{}", 0x50 + round).unwrap();
        line.clear();
        keeper_out.read_line(&mut line).expect("nbdsh output");
        assert_eq!(
            line.trim(),
            format!("ok {}", 0x50 + round),
            "the long-lived client"
        );
    }
    drop(keeper_in);
    let status = keeper.wait().expect("nbdsh");
    assert!(status.success(), "long-lived nbdsh client failed");
    let out = run_ok(nbdinfo().arg(server.uri("")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("export-size: 8388608"));
    server.stop();
    let image = open_ro(&img);
    let mut b = vec![0u8; 2 << 20];
    image.read_at(&mut b, 0).unwrap();
    assert!(b[..65536].iter().all(|&x| x == 0x42));
    assert!(
        b[1 << 20..].iter().all(|&x| x == 0),
        "a torn write was applied"
    );
    let mut k = vec![0u8; 4096];
    image.read_at(&mut k, 3 << 20).unwrap();
    assert!(k.iter().all(|&x| x == 0x52));
    drop(image);
    assert_qemu_check_clean(&img);
}

// ---- the program --------------------------------------------------------------------------

#[test]
fn read_only_serving_shares_the_image_with_qemu() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t", "-r"]);
    // QEMU can read the file while it is served read-only (shared lock).
    run_ok(qemu_img().arg("info").arg(&img));
    let script = format!(
        r#"
h.set_strict_mode(0)
h.connect_uri("{uri}")
assert h.is_read_only()
expect_err("EPERM", h.pwrite, b"a" * 512, 0)
assert h.pread(2, 0) == b"\x01\x01"
print("ok")
"#,
        uri = server.uri("web")
    );
    assert!(nbdsh_ok(&script).contains("ok"));
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn load_snapshot_and_export_options_choose_what_is_served() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock_in(&dir)),
        &["-t", "-l", "snapshot.name=s1", "-x", "old"],
    );
    let list = cli::json(&run_ok(
        nbdinfo().args(["--list", "--json"]).arg(server.uri("")),
    ));
    let names: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["old"]);
    assert_eq!(list["exports"][0]["is_read_only"], true);
    let b = export_bytes(&server, "old", &dir.path().join("old.raw"));
    assert!(b[..65536].iter().all(|&x| x == 0x01));
    server.stop();

    let sock = dir.path().join("nbd2.sock");
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock),
        &["-t", "--export", "a=web", "--export", "b=web@w1"],
    );
    let list = cli::json(&run_ok(
        nbdinfo().args(["--list", "--json"]).arg(server.uri("")),
    ));
    let got: Vec<(&str, bool)> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap(),
                e["is_read_only"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, vec![("a", false), ("b", true)]);
    qemu_io_nbd(&server.uri("a"), &["write -P 0x66 2M 4k"]);
    qemu_io_nbd(
        &server.uri(""),
        &["read -P 0x66 2M 4k", "read -P 0x03 1M 64k"],
    );
    server.stop();

    // An unknown root is refused at start.
    let out = run(Command::new(qcowx_nbd_bin())
        .args(["-k"])
        .arg(dir.path().join("nbd3.sock"))
        .args(["--export", "x=nope"])
        .arg(&img));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{}",
        describe(&out)
    );
}

#[test]
fn without_persistent_the_server_exits_after_its_last_client() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    let mut server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["--create", "16M"]);
    assert!(img.exists(), "--create made no image");
    qemu_io_nbd(&server.uri(""), &["write -P 0x12 0 64k"]);
    let status = server.wait_exit();
    assert!(status.success(), "exit {status}: {}", server.stderr());
    assert!(!sock_in(&dir).exists());
    let image = open_ro(&img);
    assert_eq!(image.size(), 16 << 20);
    let mut b = [0u8; 4];
    image.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x12; 4]);
    drop(image);
    assert_qemu_check_clean(&img);
}

#[test]
fn fork_detaches_and_the_pid_file_names_the_server() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let sock = sock_in(&dir);
    let pidfile = dir.path().join("pid");
    let out = run(Command::new(qcowx_nbd_bin())
        .arg("-k")
        .arg(&sock)
        .args(["-t", "--fork", "--pid-file"])
        .arg(&pidfile)
        .arg(&img));
    assert!(out.status.success(), "{}", describe(&out));
    let pid = std::fs::read_to_string(&pidfile).expect("pid file");
    let pid = pid.trim().to_string();
    let alive = || Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive(), "forked server not running");
    let uri = format!("nbd+unix:///default?socket={}", sock.display());
    qemu_io_nbd(&uri, &["write -P 0x31 0 4k", "read -P 0x31 0 4k"]);
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    let deadline = Instant::now() + SERVER_WAIT;
    while alive() {
        // A zombie is gone for our purposes once its state is Z.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        assert!(Instant::now() < deadline, "forked server did not stop");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !sock.exists() && !pidfile.exists(),
        "socket or pid file left behind"
    );
    assert_qemu_check_clean(&img);
}

#[test]
fn systemd_socket_activation() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let sock = sock_in(&dir);
    // What systemd does: a listening socket as descriptor 3, LISTEN_FDS and LISTEN_PID
    // naming the process that execs the server.
    let py = r#"
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(16)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], [sys.argv[2]] + sys.argv[3:])
"#;
    require_command(
        "python3",
        "python3",
        tool_command("python3").args(["-c", "import socket"]),
    );
    let mut cmd = tool_command("python3");
    cmd.args(["-c", py])
        .arg(&sock)
        .arg(qcowx_nbd_bin())
        .args(["-t"])
        .arg(&img);
    let mut server = QcowxNbd::spawn(cmd);
    assert!(server
        .banner()
        .contains(&format!("listening on unix {}", sock.display())));
    qemu_io_nbd(
        &server.uri("default"),
        &["write -P 0x71 0 4k", "read -P 0x71 0 4k"],
    );
    let pid = server.pid().to_string();
    run_ok(Command::new("kill").args(["-TERM", &pid]));
    let status = server.wait_exit();
    assert!(status.success(), "{}", server.stderr());
    assert_qemu_check_clean(&img);
}

#[test]
fn kill_9_during_writes_keeps_everything_flushed() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 32 << 20);
    let sock = sock_in(&dir);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock), &["-t"]);
    // Acknowledged and flushed: must survive. Then more writes, unflushed, in flight.
    let script = format!(
        r#"
h.connect_uri("{uri}")
for i in range(64):
    h.pwrite(bytes([i + 1]) * 65536, i * 65536)
h.pwrite(b"F" * 4096, 20 << 20, nbd.CMD_FLAG_FUA)
h.flush()
for i in range(64):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"u" * 65536)), (8 << 20) + i * 65536)
print("flushed", flush=True)
"#,
        uri = server.uri("")
    );
    let mut child = nbdsh()
        .args(["-c", &format!("{PY_PRELUDE}\n{script}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdsh");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("nbdsh output");
    assert_eq!(line.trim(), "flushed");
    server.kill9();
    let _ = child.kill();
    let _ = child.wait();

    // Restart on the crashed image: the flushed data is all there.
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock), &["-t"]);
    let mut cmds: Vec<String> = (0..64)
        .map(|i| format!("read -P {} {} 64k", i + 1, i * 65536))
        .collect();
    cmds.push(format!("read -P 0x46 {} 4k", 20 << 20));
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_nbd(&server.uri(""), &refs);
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn detect_zeroes_and_cache_modes() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock_in(&dir)),
        &[
            "-t",
            "--detect-zeroes=unmap",
            "--discard=unmap",
            "--cache=writethrough",
        ],
    );
    let uri = server.uri("");
    qemu_io_nbd(
        &uri,
        &[
            "write -P 0xaa 0 1M",
            "write -P 0 0 512k",
            "read -P 0 0 512k",
            "read -P 0xaa 512k 512k",
        ],
    );
    // The all-zero write released its clusters.
    let v = cli::json(&run_ok(nbdinfo().args(["--map", "--json"]).arg(&uri)));
    let data = merge_runs(
        map_entries(&v)
            .into_iter()
            .map(|(s, l, e)| (s, s + l, e["type"].as_u64().unwrap() & 1 == 0)),
    );
    assert_eq!(
        data,
        vec![
            (0, 512 << 10, false),
            (512 << 10, 1 << 20, true),
            (1 << 20, 8 << 20, false)
        ]
    );
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn dirty_bitmap_contexts_give_backup_tools_the_changes_since_a_snapshot() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let sock = sock_in(&dir);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock), &["-t"]);
    qemu_io_nbd(&server.uri("default"), &["write -P 0x09 3M 100"]);
    let dirty = |export: &str, snap: &str| {
        let v = cli::json(&run_ok(
            nbdinfo()
                .arg(format!("--map=qemu:dirty-bitmap:{snap}"))
                .arg("--json")
                .arg(server.uri(export)),
        ));
        merge_runs(
            map_entries(&v)
                .into_iter()
                .map(|(s, l, e)| (s, s + l, e["type"].as_u64().unwrap() & 1 == 1)),
        )
    };
    let m = 1u64 << 20;
    // default changed [0, 64K) after s1 (0x02) and [3M, 3M+64K) now.
    let want = vec![
        (0, 65536, true),
        (65536, 3 * m, false),
        (3 * m, 3 * m + 65536, true),
        (3 * m + 65536, 4 * m, false),
    ];
    assert_eq!(dirty("default", "s1"), want);
    // Nothing changed in web since w1; web against s1 is the fork's own write.
    assert_eq!(dirty("web", "w1"), vec![(0, 4 * m, false)]);
    assert_eq!(
        dirty("web", "s1"),
        vec![
            (0, m, false),
            (m, m + 65536, true),
            (m + 65536, 4 * m, false)
        ]
    );
    // QEMU's own client, as incremental backup tools use it: x-dirty-bitmap reports
    // dirty ranges as "data": false.
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=default,x-dirty-bitmap=qemu:dirty-bitmap:s1",
        sock.display()
    );
    let v = cli::json(&run_ok(
        qemu_img()
            .args(["map", "--output=json", "--image-opts"])
            .arg(&opts),
    ));
    let qemu_dirty = merge_runs(
        map_entries(&v)
            .into_iter()
            .map(|(s, l, e)| (s, s + l, !e["data"].as_bool().unwrap())),
    );
    assert_eq!(qemu_dirty, want, "qemu-img map with x-dirty-bitmap");
    server.stop();
}

// ---- the control socket -------------------------------------------------------------------

/// A connection to a server's control socket (line-delimited JSON).
struct Control {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Control {
    fn connect(server: &QcowxNbd) -> Control {
        let path = server.control().expect("the server has a control socket");
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
        s.set_read_timeout(Some(SERVER_WAIT)).unwrap();
        Control {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    /// Sends one line, returns the answer.
    fn line(&mut self, line: &str) -> serde_json::Value {
        self.w.write_all(line.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        let mut a = String::new();
        self.r.read_line(&mut a).expect("control answer");
        serde_json::from_str(&a).unwrap_or_else(|e| panic!("answer {a:?} is not JSON: {e}"))
    }

    fn send(&mut self, req: serde_json::Value) -> serde_json::Value {
        self.line(&req.to_string())
    }

    /// Sends a request that must succeed.
    fn ok(&mut self, req: serde_json::Value) -> serde_json::Value {
        let a = self.send(req.clone());
        assert_eq!(a["ok"], true, "{req} failed: {a}");
        a
    }
}

/// The export names `nbdinfo --list --json` shows.
fn export_names(server: &QcowxNbd) -> Vec<String> {
    let list = cli::json(&run_ok(
        nbdinfo().args(["--list", "--json"]).arg(server.uri("")),
    ));
    list["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect()
}

/// A client writing a stream of 4 KiB blocks to one export through libnbd: write
/// `seq` (0, 1, 2, …) goes to block `(seq * 97) % 256` of a 1 MiB region and holds
/// `seq + 1` as a big-endian u64 repeated, so any copy of the region tells exactly
/// which writes it holds. Each write waits for its reply before the next is sent
/// (one ordered stream). The count of acknowledged writes is printed every 64.
struct StreamWriter {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    acked: Arc<std::sync::atomic::AtomicU64>,
    done: mpsc::Receiver<u64>,
    base: u64,
}

const STREAM_BLOCKS: u64 = 256;
const STREAM_BLOCK: usize = 4096;

impl StreamWriter {
    fn start(uri: &str, base: u64) -> StreamWriter {
        let script = format!(
            r#"
import sys, select, struct, time
h.connect_uri("{uri}")
seq = 0
end = time.time() + 300
while seq < 2000000 and time.time() < end:
    h.pwrite(struct.pack(">Q", seq + 1) * 512, {base} + ((seq * 97) % 256) * 4096)
    seq += 1
    if seq % 64 == 0:
        print(seq, flush=True)
        r, _, _ = select.select([sys.stdin], [], [], 0)
        if r and sys.stdin.readline().strip() == "stop":
            break
print("done", seq, flush=True)
"#
        );
        let mut child = nbdsh()
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nbdsh");
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (tx, done) = mpsc::channel();
        let a = Arc::clone(&acked);
        thread::spawn(move || {
            for l in out.lines() {
                let Ok(l) = l else { break };
                if let Some(n) = l.strip_prefix("done ") {
                    let _ = tx.send(n.trim().parse().expect("count"));
                } else if let Ok(n) = l.trim().parse::<u64>() {
                    a.store(n, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        StreamWriter {
            child,
            stdin,
            acked,
            done,
            base,
        }
    }

    /// Writes acknowledged so far (a lower bound: replies may be on their way).
    fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Stops the writer; returns how many writes it made.
    fn stop(mut self) -> u64 {
        let mut stdin = self.stdin.take().expect("stdin");
        writeln!(stdin, "stop").expect("tell the writer to stop");
        let n = self
            .done
            .recv_timeout(SERVER_WAIT)
            .expect("the writer did not finish");
        let status = self.child.wait().expect("wait for nbdsh");
        assert!(status.success(), "writer failed: {status}");
        n
    }
}

/// Checks that `region` (one writer's 1 MiB) holds exactly writes `0..=k` of its
/// stream for some `k` — every block the last of those writes that targets it — and
/// returns `k + 1` (the number of writes it holds).
fn writes_held(region: &[u8]) -> u64 {
    let mut seen = vec![0u64; STREAM_BLOCKS as usize];
    for (b, block) in region.chunks(STREAM_BLOCK).enumerate() {
        let v = u64::from_be_bytes(block[..8].try_into().unwrap());
        assert!(
            block
                .chunks(8)
                .all(|w| u64::from_be_bytes(w.try_into().unwrap()) == v),
            "block {b} is torn"
        );
        seen[b] = v;
    }
    let held = seen.iter().copied().max().unwrap_or(0);
    let mut want = vec![0u64; STREAM_BLOCKS as usize];
    for s in 0..held {
        want[((s * 97) % STREAM_BLOCKS) as usize] = s + 1;
    }
    for b in 0..STREAM_BLOCKS as usize {
        assert_eq!(
            seen[b], want[b],
            "block {b}: not a prefix of the stream (the newest write held is #{held})"
        );
    }
    held
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn live_snapshots_of_a_busy_export_are_consistent_points_in_each_write_stream() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t", "-e", "8"]);
    // Two clients, each its own ordered stream in its own region of one VDI.
    let writers = [
        StreamWriter::start(&server.uri("default"), 0),
        StreamWriter::start(&server.uri("default"), 4 << 20),
    ];
    let mut ctl = Control::connect(&server);
    let mut snaps: Vec<(String, Vec<u64>)> = Vec::new();
    for i in 1..=3u64 {
        let target = i * 1024;
        wait_for("the writers to make progress", || {
            writers.iter().all(|w| w.acked() >= target)
        });
        let acked: Vec<u64> = writers.iter().map(StreamWriter::acked).collect();
        let name = format!("live{i}");
        let a = ctl.ok(serde_json::json!({"op": "snapshot", "vdi": "default", "name": name}));
        assert_eq!(a["root"]["name"], name.as_str());
        assert_eq!(a["root"]["kind"], "snapshot");
        // Served at once.
        assert_eq!(a["export"], format!("default@{name}").as_str());
        snaps.push((name, acked));
    }
    // The clients were never stopped: they go on writing after the last snapshot.
    let after: Vec<u64> = writers.iter().map(StreamWriter::acked).collect();
    wait_for("writes after the last snapshot", || {
        writers
            .iter()
            .zip(&after)
            .all(|(w, &a)| w.acked() >= a + 1024)
    });
    let bases: Vec<u64> = writers.iter().map(|w| w.base).collect();
    let totals: Vec<u64> = writers.into_iter().map(StreamWriter::stop).collect();

    let names = export_names(&server);
    let mut held_before = vec![0u64; bases.len()];
    for (name, acked) in &snaps {
        let export = format!("default@{name}");
        assert!(names.contains(&export), "{export} not in {names:?}");
        let bytes = export_bytes(&server, &export, &dir.path().join("snap.raw"));
        for (j, &base) in bases.iter().enumerate() {
            let region = &bytes[base as usize..(base + (1 << 20)) as usize];
            let held = writes_held(region);
            assert!(
                held >= acked[j],
                "{name}, writer {j}: holds {held} writes, but {} were acknowledged before the snapshot was asked for",
                acked[j]
            );
            eprintln!(
                "{name}, writer {j}: {} writes acknowledged before the request, {held} held, {} in all",
                acked[j], totals[j]
            );
            assert!(held < totals[j], "{name}, writer {j}: holds every write");
            assert!(held >= held_before[j], "snapshots out of order");
            held_before[j] = held;
        }
    }
    // The live export holds every write.
    let live = export_bytes(&server, "default", &dir.path().join("live.raw"));
    for (j, &base) in bases.iter().enumerate() {
        assert_eq!(
            writes_held(&live[base as usize..(base + (1 << 20)) as usize]),
            totals[j]
        );
    }
    server.stop();
    let image = open_ro(&img);
    let roots: Vec<String> = image.list().unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(roots, vec!["default", "live1", "live2", "live3"]);
    drop(image);
    assert_qemu_check_clean(&img);
}

#[test]
fn fork_revert_delete_gc_and_list_over_the_control_socket() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t"]);
    // QEMU cannot open the served image for writing: that is why the socket exists.
    let out = run(qemu_img().args(["snapshot", "-c", "x"]).arg(&img));
    assert!(!out.status.success(), "qemu-img wrote a served image");
    let mut ctl = Control::connect(&server);
    let list = ctl.ok(serde_json::json!({"op": "list"}));
    let names: Vec<&str> = list["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["default", "s1", "web", "w1"]);

    // A snapshot of web while a client has it open, then a fork of that snapshot.
    qemu_io_nbd(&server.uri("web"), &["write -P 0x44 2M 64k"]);
    let a = ctl.ok(serde_json::json!({"op": "snapshot", "vdi": "web", "name": "w2"}));
    assert_eq!(a["export"], "web@w2");
    qemu_io_nbd(&server.uri("web"), &["write -P 0x45 2M 64k"]);
    let a = ctl.ok(serde_json::json!({"op": "fork", "snapshot": "w2", "name": "db"}));
    assert_eq!(a["export"], "db");
    assert_eq!(a["root"]["parent"], "w2");
    let names = export_names(&server);
    for e in ["web@w2", "db"] {
        assert!(names.iter().any(|n| n == e), "{e} missing from {names:?}");
    }
    // A snapshot export is read-only: qemu-io opens it with -r.
    let out = run_ok(
        qemu_io()
            .args(["-r", "-f", "raw", "-c", "read -P 0x44 2M 64k"])
            .arg(server.uri("web@w2")),
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("verification failed"),
        "{}",
        describe(&out)
    );
    qemu_io_nbd(
        &server.uri("db"),
        &[
            "read -P 0x44 2M 64k",
            "write -P 0x46 3M 4k",
            "read -P 0x03 1M 64k",
        ],
    );
    qemu_io_nbd(
        &server.uri("web"),
        &["read -P 0x45 2M 64k", "read -P 0 3M 4k"],
    );

    let d = ctl.ok(serde_json::json!({"op": "diff", "from": "w2", "to": "web"}));
    assert_eq!(d["bytes"], 65536, "{d}");
    assert_eq!(d["ranges"][0]["offset"], 2 << 20);

    // Revert web to w1 (before both writes).
    ctl.ok(serde_json::json!({"op": "revert", "vdi": "web", "snapshot": "w1"}));
    qemu_io_nbd(
        &server.uri("web"),
        &["read -P 0 2M 64k", "read -P 0x03 1M 64k"],
    );

    // Delete the fork and the snapshot: the exports go; gc returns the space.
    ctl.ok(serde_json::json!({"op": "delete", "vdi": "db"}));
    ctl.ok(serde_json::json!({"op": "delete", "snapshot": "w2"}));
    let names = export_names(&server);
    assert!(
        !names.iter().any(|n| n == "db" || n == "web@w2"),
        "{names:?}"
    );
    let out = run(qemu_io()
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(server.uri("db")));
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stderr).contains("export"),
        "a deleted VDI is still served: {}",
        describe(&out)
    );
    let g = ctl.ok(serde_json::json!({"op": "gc"}));
    assert!(g["gc"]["roots-removed"].as_u64().unwrap() >= 2, "{g}");
    assert!(g["gc"]["clusters-freed"].as_u64().unwrap() >= 2, "{g}");
    server.stop();

    let out = run_ok(qemu_img().args(["snapshot", "-l"]).arg(&img));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("s1") && text.contains("w1") && text.contains("vdi:web"));
    assert!(!text.contains("w2") && !text.contains("vdi:db"), "{text}");
    assert_qemu_check_clean(&img);
}

#[test]
fn bad_control_requests_get_errors_and_affect_nothing() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t"]);
    let mut ctl = Control::connect(&server);
    let cases: Vec<(&str, &str, &str)> = vec![
        ("not json at all", "invalid-request", "not JSON"),
        (
            "{\"op\": \"format-disk\"}",
            "invalid-request",
            "format-disk",
        ),
        (
            "{\"op\": \"fork\", \"name\": \"x\"}",
            "invalid-request",
            "snapshot",
        ),
        (
            "{\"op\": \"snapshot\", \"vdi\": \"nope\", \"name\": \"x\"}",
            "not-found",
            "nope",
        ),
        (
            "{\"op\": \"snapshot\", \"name\": \"web\"}",
            "already-exists",
            "already exists",
        ),
        (
            "{\"op\": \"fork\", \"snapshot\": \"s1\", \"name\": \"a b\"}",
            "invalid-argument",
            "",
        ),
        (
            "{\"op\": \"delete\", \"vdi\": \"default\"}",
            "invalid-argument",
            "default",
        ),
        (
            "{\"op\": \"revert\", \"vdi\": \"web\", \"snapshot\": \"ghost\"}",
            "not-found",
            "ghost",
        ),
        (
            "{\"op\": \"list\", \"image\": \"/etc/hostname\"}",
            "wrong-image",
            "/etc/hostname",
        ),
    ];
    for (line, kind, text) in &cases {
        let a = ctl.line(line);
        assert_eq!(a["ok"], false, "{line}: {a}");
        assert_eq!(a["kind"].as_str().unwrap(), *kind, "{line}: {a}");
        assert!(a["error"].as_str().unwrap().contains(text), "{line}: {a}");
    }
    // The same connection still works, the image is unchanged, and clients are served.
    let list = ctl.ok(serde_json::json!({"op": "list", "image": img.to_str().unwrap()}));
    assert_eq!(list["roots"].as_array().unwrap().len(), 4);
    qemu_io_nbd(&server.uri("default"), &["read -P 0x02 0 64k"]);
    // A client that connects and goes away mid-line changes nothing either.
    let mut s = UnixStream::connect(server.control().unwrap()).unwrap();
    s.write_all(b"{\"op\": \"snapshot\", \"na").unwrap();
    drop(s);
    let list = ctl.ok(serde_json::json!({"op": "list"}));
    assert_eq!(list["roots"].as_array().unwrap().len(), 4);
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn a_read_only_server_has_no_control_socket_unless_asked() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t", "-r"]);
    assert!(server.control().is_none(), "{}", server.banner());
    server.stop();
    let ctl = dir.path().join("ctl.sock");
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock_in(&dir)),
        &["-t", "-r", "--control", ctl.to_str().unwrap()],
    );
    assert_eq!(server.control(), Some(ctl.as_path()));
    let mut c = Control::connect(&server);
    assert_eq!(
        c.ok(serde_json::json!({"op": "list"}))["roots"][1]["name"],
        "s1"
    );
    let a = c.send(serde_json::json!({"op": "snapshot", "name": "x"}));
    assert_eq!(a["kind"], "read-only", "{a}");
    server.stop();
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t", "--no-control"]);
    assert!(server.control().is_none());
    server.stop();
}

// ---- TLS -------------------------------------------------------------------------------------

/// qemu-io over TLS on a Unix socket: `dir` holds the client's files.
fn qemu_io_tls(sock: &Path, export: &str, dir: &Path, cmds: &[&str]) -> Output {
    let mut c = qemu_io();
    c.arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        ))
        .arg("--image-opts");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(format!(
        "driver=nbd,server.type=unix,server.path={},export={export},tls-creds=tls0,tls-hostname=localhost",
        sock.display()
    ));
    run(&mut c)
}

fn nbds_unix(sock: &Path, export: &str, dir: &Path) -> String {
    format!(
        "nbds+unix:///{export}?socket={}&tls-certificates={}",
        sock.display(),
        dir.display()
    )
}

#[test]
fn tls_required_serves_tls_clients_and_refuses_the_others() {
    let dir = tempdir();
    make_pki(dir.path());
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 16 << 20);
    let sock = sock_in(&dir);
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock),
        &[
            "-t",
            "-v",
            "--tls-creds",
            dir.path().join("server").to_str().unwrap(),
        ],
    );
    assert!(
        server.banner().contains("TLS required"),
        "{}",
        server.banner()
    );
    let alice = dir.path().join("alice");

    // QEMU's client over TLS: writes, reads, flushes; qemu-img copies the export.
    let out = qemu_io_tls(
        &sock,
        "default",
        &alice,
        &[
            "write -P 0x5c 0 1M",
            "aio_write -P 0x5d 4M 64k",
            "aio_flush",
            "read -P 0x5c 0 1M",
            "read -P 0x5d 4M 64k",
        ],
    );
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"),
        "qemu-io over TLS: {}",
        describe(&out)
    );
    let raw = dir.path().join("copy.raw");
    run_ok(
        qemu_img()
            .arg("convert")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                alice.display()
            ))
            .args(["--image-opts", "-O", "raw"])
            .arg(format!(
                "driver=nbd,server.type=unix,server.path={},export=default,tls-creds=tls0,tls-hostname=localhost",
                sock.display()
            ))
            .arg(&raw),
    );
    let copy = std::fs::read(&raw).unwrap();
    assert!(copy[..1 << 20].iter().all(|&b| b == 0x5c));
    assert!(copy[4 << 20..(4 << 20) + 65536].iter().all(|&b| b == 0x5d));

    // libnbd over TLS.
    let out = run_ok(nbdinfo().arg(nbds_unix(&sock, "default", &alice)));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("with TLS"),
        "{}",
        describe(&out)
    );
    let script = format!(
        r#"
h.set_uri_allow_local_file(True)
h.connect_uri("{uri}")
assert h.get_tls_negotiated()
assert h.get_structured_replies_negotiated()
h.pwrite(b"tls!" * 1024, 8 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8 << 20) == b"tls!" * 1024
h.shutdown()
print("ok")
"#,
        uri = nbds_unix(&sock, "default", &alice)
    );
    assert!(nbdsh_ok(&script).contains("ok"));

    // Without TLS: every option is refused with NBD_REP_ERR_TLS_REQD (libnbd reports
    // ENOTSUP and logs the server's message), and nothing can be read.
    let script = format!(
        r#"
h.set_opt_mode(True)
h.connect_uri("{uri}")
assert not h.get_tls_negotiated()
expect_err("ENOTSUP", h.opt_list, lambda n, d: 0)
expect_err("ENOTSUP", h.opt_info)
expect_err("ENOTSUP", h.opt_go)
print("refused")
"#,
        uri = server.uri("default")
    );
    let full = format!("{PY_PRELUDE}\n{script}");
    let out = run(nbdsh().env("LIBNBD_DEBUG", "1").args(["-c", &full]));
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("refused"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("this server requires TLS"),
        "libnbd did not see the server's TLS_REQD message: {}",
        describe(&out)
    );
    let out = run(qemu_io()
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(server.uri("default")));
    assert!(
        !out.status.success(),
        "qemu-io without TLS: {}",
        describe(&out)
    );
    assert!(
        server.stderr_shows("TLS established (client certificate CN alice)"),
        "{}",
        server.stderr()
    );
    server.stop();
    let image = open_ro(&img);
    let mut b = [0u8; 4];
    image.read_at(&mut b, 8 << 20).unwrap();
    assert_eq!(&b, b"tls!");
    drop(image);
    assert_qemu_check_clean(&img);
}

#[test]
fn tls_allowed_over_tcp_serves_clients_with_and_without_tls() {
    let dir = tempdir();
    make_pki(dir.path());
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let server = QcowxNbd::listen(
        &img,
        Listen::Tcp,
        &[
            "-t",
            "--tls=allow",
            "--tls-cert",
            dir.path().join("server/server-cert.pem").to_str().unwrap(),
            "--tls-key",
            dir.path().join("server/server-key.pem").to_str().unwrap(),
            "--tls-ca",
            dir.path().join("ca.pem").to_str().unwrap(),
        ],
    );
    assert!(
        server.banner().contains("TLS allowed"),
        "{}",
        server.banner()
    );
    let addr = server.tcp().expect("tcp address").to_string();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let alice = dir.path().join("alice");
    // In clear.
    qemu_io_nbd(&server.uri("default"), &["write -P 0x61 0 64k"]);
    let out = run_ok(nbdinfo().arg(server.uri("default")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("without TLS"));
    // With TLS, over TCP (the certificate names 127.0.0.1).
    let out = run_ok(nbdinfo().arg(format!(
        "nbds://{addr}/default?tls-certificates={}",
        alice.display()
    )));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("with TLS"),
        "{}",
        describe(&out)
    );
    let out = run(qemu_io()
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            alice.display()
        ))
        .args(["--image-opts", "-c", "read -P 0x61 0 64k", "-c", "write -P 0x62 64k 64k"])
        .arg(format!(
            "driver=nbd,server.type=inet,server.host={host},server.port={port},export=default,tls-creds=tls0"
        )));
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"),
        "qemu-io over TLS/TCP: {}",
        describe(&out)
    );
    qemu_io_nbd(&server.uri("default"), &["read -P 0x62 64k 64k"]);
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn tls_client_certificates_outside_the_allow_list_are_refused() {
    let dir = tempdir();
    make_pki(dir.path());
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let sock = sock_in(&dir);
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock),
        &[
            "-t",
            "--tls-creds",
            dir.path().join("server").to_str().unwrap(),
            "--tls-allow-cn",
            "alice",
            "--tls-allow-cn",
            "bob",
        ],
    );
    let ok = run_ok(nbdinfo().arg(nbds_unix(&sock, "default", &dir.path().join("alice"))));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("with TLS"));
    for who in ["eve", "nocert"] {
        let out = run(nbdinfo().arg(nbds_unix(&sock, "default", &dir.path().join(who))));
        assert!(
            !out.status.success(),
            "{who} was served: {}",
            describe(&out)
        );
        let out = qemu_io_tls(&sock, "default", &dir.path().join(who), &["read 0 4k"]);
        assert!(
            !out.status.success(),
            "qemu-io as {who} was served: {}",
            describe(&out)
        );
    }
    // The refusals are logged, and alice is still served.
    qemu_io_tls(
        &sock,
        "default",
        &dir.path().join("alice"),
        &["write -P 0x7a 0 4k"],
    );
    for want in ["CN 'eve' is not on the allow-list", "no certificates"] {
        assert!(server.stderr_shows(want), "{}", server.stderr());
    }
    server.stop();
    let image = open_ro(&img);
    let mut b = [0u8; 4];
    image.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x7a; 4]);
}

// ---- the qcowx CLI against a served image ------------------------------------------------

#[test]
fn the_cli_forwards_to_the_server_of_a_locked_image() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t"]);
    let runtime = server
        .control()
        .and_then(|c| c.parent())
        .expect("the server has a control socket")
        .to_path_buf();
    let qcowx = |args: &[&str]| {
        let mut cmd = Command::new(qcowx_cli_bin());
        cmd.env("QCOWX_RUNTIME_DIR", &runtime).args(args);
        run(&mut cmd)
    };
    let p = img.to_str().unwrap();
    qemu_io_nbd(&server.uri("default"), &["write -P 0x61 0 64k"]);
    // The image is locked by the server: these go through its control socket.
    let out = qcowx(&["snapshot", p, "live1"]);
    assert!(out.status.success(), "{}", describe(&out));
    qemu_io_nbd(&server.uri("default"), &["write -P 0x62 0 64k"]);
    let out = qcowx(&["fork", p, "live1", "copy"]);
    assert!(out.status.success(), "{}", describe(&out));
    // The new roots are served at once.
    let out = run_ok(
        qemu_io()
            .args(["-r", "-f", "raw", "-c", "read -P 0x61 0 64k"])
            .arg(server.uri("default@live1")),
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "{}",
        describe(&out)
    );
    qemu_io_nbd(&server.uri("copy"), &["read -P 0x61 0 64k"]);
    let out = qcowx(&["list", "--output=json", p]);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"live1") && names.contains(&"copy"),
        "{names:?}"
    );
    let out = qcowx(&["delete", p, "--vdi", "copy"]);
    assert!(out.status.success(), "{}", describe(&out));
    let out = qcowx(&["gc", "--output=json", p]);
    assert!(out.status.success(), "{}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["roots-removed"], 1, "{v}");
    // Errors come back with the library's message and exit code 1.
    let out = qcowx(&["snapshot", p, "live1"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        describe(&out)
    );
    let out = qcowx(&["revert", p, "--vdi", "default", "live1"]);
    assert!(out.status.success(), "{}", describe(&out));
    qemu_io_nbd(&server.uri("default"), &["read -P 0x61 0 64k"]);
    server.stop();
    // Without a server, a locked image is an error, not a silent success.
    let _held = qcowx_core::Image::open_rw(&img).unwrap();
    let out = qcowx(&["snapshot", p, "offline"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked"),
        "{}",
        describe(&out)
    );
}

/// A server killed after a refcount checkpoint leaves an image that is clean on disk
/// (the checkpoint wrote exact refcounts and cleared the dirty bit); restarted on an
/// image killed before any checkpoint, the server says it recovered it.
#[test]
fn checkpoints_keep_a_killed_servers_image_clean_and_recovery_is_reported() {
    require_qemu_tools();
    let dir = tempdir();
    let img = dir.path().join("a.qcow2");
    new_image(&img, 64 << 20);

    // No checkpoint before the kill: the image is dirty, and the restart says so.
    let server = QcowxNbd::in_dir(dir.path(), &img, &["-t", "--checkpoint-interval", "3600"]);
    qemu_io_nbd(&server.uri("default"), &["write -P 0x31 0 1M", "flush"]);
    server.kill9();
    let info = qemu_info(&img, true);
    assert_eq!(info["dirty-flag"], true, "no checkpoint ran: {info:#}");
    let server = QcowxNbd::in_dir(
        dir.path(),
        &img,
        &["-t", "--checkpoint-interval", "1", "--l2-cache-size", "1M"],
    );
    assert!(
        server.stderr_shows("was not closed cleanly"),
        "the restart reports the unclean shutdown: {}",
        server.stderr()
    );
    qemu_io_nbd(&server.uri("default"), &["read -P 0x31 0 1M"]);

    // With checkpoints every second: after a write and a checkpoint, a kill leaves a
    // clean image that QEMU checks clean.
    qemu_io_nbd(&server.uri("default"), &["write -P 0x32 8M 1M", "flush"]);
    wait_for("a checkpoint to clear the dirty bit", || {
        qemu_info(&img, true)["dirty-flag"] == false
    });
    server.kill9();
    assert_qemu_check_clean(&img);
    qemu_io_ok("qcow2", &img, &["read -P 0x31 0 1M", "read -P 0x32 8M 1M"]);
}
