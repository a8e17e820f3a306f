//! `qcowx import`: backing chains QEMU built (raw and qcow2 bases, depths 1 to 64)
//! imported into one image whose snapshots read as the layers under `qemu-img`, the
//! naming of snapshots, the human output, and errors that leave the chain and an
//! existing output alone.

use std::path::Path;

use qcowx_tests::cli::*;
use serde_json::Value;

mod common;
use common::CS;

/// Asserts that `got` reads as `want`: equal over `want`'s length and zeros after
/// (`qemu-img convert -l` writes a snapshot at the image's current size).
fn assert_reads_as(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got.len() >= want.len(),
        "{what}: {} < {}",
        got.len(),
        want.len()
    );
    if let Some(i) = got[..want.len()].iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: {} != {}",
            got[i], want[i]
        );
    }
    assert!(
        got[want.len()..].iter().all(|&b| b == 0),
        "{what}: non-zero bytes past the layer's size"
    );
}

/// Builds `base.{raw,qcow2}` <- `l1.qcow2` <- … <- `l{depth}.qcow2` in `d` with
/// `qemu-img create -b` and `qemu-io` writes: data, zeroed clusters over data from
/// below, zeroed partial clusters, a few layers with 4 KiB clusters and one that grows
/// the disk. Returns the files, bottom first.
fn make_chain(d: &Path, raw_base: bool, depth: usize) -> Vec<String> {
    let size = 1u64 << 20;
    let base = if raw_base { "base.raw" } else { "base.qcow2" };
    let fmt = if raw_base { "raw" } else { "qcow2" };
    qemu_ok(d, &["create", "-f", fmt, base, &size.to_string()]);
    qemu_io(
        d,
        fmt,
        base,
        &[
            "write -P 0xb0 0 192k",
            "write -P 0xb1 700k 8k",
            "write -P 0xb2 960k 64k",
        ],
    );
    let mut files = vec![base.to_string()];
    let mut cur_size = size;
    for i in 1..=depth {
        let name = format!("l{i}.qcow2");
        let (prev, prev_fmt) = (files[i - 1].clone(), if i == 1 { fmt } else { "qcow2" });
        // One layer in the middle grows the disk by half.
        if i == depth.div_ceil(2) && depth > 1 {
            cur_size += size / 2;
        }
        let cluster = if i % 4 == 1 {
            "cluster_size=4096"
        } else {
            "cluster_size=65536"
        };
        qemu_ok(
            d,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                cluster,
                "-b",
                &prev,
                "-F",
                prev_fmt,
                &name,
                &cur_size.to_string(),
            ],
        );
        let k = i as u64;
        let data_at = (k * 37 % 16) * CS + (k % 3) * 4096;
        let data_len = 4096 * (1 + k % 17);
        let zero_at = (k * 11 % 16) * CS;
        let partial_zero = ((k * 5 + 3) % 16) * CS + 1024;
        let mut cmds = vec![
            format!("write -P {} {data_at} {data_len}", 0x10 + (k % 200)),
            format!("write -z {zero_at} 64k"),
            format!("write -z {partial_zero} 512"),
        ];
        if cur_size > size {
            cmds.push(format!(
                "write -P {} {} 4k",
                0x20 + (k % 200),
                size + k * 4096
            ));
        }
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(d, "qcow2", &name, &cmds);
        files.push(name);
    }
    files
}

