//! What an operator reads: `tree`'s lineage on images built with `qcowx snapshot`,
//! `fork` and `revert`, and `gc`'s report of what it did to the file.

mod common;
use common::CS;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use qcowx_tests::cli::*;
use serde_json::Value;

/// The names of `tree`'s human lines, with their tree drawing.
fn tree_lines(d: &Path, file: &str) -> Vec<String> {
    stdout(&ok_quiet(d, &["tree", file]))
        .lines()
        .map(|l| l.split("  (").next().unwrap().to_string())
        .collect()
}

#[test]
fn tree_reads_top_down_from_each_vdi_to_its_snapshots_and_their_forks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_quiet(d, &["create", "t.qcow2", "4M"]);
    ok_quiet(d, &["io", "t.qcow2", "-c", "write -P 1 0 256k"]);
    ok_quiet(d, &["snapshot", "t.qcow2", "s1"]);
    ok_quiet(d, &["io", "t.qcow2", "-c", "write -P 2 0 64k"]);
    ok_quiet(d, &["snapshot", "t.qcow2", "s2"]);
    ok_quiet(d, &["fork", "t.qcow2", "s1", "dev"]);
    ok_quiet(d, &["snapshot", "t.qcow2", "--vdi", "dev", "d1"]);
    ok_quiet(d, &["fork", "t.qcow2", "s2", "test"]);
    ok_quiet(d, &["snapshot", "t.qcow2", "--vdi", "test", "t1"]);
    ok_quiet(d, &["fork", "t.qcow2", "t1", "test2"]);
    ok_quiet(d, &["snapshot", "t.qcow2", "s3"]);
    let want = [
        "default",
        "├─ s1",
        "│  └─ dev",
        "│     └─ d1",
        "├─ s2",
        "│  └─ test",
        "│     └─ t1",
        "│        └─ test2",
        "└─ s3",
    ];
    assert_eq!(tree_lines(d, "t.qcow2"), want);
    // A revert changes content, not lineage: the default VDI still heads its
    // snapshots, and so does dev after going back to its own snapshot.
    ok_quiet(d, &["revert", "t.qcow2", "--vdi", "default", "s1"]);
    ok_quiet(d, &["revert", "t.qcow2", "--vdi", "dev", "d1"]);
    assert_eq!(tree_lines(d, "t.qcow2"), want);
    // The JSON says the same: one tree, every VDI but the default under the snapshot
    // it was forked from, every snapshot under its VDI.
    let v = json(&ok_quiet(d, &["tree", "--output=json", "t.qcow2"]));
    let nodes = v["nodes"].as_array().unwrap();
    let up = |n: &str| {
        let node = nodes.iter().find(|x| x["name"] == n).unwrap();
        node["tree-parent"].as_str().map(String::from)
    };
    assert_eq!(up("default"), None);
    for (n, p) in [
        ("s1", "default"),
        ("s3", "default"),
        ("dev", "s1"),
        ("d1", "dev"),
        ("test", "s2"),
        ("t1", "test"),
        ("test2", "t1"),
    ] {
        assert_eq!(up(n).as_deref(), Some(p), "{n}");
    }
    // A snapshot whose VDI is deleted hangs where its VDI was.
    ok_quiet(d, &["delete", "t.qcow2", "--vdi", "test"]);
    let lines = tree_lines(d, "t.qcow2");
    assert_eq!(
        &lines[4..],
        ["├─ s2", "│  └─ t1", "│     └─ test2", "└─ s3"],
        "{lines:#?}"
    );
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn gc_reports_what_it_did_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = d.join("g.qcow2");
    ok_quiet(d, &["create", "g.qcow2", "4M"]);
    ok_quiet(d, &["io", "g.qcow2", "-c", "write -P 1 0 256k"]);
    ok_quiet(d, &["snapshot", "g.qcow2", "s1"]);
    ok_quiet(d, &["fork", "g.qcow2", "s1", "dev"]);
    ok_quiet(
        d,
        &["io", "g.qcow2", "--vdi", "dev", "-c", "write -P 3 1M 128k"],
    );
    ok_quiet(d, &["delete", "g.qcow2", "--vdi", "dev"]);
    let before = allocated(&file);
    let len_before = std::fs::metadata(&file).unwrap().len();
    let v: Value = json(&ok_quiet(d, &["gc", "--output=json", "g.qcow2"]));
    // dev's 2 data clusters, its L2 table and its L1 table.
    assert_eq!(v["clusters-freed"], 4, "{v:#}");
    assert_eq!(v["file-size-before"], len_before, "{v:#}");
    // The compacted snapshot table went past the end: the length grew...
    let len_after = v["file-size-after"].as_u64().unwrap();
    assert_eq!(len_after, std::fs::metadata(&file).unwrap().len());
    assert!(len_after > len_before, "{v:#}");
    // ...while what the file occupies shrank by at least what was freed, and the
    // report says so.
    assert_eq!(v["allocated-before"], before, "{v:#}");
    let after = v["allocated-after"].as_u64().unwrap();
    assert_eq!(after, allocated(&file), "{v:#}");
    assert!(after + 4 * CS <= before, "{v:#}");

    // The human report explains a file that grew.
    ok_quiet(d, &["fork", "g.qcow2", "s1", "dev2"]);
    ok_quiet(
        d,
        &["io", "g.qcow2", "--vdi", "dev2", "-c", "write -P 3 1M 128k"],
    );
    ok_quiet(d, &["delete", "g.qcow2", "--vdi", "dev2"]);
    let text = stdout(&ok_quiet(d, &["gc", "g.qcow2"]));
    assert!(text.contains("allocated on disk: "), "{text}");
    let v_len = |t: &str| -> (u64, u64) {
        let l = t.lines().find(|l| l.starts_with("file size: ")).unwrap();
        let nums: Vec<u64> = l
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse().ok())
            .collect();
        (nums[0], nums[1])
    };
    let (b, a) = v_len(&text);
    assert_eq!(a > b, text.contains("note: the file grew"), "{text}");
    assert_qemu_check_clean(d, "g.qcow2");
}
