//! `qcowx map`, `compare` and `convert` against `qemu-img map`, `compare` and
//! `convert`: extents of images, chains, subclusters, snapshots and VDIs; exit codes
//! and output of compare; conversions between raw, qcow2 and compressed qcow2.

use std::path::Path;

use qcowx_tests::cli::*;
use serde_json::Value;

mod common;
use common::CS;

// ---- map ---------------------------------------------------------------------------

fn qemu_map(d: &Path, file: &str) -> Value {
    json(&qemu_ok(d, &["map", "--output=json", file]))
}

fn qcowx_map(d: &Path, args: &[&str]) -> Value {
    let mut all = vec!["map", "--output=json"];
    all.extend(args);
    json(&ok_quiet(d, &all))
}

fn assert_map_matches_qemu(d: &Path, file: &str) {
    let ours = qcowx_map(d, &[file]);
    assert_eq!(ours["filename"], file);
    assert_eq!(ours["root"], "default");
    let theirs = qemu_map(d, file);
    assert_eq!(
        ours["extents"], theirs,
        "{file}: qcowx map differs from qemu-img map"
    );
}

#[test]
fn map_matches_qemu_img_map_on_images_and_chains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A qcowx image: data, a zero cluster over data, a discarded cluster, a partial
    // zero write, an unaligned end.
    ok_quiet(d, &["create", "a.qcow2", "3000k"]);
    ok_quiet(
        d,
        &[
            "io",
            "a.qcow2",
            "-c",
            "write -P 1 0 192k",
            "-c",
            "write -P 2 512k 64k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "discard 512k 64k",
            "-c",
            "write -P 3 1M 4k",
            "-c",
            "write -z 1M 512",
            "-c",
            "write -P 4 2944k 8k",
        ],
    );
    assert_map_matches_qemu(d, "a.qcow2");
    // A QEMU chain: raw base with holes, a 4 KiB-cluster middle layer with a
    // compressed cluster and zeros, a top layer past the base's end.
    qemu_ok(d, &["create", "-f", "raw", "base.raw", "2M"]);
    qemu_io(
        d,
        "raw",
        "base.raw",
        &["write -P 9 64k 64k", "write -P 8 1M 16k"],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "3M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "mid.qcow2",
        &[
            "write -P 2 0 4k",
            "write -z 128k 64k",
            "write -c -P 4 1536k 4k",
            "write -P 5 2100k 8k",
        ],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "4M",
        ],
    );
    assert_map_matches_qemu(d, "mid.qcow2");
    assert_map_matches_qemu(d, "top.qcow2");
    // qcowx writes on top of the chain.
    ok_quiet(
        d,
        &[
            "io",
            "top.qcow2",
            "-c",
            "write -P 6 3M 64k",
            "-c",
            "write -z 0 64k",
        ],
    );
    assert_map_matches_qemu(d, "top.qcow2");
    // Extended L2 entries (subclusters), zero clusters that keep their host cluster
    // in a backing file, and unallocated subclusters of allocated clusters.
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "x.qcow2",
            "4M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "x.qcow2",
        &[
            "write -P 1 0 4k",
            "write -P 2 64k 64k",
            "write -z 72k 4k",
            "write -z 1M 8k",
            "write -P 3 2M 100k",
            "write -P 4 3M 64k",
            "write -z 3M 64k",
        ],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "x.qcow2",
            "-F",
            "qcow2",
            "x2.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "x2.qcow2",
        &["write -P 9 8k 4k", "write -z 2M 4k"],
    );
    assert_map_matches_qemu(d, "x.qcow2");
    assert_map_matches_qemu(d, "x2.qcow2");
    ok_quiet(d, &["io", "x2.qcow2", "-c", "write -P 5 3M 32k"]);
    assert_map_matches_qemu(d, "x2.qcow2");
    // The human table is qemu-img's where there is nothing compressed.
    let ours = stdout(&ok_quiet(d, &["map", "a.qcow2"]));
    let theirs = stdout(&qemu_ok(d, &["map", "a.qcow2"]));
    assert_eq!(ours, theirs);
    let ours = stdout(&ok_quiet(d, &["map", "top.qcow2"]));
    assert!(ours.starts_with("Offset          Length          Mapped to       File\n"));
    assert!(ours.contains("compressed      mid.qcow2"), "{ours}");
    // -q: nothing.
    assert!(ok_quiet(d, &["-q", "map", "top.qcow2"]).stdout.is_empty());
}

