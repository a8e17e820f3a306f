//! `convert`'s qemu-img options beyond the formats: `-n` and `--target-is-zero`
//! (writing into an existing output), `-S` (sparse detection), `-l` (a snapshot as the
//! input), `-r` (rate limit), and the options qcowx accepts for scripts' sake (`-t`,
//! `-T`, `-m`, `-W`, `-C`); and `dd`. Each command line runs under both tools in two
//! folders holding the same files, and the outputs are compared byte for byte.

use std::os::unix::fs::MetadataExt;

use qcowx_tests::cli::*;

const MIB: u64 = 1 << 20;

/// A 4 MiB qcow2 `src.qcow2` in both folders: data at 0 and at 3 MiB (192 KiB whose
/// middle 64 KiB are zeros), zeros written as data at 2 MiB, a zero cluster at 1 MiB,
/// the rest unallocated.
fn source(t: &Twins) {
    t.prepare(&["create", "-f", "qcow2", "src.qcow2", "4M"]);
    t.prepare_io(
        "qcow2",
        "src.qcow2",
        &[
            "write -P 0x11 0 64k",
            "write -z 1M 64k",
            "write -P 0 2M 64k",
            "write -P 0x33 3M 192k",
            "write -P 0 3136k 64k",
            "write -P 0x34 3200k 4k",
        ],
    );
}

/// A raw file of `len` bytes of 0xdb in both folders.
fn junk(t: &Twins, name: &str, len: u64) {
    for d in t.dirs() {
        std::fs::write(d.join(name), vec![0xdb; len as usize]).unwrap();
    }
}

/// The bytes `file` occupies on the disk in `dir`.
fn allocated(dir: &std::path::Path, file: &str) -> u64 {
    std::fs::metadata(dir.join(file)).unwrap().blocks() * 512
}