/// Imports the chain under its top, then checks every snapshot against `qemu-img
/// convert` of its layer, the default VDI against the top, and the image with
/// `qemu-img check`. `extra` goes on the command line.
fn import_and_verify(d: &Path, files: &[String], extra: &[&str]) {
    let top = files.last().unwrap();
    let mut args = vec!["import", "--output=json", top, "out.qcow2"];
    args.extend(extra);
    let out = ok_quiet(d, &args);
    // Nothing is left under the temporary name.
    let names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("qcowx-import")),
        "{names:?}"
    );
    let report = json(&out);
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), files.len(), "{report:#}");
    assert_eq!(report["snapshots"], (files.len() - 1) as u64);
    assert_eq!(report["filename"], "out.qcow2");
    assert_eq!(report["top"], top.as_str());
    assert_qemu_check_clean(d, "out.qcow2");
    let info = json(&qemu_ok(d, &["info", "--output=json", "out.qcow2"]));
    assert!(info.get("backing-filename").is_none(), "{info:#}");
    let top_info = json(&qemu_ok(d, &["info", "--output=json", top]));
    assert_eq!(info["cluster-size"], top_info["cluster-size"]);
    assert_eq!(info["virtual-size"], top_info["virtual-size"]);
    // Snapshot names: the file stems, bottom first, in the table in that order.
    let list = json(&ok_quiet(d, &["list", "--output=json", "out.qcow2"]));
    let roots = list["roots"].as_array().unwrap();
    assert_eq!(roots.len(), files.len());
    for (i, file) in files[..files.len() - 1].iter().enumerate() {
        let stem = file.rsplit_once('.').unwrap().0;
        assert_eq!(layers[i]["snapshot"], stem, "{report:#}");
        assert_eq!(layers[i]["filename"], file.as_str());
        assert_eq!(roots[i + 1]["name"], stem);
        assert_eq!(roots[i + 1]["kind"], "snapshot");
        let parent = if i == 0 {
            Value::Null
        } else {
            Value::from(files[i - 1].rsplit_once('.').unwrap().0)
        };
        assert_eq!(roots[i + 1]["parent"], parent, "{list:#}");
        let want = qemu_raw(d, file, None);
        let got = qemu_raw(d, "out.qcow2", Some(stem));
        assert_reads_as(&got, &want, &format!("snapshot {stem} vs {file}"));
        assert_eq!(roots[i + 1]["virtual-size"], want.len() as u64);
    }
    assert_eq!(layers.last().unwrap()["snapshot"], Value::Null);
    let cmp = qemu_img(d, &["compare", "out.qcow2", top]);
    assert_code(&cmp, 0, "qemu-img compare out.qcow2 TOP");
}

#[test]
fn import_chains_of_depth_1_over_raw_and_qcow2_bases() {
    for raw in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let files = make_chain(dir.path(), raw, 1);
        import_and_verify(dir.path(), &files, &[]);
    }
}

#[test]
fn import_chains_of_depth_8_over_raw_and_qcow2_bases() {
    for raw in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let files = make_chain(dir.path(), raw, 8);
        import_and_verify(dir.path(), &files, &[]);
    }
}

/// `--no-sync` leaves the disk to the kernel; the image it writes is the same.
#[test]
fn import_without_sync_writes_the_same_image() {
    for raw in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let files = make_chain(dir.path(), raw, 8);
        import_and_verify(dir.path(), &files, &["--no-sync"]);
    }
}

#[test]
fn import_chain_of_depth_64_over_a_raw_base() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_chain(dir.path(), true, 64);
    import_and_verify(dir.path(), &files, &[]);
}

#[test]
fn import_chain_of_depth_64_over_a_qcow2_base() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_chain(dir.path(), false, 64);
    import_and_verify(dir.path(), &files, &[]);
}

#[test]
fn import_of_a_lone_image_and_human_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A raw file alone: no snapshots, the default VDI reads as the file.
    qemu_ok(d, &["create", "-f", "raw", "disk.raw", "2M"]);
    qemu_io(d, "raw", "disk.raw", &["write -P 0x61 1M 100k"]);
    let out = ok_quiet(d, &["import", "disk.raw", "a.qcow2"]);
    let text = stdout(&out);
    assert!(
        text.contains("disk.raw (raw, 2 MiB) -> default VDI"),
        "{text}"
    );
    assert!(text.contains("Imported 1 layers into 'a.qcow2'"), "{text}");
    assert_code(
        &qemu_img(d, &["compare", "a.qcow2", "disk.raw"]),
        0,
        "compare",
    );
    let info = json(&qemu_ok(d, &["info", "--output=json", "a.qcow2"]));
    assert_eq!(info["cluster-size"], 65536);
    assert!(info.get("snapshots").is_none());
    assert_qemu_check_clean(d, "a.qcow2");
    // Names are sanitized and made unique.
    qemu_ok(d, &["create", "-f", "qcow2", "my disk.qcow2", "1M"]);
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "my disk.qcow2",
            "-F",
            "qcow2",
            "default.img",
            "1M",
        ],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "default.img",
            "-F",
            "qcow2",
            "t.qcow2",
            "1M",
        ],
    );
    let v = json(&ok_quiet(
        d,
        &["import", "--output=json", "t.qcow2", "b.qcow2"],
    ));
    assert_eq!(v["layers"][0]["snapshot"], "my_disk");
    assert_eq!(v["layers"][1]["snapshot"], "default-2");
    // -q: nothing on stdout.
    let out = ok_quiet(d, &["-q", "import", "t.qcow2", "c.qcow2"]);
    assert!(out.stdout.is_empty());
}