/// Per-cluster data/zero classification of map extents inside `[0, size)`.
/// A metadata-preallocated image QEMU made and wrote a little: the clusters the file
/// holds holes under are `data` and `zero` in both maps (QEMU asks the file system),
/// the written ones `data`; a conversion copies only those and compares equal.
#[test]
fn metadata_preallocated_images_map_and_convert_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "pm.qcow2",
            "32M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "pm.qcow2",
        &["write -P 1 1M 64k", "write -P 2 9M 4k"],
    );
    assert_map_matches_qemu(d, "pm.qcow2");
    let ours = qcowx_map(d, &["pm.qcow2"]);
    let zero_data = ours["extents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true && e["zero"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum::<u64>();
    assert!(zero_data > 30 << 20, "{ours:#}");
    ok_quiet(d, &["convert", "-O", "qcow2", "pm.qcow2", "out.qcow2"]);
    assert_code(
        &qemu_img(d, &["compare", "pm.qcow2", "out.qcow2"]),
        0,
        "qemu-img compare",
    );
    let out = qcowx_map(d, &["out.qcow2"]);
    let data = out["extents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum::<u64>();
    assert!(data <= 2 * CS, "{out:#}");
}

/// `--start-offset` and `--max-length` map the part qemu-img maps: unaligned, cut at
/// the end of the disk, or from an offset to the end.
#[test]
fn map_of_part_of_a_disk_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_quiet(d, &["create", "p.qcow2", "8M"]);
    ok_quiet(
        d,
        &[
            "io",
            "p.qcow2",
            "-c",
            "write -P 1 1M 192k",
            "-c",
            "write -z 4M 64k",
        ],
    );
    for range in [
        &["--start-offset=1000", "--max-length=3000"][..],
        &["--start-offset=1M", "--max-length=100k"],
        &["--start-offset", "1100k", "--max-length", "4M"],
        &["--start-offset=6M"],
        &["--max-length=12M"],
    ] {
        let mut args = range.to_vec();
        args.push("p.qcow2");
        let ours = qcowx_map(d, &args);
        let mut q = vec!["map", "--output=json"];
        q.extend(&args);
        assert_eq!(ours["extents"], json(&qemu_ok(d, &q)), "{range:?}");
    }
}

fn classify(extents: &Value, size: u64) -> Vec<bool> {
    let mut out = vec![false; size.div_ceil(CS) as usize];
    for e in extents.as_array().unwrap() {
        if e["data"] != true {
            continue;
        }
        let start = e["start"].as_u64().unwrap();
        let end = (start + e["length"].as_u64().unwrap()).min(size);
        let mut c = start / CS;
        while c * CS < end {
            out[c as usize] = true;
            c += 1;
        }
    }
    out
}