#[test]
fn no_create_writes_into_an_existing_output_as_qemu_img_does() {
    let t = Twins::new();
    source(&t);

    // A raw output longer than the source: the source's 4 MiB replace its start, the
    // zeros included; the rest is kept.
    junk(&t, "out.raw", 6 * MIB);
    t.both(&["convert", "-n", "src.qcow2", "out.raw"], Some(0));
    let (q, x) = t.files("out.raw");
    assert_eq!(q.len() as u64, 6 * MIB);
    assert!(q == x, "raw outputs differ");
    assert!(x[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(x[4 * MIB as usize..].iter().all(|&b| b == 0xdb));

    // A qcow2 output full of data, larger than the source.
    t.prepare(&["create", "-f", "qcow2", "out.qcow2", "8M"]);
    t.prepare_io("qcow2", "out.qcow2", &["write -P 0xdb 0 8M"]);
    t.both(
        &["convert", "-n", "-O", "qcow2", "src.qcow2", "out.qcow2"],
        Some(0),
    );
    let (q, x) = t.contents("out.qcow2");
    assert!(q == x, "qcow2 outputs differ");
    assert!(x[..65536].iter().all(|&b| b == 0x11));
    assert!(x[7 * MIB as usize..].iter().all(|&b| b == 0xdb));
    assert_qemu_check_clean(&t.qcowx, "out.qcow2");

    // --target-is-zero: the output is taken at its word, zeros are not written.
    junk(&t, "trust.raw", 4 * MIB);
    t.both(
        &[
            "convert",
            "-n",
            "--target-is-zero",
            "src.qcow2",
            "trust.raw",
        ],
        Some(0),
    );
    let (q, x) = t.files("trust.raw");
    assert!(q == x, "--target-is-zero outputs differ");
    assert!(x[MIB as usize..MIB as usize + 16]
        .iter()
        .all(|&b| b == 0xdb));

    // Refused: an output smaller than the source (left as it was), a missing output,
    // --target-is-zero without -n, and creation options with -n.
    junk(&t, "small.raw", MIB);
    let (_, x) = t.both(&["convert", "-n", "src.qcow2", "small.raw"], None);
    assert!(stderr(&x).contains("smaller than input"), "{}", stderr(&x));
    assert_eq!(t.files("small.raw").1, vec![0xdb; MIB as usize]);
    t.both(&["convert", "-n", "src.qcow2", "missing.raw"], None);
    assert!(!t.qcowx.join("missing.raw").exists());
    t.both(&["convert", "--target-is-zero", "src.qcow2", "z.raw"], None);
    assert!(!t.qcowx.join("z.raw").exists());
    t.both(
        &[
            "convert",
            "-n",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "src.qcow2",
            "out.qcow2",
        ],
        None,
    );
}

#[test]
fn sparse_size_decides_what_is_allocated_as_qemu_img_does() {
    let t = Twins::new();
    source(&t);

    // Default (4 KiB): the zeros are holes; -S 0: every byte is allocated.
    t.both(&["convert", "src.qcow2", "sparse.raw"], Some(0));
    t.both(&["convert", "-S", "0", "src.qcow2", "full.raw"], Some(0));
    for f in ["sparse.raw", "full.raw"] {
        let (q, x) = t.files(f);
        assert!(q == x, "{f}: contents differ");
    }
    assert!(allocated(&t.qcowx, "sparse.raw") < MIB);
    assert!(allocated(&t.qcowx, "full.raw") >= 4 * MIB);
    assert!(allocated(&t.qemu, "full.raw") >= 4 * MIB);

    // A qcow2 output: -S 0 allocates every cluster, as qemu-img's does.
    t.both(
        &[
            "convert",
            "-S",
            "0",
            "-O",
            "qcow2",
            "src.qcow2",
            "full.qcow2",
        ],
        Some(0),
    );
    let map = |d: &std::path::Path| {
        let v = json(&qemu_ok(d, &["map", "--output=json", "full.qcow2"]));
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| (e["start"].clone(), e["length"].clone(), e["data"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(map(&t.qemu), map(&t.qcowx));
    assert_eq!(
        map(&t.qcowx).len(),
        1,
        "one data extent: {:?}",
        map(&t.qcowx)
    );
    assert_qemu_check_clean(&t.qcowx, "full.qcow2");
    let (q, x) = t.contents("full.qcow2");
    assert!(q == x);

    // A run of zeros shorter than -S between data in one read is written; one at the
    // start or end of what is read is not, whatever its length (as in qemu-img).
    let raw_map = |d: &std::path::Path, f: &str| {
        let v = json(&qemu_ok(d, &["map", "-f", "raw", "--output=json", f]));
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect::<Vec<_>>()
    };
    let fine = raw_map(&t.qcowx, "sparse.raw");
    assert!(fine.contains(&(3 * MIB, 65536)), "{fine:?}");
    assert_eq!(fine, raw_map(&t.qemu, "sparse.raw"));
    t.both(
        &["convert", "-S", "128k", "src.qcow2", "coarse.raw"],
        Some(0),
    );
    let (q, x) = t.files("coarse.raw");
    assert!(q == x);
    let coarse = raw_map(&t.qcowx, "coarse.raw");
    assert!(coarse.contains(&(3 * MIB, 196608)), "{coarse:?}");
    assert!(!coarse.iter().any(|&(s, _)| s == 2 * MIB), "{coarse:?}");
    assert_eq!(coarse, raw_map(&t.qemu, "coarse.raw"));

    // Sizes qemu-img refuses.
    for bad in ["3000", "32M", "-512"] {
        t.both(&["convert", "-S", bad, "src.qcow2", "bad.raw"], None);
        assert!(!t.qcowx.join("bad.raw").exists(), "-S {bad}");
    }
}

#[test]
fn a_snapshot_is_converted_by_its_id_or_name_as_qemu_img_does() {
    let t = Twins::new();
    source(&t);
    t.prepare(&["snapshot", "-c", "first", "src.qcow2"]);
    t.prepare_io("qcow2", "src.qcow2", &["write -P 0x55 0 1M"]);
    t.prepare(&["snapshot", "-c", "second", "src.qcow2"]);
    t.prepare_io("qcow2", "src.qcow2", &["write -P 0x66 0 2M"]);

    let specs = [
        ("first", "a.raw"),
        ("snapshot.name=second", "b.raw"),
        ("snapshot.id=1", "c.raw"),
        ("2", "d.raw"),
        ("snapshot.id=2,snapshot.name=second", "e.raw"),
    ];
    for (spec, out) in specs {
        t.both(&["convert", "-l", spec, "src.qcow2", out], Some(0));
        let (q, x) = t.files(out);
        assert!(q == x, "-l {spec}: outputs differ");
    }
    let (_, first) = t.files("a.raw");
    assert!(first[..65536].iter().all(|&b| b == 0x11));
    assert_eq!(t.files("c.raw").1, first, "ID 1 is 'first'");
    let (_, second) = t.files("b.raw");
    assert!(second[..MIB as usize].iter().all(|&b| b == 0x55));
    assert_eq!(t.files("d.raw").1, second);
    assert_eq!(t.files("e.raw").1, second);

    // A qcow2 output of a snapshot.
    t.both(
        &[
            "convert",
            "-l",
            "first",
            "-O",
            "qcow2",
            "src.qcow2",
            "f.qcow2",
        ],
        Some(0),
    );
    assert_eq!(t.contents("f.qcow2").1, first);
    assert_qemu_check_clean(&t.qcowx, "f.qcow2");

    for bad in [
        "third",
        "snapshot.id=1,snapshot.name=second",
        "snapshot.id=9",
    ] {
        t.both(&["convert", "-l", bad, "src.qcow2", "bad.raw"], None);
    }
}

#[test]
fn cache_parallelism_and_offload_options_are_taken_as_qemu_img_takes_them() {
    let t = Twins::new();
    source(&t);
    let runs: [&[&str]; 4] = [
        &[
            "convert",
            "-t",
            "none",
            "-T",
            "writeback",
            "src.qcow2",
            "a.raw",
        ],
        &[
            "convert",
            "-t",
            "unsafe",
            "-m",
            "16",
            "-W",
            "src.qcow2",
            "b.raw",
        ],
        &["convert", "-C", "-O", "qcow2", "src.qcow2", "c.qcow2"],
        &[
            "convert",
            "-t",
            "directsync",
            "-m",
            "1",
            "src.qcow2",
            "d.raw",
        ],
    ];
    for args in runs {
        t.both(args, Some(0));
        let out = args.last().unwrap();
        let (q, x) = t.contents(out);
        assert!(q == x, "{args:?}: contents differ");
    }
    // The long names qemu-img 10.1 gives these options.
    ok(
        &t.qcowx,
        &[
            "convert",
            "--target-cache",
            "writethrough",
            "--source-cache",
            "none",
            "--parallel",
            "4",
            "--oob-writes",
            "--sparse-size",
            "8k",
            "--rate-limit",
            "1G",
            "src.qcow2",
            "e.raw",
        ],
    );
    let long = std::fs::read(t.qcowx.join("e.raw")).unwrap();
    assert!(long == t.files("a.raw").1);
    let refused: [&[&str]; 5] = [
        &["convert", "-t", "bogus", "src.qcow2", "x.raw"],
        &["convert", "-T", "bogus", "src.qcow2", "x.raw"],
        &["convert", "-m", "17", "src.qcow2", "x.raw"],
        &["convert", "-m", "0", "src.qcow2", "x.raw"],
        &["convert", "-C", "-c", "-O", "qcow2", "src.qcow2", "x.qcow2"],
    ];
    for args in refused {
        t.both(args, None);
    }
    assert!(!t.qcowx.join("x.raw").exists() && !t.qcowx.join("x.qcow2").exists());
}

#[test]
fn rate_limit_holds_writes_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data: Vec<u8> = (0..12 * MIB).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(d.join("in.raw"), &data).unwrap();
    // 12 MiB at 8 MiB/s, written 4 MiB at a time: the third write waits until 1 s.
    let start = std::time::Instant::now();
    ok(
        d,
        &["convert", "-f", "raw", "-r", "8M", "in.raw", "out.raw"],
    );
    let took = start.elapsed();
    assert!(took.as_millis() >= 950, "12 MiB at 8 MiB/s took {took:?}");
    assert!(std::fs::read(d.join("out.raw")).unwrap() == data);
    usage_or_fails(d, &["convert", "-r", "fast", "in.raw", "x.raw"]);
}

/// `args` fail (usage error or runtime error alike) and leave no `x.raw`.
fn usage_or_fails(d: &std::path::Path, args: &[&str]) {
    let out = qcowx(d, args);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!d.join("x.raw").exists());
}

#[test]
fn dd_copies_what_qemu_img_dd_copies() {
    let t = Twins::new();
    source(&t);
    let cases: [&[&str]; 5] = [
        &["bs=512", "count=4", "skip=2"],
        &["bs=64k"],
        &["bs=1M", "count=3", "skip=1"],
        &["skip=100000"], // past the end: an empty output, and a warning
        &["count=9", "bs=4k", "skip=1"],
    ];
    for (i, ops) in cases.iter().enumerate() {
        for fmt in ["raw", "qcow2"] {
            let out = format!("of=dd{i}.{fmt}");
            let mut args = vec!["dd", "-O", fmt, "if=src.qcow2", out.as_str()];
            args.extend_from_slice(ops);
            t.both(&args, Some(0));
            let file = &out[3..];
            let (q, x) = t.contents(file);
            assert!(q == x, "dd {ops:?} -O {fmt}: contents differ");
            // Every byte is written, zeros included: the same allocation as QEMU's.
            let size = |d: &std::path::Path| std::fs::metadata(d.join(file)).unwrap().len();
            assert_eq!(
                size(&t.qemu),
                size(&t.qcowx),
                "dd {ops:?} -O {fmt}: file sizes"
            );
            if fmt == "qcow2" {
                assert_qemu_check_clean(&t.qcowx, file);
            }
        }
    }
    assert_eq!(
        t.contents("dd0.raw").1.len(),
        1024,
        "count ends the input at 4 × 512"
    );
    assert_eq!(t.contents("dd2.raw").1.len(), 2 * MIB as usize);
    assert!(t.contents("dd3.raw").1.is_empty());
    let (_, x) = t.both(&["dd", "if=src.qcow2", "of=w.raw", "skip=100000"], Some(0));
    assert!(stderr(&x).contains("cannot skip"), "{}", stderr(&x));

    // Operands qemu-img refuses: unknown ones, a missing input or output, bs=0.
    let refused: [&[&str]; 4] = [
        &["dd", "if=src.qcow2", "of=x.raw", "seek=1"],
        &["dd", "if=src.qcow2"],
        &["dd", "of=x.raw", "bs=512"],
        &["dd", "if=src.qcow2", "of=x.raw", "bs=0"],
    ];
    for args in refused {
        t.both(args, None);
    }
    assert!(!t.qcowx.join("x.raw").exists());
}

/// Writes `bytes` at `offset` of `file` in both folders.
fn poke(t: &Twins, file: &str, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    for d in t.dirs() {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join(file))
            .unwrap();
        f.write_all_at(bytes, offset).unwrap();
    }
}

/// The big-endian word at `offset` of `file` (in qcowx's folder).
fn word(t: &Twins, file: &str, offset: u64) -> u64 {
    let b = std::fs::read(t.qcowx.join(file)).unwrap();
    let at = offset as usize;
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn salvage_copies_what_cannot_be_read_as_zeros_as_qemu_img_does() {
    let t = Twins::new();
    // Compressed clusters (64 KiB each, one byte value per cluster), one of whose
    // data is then destroyed: it cannot be inflated.
    let pattern: Vec<u8> = (0..64u8).flat_map(|c| vec![c + 1; 65536]).collect();
    for d in t.dirs() {
        std::fs::write(d.join("pattern.raw"), &pattern).unwrap();
    }
    t.prepare(&[
        "convert",
        "-f",
        "raw",
        "-c",
        "-O",
        "qcow2",
        "pattern.raw",
        "packed.qcow2",
    ]);
    let l1 = word(&t, "packed.qcow2", 40);
    let l2 = word(&t, "packed.qcow2", l1) & 0x00ff_ffff_ffff_fe00;
    let entry = word(&t, "packed.qcow2", l2 + 5 * 8);
    assert_ne!(entry & (1 << 62), 0, "cluster 5 is compressed");
    let data = entry & ((1 << 54) - 1);
    poke(&t, "packed.qcow2", data, &[0xff; 64]);

    // An L1 entry whose L2 table offset is not aligned: block status fails there.
    t.prepare(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "tables.qcow2",
        "8M",
    ]);
    t.prepare_io(
        "qcow2",
        "tables.qcow2",
        &["write -P 1 0 1M", "write -P 2 2M 1M"],
    );
    let l1 = word(&t, "tables.qcow2", 40);
    poke(
        &t,
        "tables.qcow2",
        l1 + 8,
        &((1u64 << 63) | 0x0012_3400).to_be_bytes(),
    );

    for (file, lost) in [
        ("packed.qcow2", 5 * 65536..6 * 65536),
        ("tables.qcow2", 2 << 20..4 << 20),
    ] {
        // Without --salvage both refuse.
        t.both(&["convert", "-O", "raw", file, "plain.raw"], None);
        let (q, x) = t.both(
            &["convert", "--salvage", "-O", "raw", file, "saved.raw"],
            Some(0),
        );
        let (qb, xb) = t.files("saved.raw");
        assert!(qb == xb, "{file}: salvaged outputs differ");
        assert!(xb[lost.clone()].iter().all(|&b| b == 0), "{file}");
        assert!(
            xb[..65536].iter().all(|&b| b != 0),
            "{file}: what reads is kept"
        );
        // Each sector given up on is named, as qemu-img names it.
        let sector = format!("error while reading offset {}:", lost.start);
        for out in [&q, &x] {
            assert!(
                stderr(out).contains("warning: error while reading"),
                "{file}"
            );
        }
        assert!(
            stderr(&x).contains(&sector) || stderr(&x).contains("block status"),
            "{file}"
        );
        // -q keeps them quiet.
        let quiet = qcowx(
            &t.qcowx,
            &["convert", "-q", "--salvage", "-O", "raw", file, "q.raw"],
        );
        assert_code(&quiet, 0, "convert -q --salvage");
        assert!(stderr(&quiet).is_empty(), "{}", stderr(&quiet));
    }
    // Compressed output of a damaged input, and qcowx's own check of the result.
    t.both(
        &[
            "convert",
            "--salvage",
            "-c",
            "-O",
            "qcow2",
            "packed.qcow2",
            "again.qcow2",
        ],
        Some(0),
    );
    let (q, x) = t.contents("again.qcow2");
    assert!(q == x);
    assert_qemu_check_clean(&t.qcowx, "again.qcow2");
}

#[test]
fn backing_makes_the_output_an_overlay_as_qemu_img_does() {
    let t = Twins::new();
    // base: 2 MiB of data in 4 MiB; top over it: data, a zero cluster, zeros
    // written as data, and data past the base's data.
    t.prepare(&["create", "-f", "qcow2", "base.qcow2", "4M"]);
    t.prepare_io("qcow2", "base.qcow2", &["write -P 1 0 2M"]);
    t.prepare(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
        "4M",
    ]);
    t.prepare_io(
        "qcow2",
        "top.qcow2",
        &[
            "write -P 2 64k 64k",
            "write -z 128k 64k",
            "write -P 0 256k 64k",
            "write -P 3 3M 64k",
        ],
    );
    t.prepare(&["convert", "-O", "raw", "top.qcow2", "flat.raw"]);
    // A shorter backing file: zeros past its end need not be written.
    t.prepare(&["create", "-f", "qcow2", "short.qcow2", "1M"]);
    t.prepare_io("qcow2", "short.qcow2", &["write -P 7 0 1M"]);

    let map = |d: &std::path::Path, f: &str| {
        let v = json(&qemu_ok(d, &["map", "--output=json", f]));
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].clone(),
                    e["length"].clone(),
                    e["depth"].clone(),
                    e["zero"].clone(),
                    e["data"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    let runs: [(&[&str], &str); 3] = [
        (
            &[
                "convert",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "top.qcow2",
                "a.qcow2",
            ],
            "a.qcow2",
        ),
        (
            &[
                "convert",
                "-f",
                "raw",
                "-B",
                "base.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "flat.raw",
                "b.qcow2",
            ],
            "b.qcow2",
        ),
        (
            &[
                "convert",
                "-f",
                "raw",
                "-B",
                "short.qcow2",
                "-F",
                "qcow2",
                "-O",
                "qcow2",
                "flat.raw",
                "c.qcow2",
            ],
            "c.qcow2",
        ),
    ];
    for (args, out) in runs {
        t.both(args, Some(0));
        assert_eq!(
            map(&t.qemu, out),
            map(&t.qcowx, out),
            "{args:?}: maps differ"
        );
        let (q, x) = t.contents(out);
        assert!(q == x, "{args:?}: contents differ");
        assert_qemu_check_clean(&t.qcowx, out);
        let info = json(&qemu_ok(&t.qcowx, &["info", "--output=json", out]));
        assert!(
            info["backing-filename"].as_str().is_some(),
            "{out}: no backing file"
        );
    }
    // Only the top's own layer went into a.qcow2: it reads as top does.
    assert!(t.contents("a.qcow2").1 == std::fs::read(t.qcowx.join("flat.raw")).unwrap());

    // Refused as qemu-img refuses: no -F, a raw output.
    t.both(
        &[
            "convert",
            "-B",
            "base.qcow2",
            "-O",
            "qcow2",
            "top.qcow2",
            "x.qcow2",
        ],
        None,
    );
    t.both(
        &[
            "convert",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "x.raw",
        ],
        None,
    );
    assert!(!t.qcowx.join("x.qcow2").exists() && !t.qcowx.join("x.raw").exists());
}

/// A qcow2 output has 64 KiB clusters unless `-o cluster_size` says otherwise, whatever
/// the source's, as qemu-img's has.
#[test]
fn a_qcow2_output_has_qemu_imgs_cluster_size_whatever_the_sources() {
    let t = Twins::new();
    t.prepare(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "small.qcow2",
        "1M",
    ]);
    t.prepare_io("qcow2", "small.qcow2", &["write -P 0x5a 0 12k"]);
    let cluster_bits = |bytes: &[u8]| u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    for (args, bits) in [
        (
            &["convert", "-O", "qcow2", "small.qcow2", "out.qcow2"][..],
            16,
        ),
        (
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=8k",
                "small.qcow2",
                "out8.qcow2",
            ][..],
            13,
        ),
    ] {
        t.both(args, Some(0));
        let out = args.last().unwrap();
        let (q, x) = t.files(out);
        assert_eq!(cluster_bits(&q), bits, "oracle: qemu-img's {out}");
        assert_eq!(cluster_bits(&x), bits, "qcowx's {out}");
    }
}
