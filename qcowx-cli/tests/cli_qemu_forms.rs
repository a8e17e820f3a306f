//! Command lines written for `qemu-img` run unchanged under `qcowx`: each is run by
//! both tools, in two folders holding the same files, and the outcomes compared (exit
//! status, then what the command printed or left in the image). Covers `-f qcow2` on
//! every command that takes one image, `create -u` and `-o size=`, and `snapshot`'s
//! `-l`, `-c`, `-a` and `-d`. (`check -r leaks|all`: `cli_check.rs`.)

use qcowx_tests::cli::*;
use std::path::Path;
use std::process::Output;

#[test]
fn image_commands_with_dash_f_qcow2_behave_as_qemu_img() {
    let t = Twins::new();
    t.both(&["create", "-f", "qcow2", "a.qcow2", "16M"], Some(0));
    let (q, x) = t.infos("a.qcow2");
    assert_eq!(q["virtual-size"], x["virtual-size"]);
    assert_qemu_check_clean(&t.qcowx, "a.qcow2");

    // The size as a creation option, and a backing file named but not opened.
    t.both(
        &["create", "-f", "qcow2", "-o", "size=8M", "o.qcow2"],
        Some(0),
    );
    let (q, x) = t.infos("o.qcow2");
    assert_eq!(q["virtual-size"], 8 << 20);
    assert_eq!(x["virtual-size"], 8 << 20);
    let unsafe_create = [
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "later.qcow2",
        "-F",
        "qcow2",
        "u.qcow2",
        "4M",
    ];
    t.both(&unsafe_create, Some(0));
    let (q, x) = t.infos("u.qcow2");
    for key in [
        "backing-filename",
        "backing-filename-format",
        "virtual-size",
    ] {
        assert_eq!(q[key], x[key], "{key}");
    }
    assert_eq!(x["backing-filename"], "later.qcow2");
    // Without -u, the missing backing file fails both.
    t.both(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "later.qcow2",
            "-F",
            "qcow2",
            "v.qcow2",
            "4M",
        ],
        None,
    );
    assert!(
        !t.qcowx.join("v.qcow2").exists(),
        "a failed create left a file"
    );
    // ... and a file it was told to replace stays as it was.
    std::fs::write(t.qcowx.join("keep.qcow2"), b"kept").unwrap();
    let out = qcowx(
        &t.qcowx,
        &[
            "create",
            "--overwrite",
            "-b",
            "later.qcow2",
            "-F",
            "qcow2",
            "keep.qcow2",
            "4M",
        ],
    );
    assert_code(&out, 1, "create over a file with a missing backing file");
    assert_eq!(std::fs::read(t.qcowx.join("keep.qcow2")).unwrap(), b"kept");

    // Writes (qemu-io's -f), map, check, resize, amend, rebase.
    let io = |d: &Path, prog: &str| {
        let out = run(
            prog,
            &["-f", "qcow2", "-c", "write -P 0x5a 64k 128k", "a.qcow2"],
            d,
        );
        assert_code(&out, 0, &format!("{prog} io"));
    };
    io(&t.qemu, "qemu-io");
    let out = qcowx(
        &t.qcowx,
        &[
            "io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 64k 128k",
            "a.qcow2",
        ],
    );
    assert_code(&out, 0, "qcowx io -f qcow2");
    let (q, x) = t.contents("a.qcow2");
    assert!(q == x, "contents differ after the writes");
    let (q, x) = t.both(&["map", "-f", "qcow2", "--output=json", "a.qcow2"], Some(0));
    let extents = |o: &Output| {
        let v = json(o);
        let list = v.get("extents").cloned().unwrap_or(v);
        list.as_array()
            .unwrap()
            .iter()
            .map(|e| (e["start"].clone(), e["length"].clone(), e["data"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(extents(&q), extents(&x));
    t.both(&["check", "-f", "qcow2", "a.qcow2"], Some(0));
    t.both(&["info", "-f", "qcow2", "a.qcow2"], Some(0));
    t.both(&["resize", "-f", "qcow2", "a.qcow2", "+1M"], Some(0));
    t.both(
        &["amend", "-f", "qcow2", "-o", "lazy_refcounts=on", "a.qcow2"],
        Some(0),
    );
    t.both(
        &["rebase", "-f", "qcow2", "-u", "-b", "", "a.qcow2"],
        Some(0),
    );
    let (q, x) = t.infos("a.qcow2");
    assert_eq!(q["virtual-size"], x["virtual-size"]);
    assert_eq!(
        q["format-specific"]["data"]["lazy-refcounts"],
        x["format-specific"]["data"]["lazy-refcounts"]
    );
    assert_qemu_check_clean(&t.qcowx, "a.qcow2");

    // qcowx reads qcow2 only: -f raw is a usage error that names what it takes.
    let err = usage_error(&t.qcowx, &["info", "-f", "raw", "a.qcow2"]);
    assert!(err.contains("qcow2"), "{err}");
    // qcowx does not shrink: `resize --shrink` gets the reason, not a parse error.
    let out = qcowx(
        &t.qcowx,
        &["resize", "-f", "qcow2", "--shrink", "a.qcow2", "1M"],
    );
    assert_code(&out, 1, "resize --shrink");
    assert!(stderr(&out).contains("only grows"), "{}", stderr(&out));
}

#[test]
fn snapshot_list_create_apply_delete_behave_as_qemu_img() {
    let t = Twins::new();
    t.both(&["create", "-f", "qcow2", "s.qcow2", "4M"], Some(0));
    for d in t.dirs() {
        let out = run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 1 0 64k", "s.qcow2"],
            d,
        );
        assert_code(&out, 0, "qemu-io");
    }
    t.both(
        &["snapshot", "-f", "qcow2", "-c", "first", "s.qcow2"],
        Some(0),
    );
    // The table qcowx prints is the one qemu-img prints for the same file.
    let ours = qcowx(&t.qcowx, &["snapshot", "-l", "s.qcow2"]);
    assert_code(&ours, 0, "qcowx snapshot -l");
    let theirs = qemu_ok(&t.qcowx, &["snapshot", "-l", "s.qcow2"]);
    assert_eq!(stdout(&ours), stdout(&theirs));
    assert!(stdout(&ours).contains(" first "), "{}", stdout(&ours));
    // Apply: the image reads as it did at the snapshot.
    let at_snapshot = t.contents("s.qcow2");
    assert!(at_snapshot.0 == at_snapshot.1);
    for d in t.dirs() {
        let out = run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 2 0 8k", "s.qcow2"],
            d,
        );
        assert_code(&out, 0, "qemu-io");
    }
    t.both(&["snapshot", "-a", "first", "s.qcow2"], Some(0));
    let (q, x) = t.contents("s.qcow2");
    assert!(
        q == at_snapshot.0 && x == at_snapshot.0,
        "apply did not revert"
    );
    // Delete: the snapshot is gone (from QEMU's table too once gc has run).
    t.both(&["snapshot", "-d", "first", "s.qcow2"], Some(0));
    let list = json(&qcowx(&t.qcowx, &["list", "--output=json", "s.qcow2"]));
    assert!(!list.to_string().contains("\"first\""), "{list:#}");
    assert_code(&qcowx(&t.qcowx, &["gc", "s.qcow2"]), 0, "gc");
    assert!(!qemu_snapshot_names(&t.qcowx, "s.qcow2").contains(&"first".to_string()));
    assert!(qemu_snapshot_names(&t.qemu, "s.qcow2").is_empty());
    // Unknown snapshots fail both.
    t.both(&["snapshot", "-a", "nothere", "s.qcow2"], None);
    t.both(&["snapshot", "-d", "nothere", "s.qcow2"], None);
    assert_qemu_check_clean(&t.qcowx, "s.qcow2");
}

#[test]
fn convert_takes_qemu_img_output_options_and_progress() {
    let t = Twins::new();
    t.both(
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=1.1",
            "src.qcow2",
            "8M",
        ],
        Some(0),
    );
    for d in t.dirs() {
        let out = run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 7 1M 200k", "src.qcow2"],
            d,
        );
        assert_code(&out, 0, "qemu-io");
    }
    let convert = [
        "convert",
        "-p",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k,refcount_bits=16,compression_type=zstd,compat=1.1",
        "src.qcow2",
        "out.qcow2",
    ];
    t.both(&convert, Some(0));
    let (q, x) = t.infos("out.qcow2");
    assert_eq!(x["cluster-size"], 4096);
    for key in ["cluster-size", "virtual-size"] {
        assert_eq!(q[key], x[key], "{key}");
    }
    for key in ["refcount-bits", "compression-type", "compat"] {
        assert_eq!(
            q["format-specific"]["data"][key], x["format-specific"]["data"][key],
            "{key}"
        );
    }
    let (q, x) = t.contents("out.qcow2");
    assert!(q == x, "converted contents differ");
    assert_qemu_check_clean(&t.qcowx, "out.qcow2");
    // What qcowx cannot honour is refused, naming why, and writes nothing.
    for (opts, why) in [("compat=0.10", "compat=1.1"), ("size=1G", "size")] {
        let out = qcowx(
            &t.qcowx,
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                opts,
                "src.qcow2",
                "no.qcow2",
            ],
        );
        assert_code(&out, 1, opts);
        assert!(stderr(&out).contains(why), "{opts}: {}", stderr(&out));
        assert!(!t.qcowx.join("no.qcow2").exists(), "{opts} left a file");
    }
}