#[test]
fn map_of_snapshots_and_vdis_agrees_with_qemu_copies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_ok(d, &["create", "-f", "raw", "b.raw", "4M"]);
    qemu_io(d, "raw", "b.raw", &["write -P 7 3M 64k"]);
    ok_quiet(d, &["create", "-b", "b.raw", "-F", "raw", "s.qcow2", "4M"]);
    ok_quiet(
        d,
        &[
            "io",
            "s.qcow2",
            "-c",
            "write -P 1 0 128k",
            "-c",
            "write -z 3M 64k",
        ],
    );
    ok_quiet(d, &["snapshot", "s.qcow2", "one"]);
    ok_quiet(
        d,
        &[
            "io",
            "s.qcow2",
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "write -z 0 64k",
        ],
    );
    ok_quiet(d, &["snapshot", "s.qcow2", "two"]);
    ok_quiet(d, &["fork", "s.qcow2", "one", "dev"]);
    ok_quiet(
        d,
        &["io", "s.qcow2", "--vdi", "dev", "-c", "write -P 3 2M 64k"],
    );
    let size = 4 << 20;
    for (args, name) in [
        (vec!["--snapshot", "one"], "one"),
        (vec!["--snapshot", "two"], "two"),
        (vec!["--vdi", "dev"], "vdi:dev"),
    ] {
        let mut a = args.clone();
        a.push("s.qcow2");
        let ours = qcowx_map(d, &a);
        assert_eq!(ours["root"], args[1]);
        let copy = format!("{}.qcow2", args[1]);
        let opt = format!("snapshot.name={name}");
        qemu_ok(d, &["convert", "-l", &opt, "-O", "qcow2", "s.qcow2", &copy]);
        let theirs = qemu_map(d, &copy);
        assert_eq!(
            classify(&ours["extents"], size),
            classify(&theirs, size),
            "{args:?}: data clusters differ from qemu-img's copy"
        );
        let total: u64 = ours["extents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert_eq!(total, size);
    }
    // Depth: the snapshot's unallocated ranges fall through to the raw backing file.
    let one = qcowx_map(d, &["--snapshot", "one", "s.qcow2"]);
    let backing: Vec<&Value> = one["extents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 1 && e["data"] == true)
        .collect();
    assert_eq!(backing.len(), 0, "3M is zeroed in 'one': {one:#}");
    let dev = qcowx_map(d, &["--vdi", "dev", "s.qcow2"]);
    assert!(dev["extents"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["depth"] == 1 && e["zero"] == true && e["present"] == true));
    // Errors.
    fails_quiet(
        d,
        1,
        &["map", "--snapshot", "nope", "s.qcow2"],
        &["s.qcow2", "snapshot 'nope' not found", "qcowx list s.qcow2"],
    );
    fails_quiet(
        d,
        1,
        &["map", "--vdi", "one", "s.qcow2"],
        &["VDI 'one' not found"],
    );
    fails_quiet(d, 1, &["map", "missing.qcow2"], &["missing.qcow2"]);
    usage_error(d, &["map", "--snapshot", "one", "--vdi", "dev", "s.qcow2"]);
    let held = qcowx_core::Image::open_rw(d.join("s.qcow2")).unwrap();
    fails_quiet(d, 1, &["map", "s.qcow2"], &["s.qcow2", "locked", "-U"]);
    ok_quiet(d, &["map", "-U", "s.qcow2"]);
    drop(held);
}

// ---- compare and convert -----------------------------------------------------------

/// Runs `qcowx compare` and `qemu-img compare` on the same pair: same exit code, same
/// stdout.
fn compare_like_qemu(d: &Path, a: &str, b: &str) -> i32 {
    let ours = qcowx(d, &["compare", a, b]);
    let theirs = qemu_img(d, &["compare", a, b]);
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "{a} {b}: qcowx {} / qemu-img {}",
        stdout(&ours),
        stdout(&theirs)
    );
    assert_eq!(stdout(&ours), stdout(&theirs), "{a} {b}");
    ours.status.code().unwrap()
}