#[test]
fn import_errors_name_the_file_and_leave_the_chain_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = make_chain(d, false, 2);
    // A layer in use by a writer is refused (the holder itself may write the file:
    // the unchanged-chain check below starts after it is closed).
    let held = qcowx_core::Image::open_rw(d.join("l1.qcow2")).unwrap();
    fails_quiet(
        d,
        1,
        &["import", "l2.qcow2", "o.qcow2"],
        &["l1.qcow2", "lock"],
    );
    held.close().unwrap();
    drop(held);
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(d.join(f)).unwrap())
        .collect();
    fails_quiet(
        d,
        1,
        &["import", "missing.qcow2", "o.qcow2"],
        &["missing.qcow2"],
    );
    assert!(!d.join("o.qcow2").exists());
    // The output may not be a file of the chain.
    for target in ["base.qcow2", "l1.qcow2", "l2.qcow2"] {
        fails_quiet(
            d,
            1,
            &["import", "l2.qcow2", target],
            &[target, "a file of the chain"],
        );
    }
    // A missing backing file is named.
    std::fs::rename(d.join("base.qcow2"), d.join("gone.qcow2")).unwrap();
    fails_quiet(d, 1, &["import", "l2.qcow2", "o.qcow2"], &["base.qcow2"]);
    std::fs::rename(d.join("gone.qcow2"), d.join("base.qcow2")).unwrap();
    for (f, b) in files.iter().zip(&before) {
        assert!(std::fs::read(d.join(f)).unwrap() == *b, "{f} changed");
    }
    // A layer smaller than the one below it is refused, naming both.
    qemu_ok(d, &["create", "-f", "qcow2", "big.qcow2", "4M"]);
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "big.qcow2",
            "-F",
            "qcow2",
            "small.qcow2",
            "2M",
        ],
    );
    fails_quiet(
        d,
        1,
        &["import", "small.qcow2", "o2.qcow2"],
        &["small.qcow2", "big.qcow2", "smaller"],
    );
    // Usage errors.
    usage_error(d, &["import", "l2.qcow2"]);
    usage_error(d, &["import", "--output=xml", "l2.qcow2", "o.qcow2"]);
    // No failed import leaves its temporary file behind.
    let stray: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("qcowx-import"))
        .collect();
    assert!(stray.is_empty(), "left behind: {stray:?}");
}

#[test]
fn import_replaces_an_output_only_when_done_and_not_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = make_chain(d, false, 2);
    // An output in use by another writer is refused and left alone.
    qemu_ok(d, &["create", "-f", "qcow2", "out.qcow2", "1M"]);
    let before = std::fs::read(d.join("out.qcow2")).unwrap();
    let held = qcowx_core::Image::open_rw(d.join("out.qcow2")).unwrap();
    let top = files.last().unwrap().as_str();
    fails_quiet(d, 1, &["import", top, "out.qcow2"], &["out.qcow2", "lock"]);
    held.close().unwrap();
    drop(held);
    assert!(std::fs::read(d.join("out.qcow2")).unwrap() == before);
    // A free one is replaced by the complete import.
    import_and_verify(d, &files, &[]);
    let stray: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("qcowx-import"))
        .collect();
    assert!(stray.is_empty(), "left behind: {stray:?}");
}