#[test]
fn compare_agrees_with_qemu_img_compare() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_ok(d, &["create", "-f", "qcow2", "a.qcow2", "4M"]);
    qemu_io(
        d,
        "qcow2",
        "a.qcow2",
        &["write -P 1 0 1M", "write -P 2 3M 4k"],
    );
    qemu_ok(d, &["convert", "-O", "raw", "a.qcow2", "a.raw"]);
    ok_quiet(d, &["convert", "-O", "qcow2", "a.qcow2", "b.qcow2"]);
    assert_eq!(compare_like_qemu(d, "a.qcow2", "a.raw"), 0);
    assert_eq!(compare_like_qemu(d, "a.raw", "b.qcow2"), 0);
    // One byte differs (reported at its sector).
    std::fs::copy(d.join("a.raw"), d.join("c.raw")).unwrap();
    qemu_io(d, "raw", "c.raw", &["write -P 9 700001 1"]);
    assert_eq!(compare_like_qemu(d, "a.qcow2", "c.raw"), 1);
    // Data against zeros, either way round.
    qemu_ok(d, &["create", "-f", "qcow2", "z.qcow2", "4M"]);
    assert_eq!(compare_like_qemu(d, "z.qcow2", "a.qcow2"), 1);
    assert_eq!(compare_like_qemu(d, "a.raw", "z.qcow2"), 1);
    // Sizes differ: a zero tail is identical, a non-zero tail is not.
    qemu_ok(
        d,
        &[
            "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "l.qcow2", "6M",
        ],
    );
    assert_eq!(compare_like_qemu(d, "a.qcow2", "l.qcow2"), 0);
    qemu_io(d, "qcow2", "l.qcow2", &["write -P 3 5000000 100"]);
    assert_eq!(compare_like_qemu(d, "l.qcow2", "a.raw"), 1);
    // Errors: exit 2, both.
    assert_eq!(
        qemu_img(d, &["compare", "a.raw", "missing.raw"])
            .status
            .code(),
        Some(2)
    );
    fails_quiet(d, 2, &["compare", "a.raw", "missing.raw"], &["missing.raw"]);
    usage_error(d, &["compare", "-f", "vmdk", "a.raw", "a.qcow2"]);
    // Forced formats: a qcow2 file read as raw differs from its content.
    let out = qcowx(d, &["compare", "-f", "raw", "a.qcow2", "a.raw"]);
    assert_code(&out, 1, "compare -f raw");
    // -q and JSON.
    let out = qcowx(d, &["-q", "compare", "a.qcow2", "c.raw"]);
    assert_code(&out, 1, "compare -q");
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    let out = qcowx(d, &["compare", "--output=json", "a.qcow2", "c.raw"]);
    assert_code(&out, 1, "compare --output=json");
    let v = json(&out);
    assert_eq!(v["identical"], false);
    assert_eq!(v["mismatch-offset"], 700001 / 512 * 512);
    assert_eq!(v["size-a"], 4 << 20);
    let v = json(&ok_quiet(
        d,
        &["compare", "--output=json", "a.qcow2", "b.qcow2"],
    ));
    assert_eq!(v["mismatch-offset"], Value::Null);
    // A locked image is refused, -U reads it.
    let held = qcowx_core::Image::open_rw(d.join("b.qcow2")).unwrap();
    fails_quiet(
        d,
        2,
        &["compare", "a.raw", "b.qcow2"],
        &["b.qcow2", "locked", "-U"],
    );
    ok_quiet(d, &["compare", "-U", "a.raw", "b.qcow2"]);
    drop(held);
}

/// Deterministic bytes: half random, half repeating text, per 4 KiB.
fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = qcowx_tests::Rng::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let mut random = [0u8; 2048];
        rng.fill(&mut random);
        out.extend_from_slice(&random);
        out.extend(b"qcowx compresses this part ".iter().cycle().take(2048));
    }
    out.truncate(len);
    out
}

#[test]
fn convert_between_raw_and_qcow2_and_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A chain with data of every kind: compressible, incompressible, mixed.
    qemu_ok(d, &["create", "-f", "raw", "base.raw", "8M"]);
    std::fs::write(d.join("mixed.bin"), mixed_data(1 << 20, 7)).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("base.raw"))
            .unwrap();
        f.write_all_at(&mixed_data(1 << 20, 7), 2 << 20).unwrap();
        let random: Vec<u8> = mixed_data(1 << 20, 9)
            .chunks(4096)
            .flat_map(|c| c[..2048].to_vec())
            .collect();
        f.write_all_at(&random, 5 << 20).unwrap();
    }
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
            "8M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &["write -P 0x5a 0 1M", "write -z 2M 64k"],
    );
    // qcow2 chain -> raw, raw -> qcow2.
    ok_quiet(d, &["convert", "top.qcow2", "flat.raw"]);
    assert_eq!(
        std::fs::read(d.join("flat.raw")).unwrap(),
        qemu_raw(d, "top.qcow2", None)
    );
    ok_quiet(
        d,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "flat.raw",
            "back.qcow2",
        ],
    );
    assert_qemu_check_clean(d, "back.qcow2");
    assert_code(
        &qemu_img(d, &["compare", "back.qcow2", "top.qcow2"]),
        0,
        "raw->qcow2",
    );
    // Compressed, with the input's cluster size and with small clusters (compressed
    // data then spans host clusters).
    for (out, extra) in [
        ("c64.qcow2", None),
        ("c4.qcow2", Some("4K")),
        ("c512.qcow2", Some("512")),
    ] {
        let mut args = vec!["convert", "-c", "-O", "qcow2"];
        if let Some(cs) = extra {
            args.extend(["--cluster-size", cs]);
        }
        args.extend(["top.qcow2", out]);
        ok_quiet(d, &args);
        assert_qemu_check_clean(d, out);
        assert_code(&qemu_img(d, &["compare", out, "top.qcow2"]), 0, out);
        let check = json(&qemu_ok(d, &["check", "--output=json", out]));
        let compressed = check["compressed-clusters"].as_u64().unwrap_or(0);
        let allocated = check["allocated-clusters"].as_u64().unwrap();
        assert!(compressed > 0, "{out}: {check:#}");
        assert!(
            compressed < allocated,
            "{out}: random data stays uncompressed: {check:#}"
        );
        let map = qemu_map(d, out);
        assert!(map
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["compressed"] == true));
        // qcowx reads it back too, and maps it as QEMU does.
        assert_map_matches_qemu(d, out);
        assert_code(&qcowx(d, &["compare", out, "flat.raw"]), 0, out);
    }
    let small = std::fs::metadata(d.join("c64.qcow2")).unwrap().len();
    let plain = std::fs::metadata(d.join("back.qcow2")).unwrap().len();
    assert!(small < plain, "compressed {small} >= plain {plain}");
    // QEMU can write to a compressed image (copy-on-write of compressed clusters).
    qemu_io(
        d,
        "qcow2",
        "c64.qcow2",
        &["write -P 0x77 4k 4k", "read -P 0x5a 0 4k"],
    );
    assert_qemu_check_clean(d, "c64.qcow2");
    // Errors.
    let err = usage_error(d, &["convert", "-c", "top.qcow2", "x.raw"]);
    assert!(err.contains("-O qcow2"), "{err}");
    usage_error(d, &["convert", "-O", "vmdk", "top.qcow2", "x"]);
    fails_quiet(
        d,
        1,
        &["convert", "missing.qcow2", "x.raw"],
        &["missing.qcow2"],
    );
    fails_quiet(
        d,
        1,
        &["convert", "-O", "qcow2", "top.qcow2", "top.qcow2"],
        &["source image itself"],
    );
    fails_quiet(
        d,
        1,
        &[
            "convert",
            "-O",
            "qcow2",
            "--cluster-size",
            "3000",
            "top.qcow2",
            "y.qcow2",
        ],
        &["cluster size"],
    );
    let held = qcowx_core::Image::open_rw(d.join("back.qcow2")).unwrap();
    fails_quiet(
        d,
        1,
        &["convert", "back.qcow2", "z.raw"],
        &["back.qcow2", "locked", "-U"],
    );
    ok_quiet(d, &["convert", "-U", "back.qcow2", "z.raw"]);
    drop(held);
}
