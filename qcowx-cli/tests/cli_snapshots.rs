//! End-to-end tests of `qcowx snapshot`, `fork`, `list`, `export` of snapshots and VDI
//! heads, and `diff` between them, with QEMU's `qemu-img` and `qemu-io` as the oracle.

mod common;
use common::{create, io, keys, list, qcowx_raw, CS};
use std::collections::BTreeSet;
use std::path::Path;

use qcowx_tests::cli::*;
use serde_json::Value;

fn root<'a>(roots: &'a [Value], name: &str) -> &'a Value {
    roots
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no root {name} in {roots:#?}"))
}

// ---- snapshots, forks and export, judged by QEMU ----------------------------------

/// default: s1 -> s2 -> (head); dev forked from s1 with its own snapshot d1.
fn make_tree(d: &Path, file: &str) {
    create(d, file, "8M");
    io(
        d,
        file,
        None,
        &["write -P 0x11 0 1M", "write -P 0x12 3M 100k"],
    );
    ok(d, &["snapshot", file, "s1"]);
    io(
        d,
        file,
        None,
        &["write -P 0x21 512k 1M", "write -z 3M 64k", "discard 0 64k"],
    );
    ok(d, &["snapshot", "--vdi", "default", file, "s2"]);
    io(d, file, None, &["write -P 0x31 7M 1M"]);
    ok(d, &["fork", file, "s1", "dev"]);
    io(
        d,
        file,
        Some("dev"),
        &["write -P 0x41 100 5000", "write -P 0x42 6M 64k"],
    );
    ok(d, &["snapshot", "--vdi", "dev", file, "d1"]);
    io(d, file, Some("dev"), &["write -P 0x43 6M 4k"]);
}

#[test]
fn snapshots_forks_and_exports_agree_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_tree(d, "t.qcow2");

    // qemu-img lists every root (a VDI head as "vdi:NAME") and finds no errors.
    assert_eq!(
        qemu_snapshot_names(d, "t.qcow2"),
        ["s1", "s2", "vdi:dev", "d1"]
    );
    assert_qemu_check_clean(d, "t.qcow2");

    // Each snapshot reads the same through QEMU and through qcowx export.
    for s in ["s1", "s2", "d1"] {
        let theirs = qemu_raw(d, "t.qcow2", Some(s));
        let ours = qcowx_raw(d, "t.qcow2", &["--snapshot", s]);
        assert_eq!(ours.len(), 8 << 20, "{s}");
        assert!(
            ours == theirs,
            "snapshot {s}: qcowx export differs from qemu-img"
        );
    }
    // VDI heads too: a named one (QEMU sees it as snapshot vdi:dev) and the default.
    let theirs = qemu_raw(d, "t.qcow2", Some("vdi:dev"));
    assert!(
        qcowx_raw(d, "t.qcow2", &["--vdi", "dev"]) == theirs,
        "VDI dev"
    );
    let theirs = qemu_raw(d, "t.qcow2", None);
    assert!(
        qcowx_raw(d, "t.qcow2", &["--vdi", "default"]) == theirs,
        "--vdi default"
    );
    assert!(qcowx_raw(d, "t.qcow2", &[]) == theirs, "default export");

    // The content is what was written, checked byte by byte.
    let s1 = qcowx_raw(d, "t.qcow2", &["--snapshot", "s1"]);
    assert!(s1[..1 << 20].iter().all(|&b| b == 0x11));
    assert!(s1[3 << 20..(3 << 20) + 102_400].iter().all(|&b| b == 0x12));
    let s2 = qcowx_raw(d, "t.qcow2", &["--snapshot", "s2"]);
    assert!(s2[..CS as usize].iter().all(|&b| b == 0), "discarded");
    assert!(s2[512 << 10..3 << 19].iter().all(|&b| b == 0x21));
    assert!(s2[3 << 20..(3 << 20) + CS as usize].iter().all(|&b| b == 0));
    let d1 = qcowx_raw(d, "t.qcow2", &["--snapshot", "d1"]);
    assert!(d1[100..5100].iter().all(|&b| b == 0x41));
    assert!(d1[5100..1 << 20].iter().all(|&b| b == 0x11));
    assert!(d1[6 << 20..(6 << 20) + CS as usize]
        .iter()
        .all(|&b| b == 0x42));

    // qcowx io reads a snapshot with -P; qemu-io agrees on the VDI head.
    io(d, "t.qcow2", Some("s1"), &["read -P 0x11 0 1M"]);
    io(
        d,
        "t.qcow2",
        Some("dev"),
        &["read -P 0x43 6M 4k", "read -P 0x42 6295552 61440"],
    );
    let out = run(
        "qemu-io",
        &["-f", "qcow2", "-r", "-c", "read -P 0x31 7M 1M", "t.qcow2"],
        d,
    );
    assert_ok(&out, "qemu-io read of qcowx's writes");
    assert!(!stdout(&out).contains("Pattern verification failed"));

    // -O qcow2 of a snapshot: a clean image with the snapshot's content.
    ok(
        d,
        &[
            "export",
            "--snapshot",
            "s2",
            "-O",
            "qcow2",
            "t.qcow2",
            "s2.qcow2",
        ],
    );
    assert_qemu_check_clean(d, "s2.qcow2");
    assert!(qemu_raw(d, "s2.qcow2", None) == s2);
    assert_eq!(qemu_snapshot_names(d, "s2.qcow2"), Vec::<String>::new());
}

#[test]
fn snapshot_and_fork_say_what_they_created() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "a.qcow2", "1M");
    let out = ok_quiet(d, &["snapshot", "a.qcow2", "s1"]);
    assert_eq!(stdout(&out), "Created snapshot 's1' of VDI 'default'.\n");
    let out = ok_quiet(d, &["fork", "a.qcow2", "s1", "dev"]);
    assert_eq!(stdout(&out), "Created VDI 'dev' from snapshot 's1'.\n");
    let v = json(&ok_quiet(
        d,
        &["snapshot", "--output=json", "--vdi", "dev", "a.qcow2", "d1"],
    ));
    assert_eq!(keys(&v), set(&["filename", "root"]));
    assert_eq!(v["filename"], "a.qcow2");
    assert_eq!(v["root"]["name"], "d1");
    assert_eq!(v["root"]["kind"], "snapshot");
    assert_eq!(v["root"]["vdi"], "dev");
    // The root is the one list shows.
    assert_eq!(&v["root"], root(&list(d, "a.qcow2"), "d1"));
    let v = json(&ok_quiet(
        d,
        &["fork", "--output=json", "a.qcow2", "d1", "dev2"],
    ));
    assert_eq!(v["root"]["kind"], "vdi");
    assert_eq!(v["root"]["parent"], "d1");
    // -q keeps stdout empty.
    assert!(ok_quiet(d, &["-q", "snapshot", "a.qcow2", "s2"])
        .stdout
        .is_empty());
}

#[test]
fn list_reports_lineage_and_times_in_json_and_as_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    make_tree(d, "t.qcow2");
    let out = ok(d, &["list", "--output=json", "t.qcow2"]);
    let v = json(&out);
    assert_eq!(keys(&v), set(&["filename", "roots"]));
    assert_eq!(v["filename"], "t.qcow2");
    let roots = v["roots"].as_array().unwrap();
    let names: Vec<&str> = roots.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "s1", "s2", "dev", "d1"]);
    let root_keys = set(&[
        "name",
        "kind",
        "uid",
        "vdi",
        "parent",
        "date-sec",
        "date-nsec",
        "virtual-size",
        "id",
    ]);
    let mut uids = BTreeSet::new();
    for r in roots {
        assert_eq!(keys(r), root_keys, "{r:#}");
        assert_eq!(r["virtual-size"], 8 << 20);
        let uid = r["uid"].as_str().unwrap();
        u64::from_str_radix(uid, 16).unwrap_or_else(|e| panic!("uid {uid}: {e}"));
        assert!(uids.insert(uid.to_string()), "duplicate uid {uid}");
        assert!(r["date-nsec"].as_u64().unwrap() < 1_000_000_000);
    }
    let expect = [
        ("default", "vdi", "default", None),
        ("s1", "snapshot", "default", None),
        ("s2", "snapshot", "default", Some("s1")),
        ("dev", "vdi", "dev", Some("s1")),
        ("d1", "snapshot", "dev", Some("s1")),
    ];
    for (name, kind, vdi, parent) in expect {
        let r = root(roots, name);
        assert_eq!(r["kind"], kind, "{name}");
        assert_eq!(r["vdi"], vdi, "{name}");
        match parent {
            Some(p) => assert_eq!(r["parent"], p, "{name}"),
            None => assert!(r["parent"].is_null(), "{name}: {r:#}"),
        }
    }
    let default = root(roots, "default");
    assert!(default["id"].is_null());
    // ids and times agree with the snapshot table QEMU reads.
    let info = json(&qemu_img(d, &["info", "--output=json", "t.qcow2"]));
    for s in info["snapshots"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let ours = root(roots, name.strip_prefix("vdi:").unwrap_or(name));
        assert_eq!(ours["id"], s["id"], "{name}");
        assert_eq!(ours["date-sec"], s["date-sec"], "{name}");
        assert_eq!(ours["date-nsec"], s["date-nsec"], "{name}");
        let t = ours["date-sec"].as_u64().unwrap();
        assert!(t >= before && t <= before + 600, "{name}: {t}");
    }

    // The table: a title line and one line per root, in the same order.
    let out = ok(d, &["list", "t.qcow2"]);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    for col in ["KIND", "NAME", "VDI", "PARENT", "SIZE", "DATE", "ID"] {
        assert!(lines[0].contains(col), "{text}");
    }
    for (line, (name, kind, vdi, parent)) in lines[1..].iter().zip(expect) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[0], kind, "{line}");
        assert_eq!(cells[1], name, "{line}");
        assert_eq!(cells[2], vdi, "{line}");
        assert_eq!(cells[3], parent.unwrap_or("-"), "{line}");
        assert_eq!(&cells[4..6], ["8", "MiB"], "{line}");
    }
    // List does not change the file.
    let bytes = std::fs::read(d.join("t.qcow2")).unwrap();
    ok(d, &["list", "t.qcow2"]);
    assert!(std::fs::read(d.join("t.qcow2")).unwrap() == bytes);
}

#[test]
fn lineage_through_a_snapshot_qemu_made_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "q.qcow2", "4M");
    assert_ok(
        &qemu_img(d, &["snapshot", "-c", "qs", "q.qcow2"]),
        "qemu-img snapshot -c",
    );
    ok(d, &["snapshot", "q.qcow2", "mine"]);
    let first = list(d, "q.qcow2");
    let second = list(d, "q.qcow2");
    assert_eq!(root(&first, "qs")["uid"], root(&second, "qs")["uid"]);
    assert_eq!(root(&second, "mine")["parent"], "qs");
}

// ---- diff ---------------------------------------------------------------------------

/// The set of clusters covered by `diff --output=json`'s ranges, checking that they
/// are sorted, disjoint, cluster-aligned and add up to `bytes`.
fn diff_clusters(d: &Path, file: &str, from: &str, to: &str) -> BTreeSet<u64> {
    let v = json(&ok(d, &["diff", "--output=json", file, from, to]));
    assert_eq!(
        keys(&v),
        set(&["filename", "from", "to", "ranges", "bytes"]),
        "{v:#}"
    );
    assert_eq!(v["from"], from);
    assert_eq!(v["to"], to);
    let mut clusters = BTreeSet::new();
    let mut total = 0;
    let mut end = 0;
    for r in v["ranges"].as_array().unwrap() {
        assert_eq!(keys(r), set(&["offset", "length"]), "{r}");
        let (o, l) = (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap());
        assert!(l > 0 && o % CS == 0 && l % CS == 0, "{r}");
        assert!(o >= end, "ranges out of order: {v:#}");
        end = o + l;
        total += l;
        clusters.extend((o / CS)..(o + l) / CS);
    }
    assert_eq!(v["bytes"], total, "{v:#}");
    // The human form lists the same ranges, then the total.
    let text = stdout(&ok(d, &["diff", file, from, to]));
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.pop(), Some(format!("total: {total} bytes").as_str()));
    let human: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let from_json: Vec<String> = v["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} {}", r["offset"], r["length"]))
        .collect();
    assert_eq!(human, from_json);
    clusters
}

#[test]
fn diff_of_two_snapshots_is_exactly_the_clusters_written_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "d.qcow2", "16M");
    io(d, "d.qcow2", None, &["write -P 1 0 4M"]);
    ok(d, &["snapshot", "d.qcow2", "a"]);
    io(
        d,
        "d.qcow2",
        None,
        &[
            "write -P 2 100k 10",   // cluster 1
            "write -P 3 0xfffff 2", // clusters 15 and 16
            "write -P 4 8M 200k",   // clusters 128..=131
            "write -z 3M 64k",      // cluster 48 (data before)
            "write -P 1 2M 64k",    // cluster 32, same bytes as before
        ],
    );
    ok(d, &["snapshot", "d.qcow2", "b"]);
    let written: BTreeSet<u64> = [1, 15, 16, 32, 48, 128, 129, 130, 131].into();
    assert_eq!(diff_clusters(d, "d.qcow2", "a", "b"), written);
    assert_eq!(diff_clusters(d, "d.qcow2", "b", "a"), written);
    assert!(diff_clusters(d, "d.qcow2", "a", "a").is_empty());
    assert!(diff_clusters(d, "d.qcow2", "b", "default").is_empty());

    // QEMU agrees: every cluster not reported is identical in both snapshots, and every
    // reported one but cluster 32 (rewritten with the same bytes) differs.
    let a = qemu_raw(d, "d.qcow2", Some("a"));
    let b = qemu_raw(d, "d.qcow2", Some("b"));
    for c in 0..(16 << 20) / CS {
        let r = (c * CS) as usize..((c + 1) * CS) as usize;
        let same = a[r.clone()] == b[r];
        assert_eq!(
            same,
            !written.contains(&c) || c == 32,
            "cluster {c}: same={same}"
        );
    }

    // A VDI head against the snapshot it was forked from, and later writes.
    ok(d, &["fork", "d.qcow2", "a", "dev"]);
    assert!(diff_clusters(d, "d.qcow2", "a", "dev").is_empty());
    io(d, "d.qcow2", Some("dev"), &["write -P 9 5M 1"]);
    io(d, "d.qcow2", None, &["write -P 9 12M 64k"]);
    assert_eq!(diff_clusters(d, "d.qcow2", "a", "dev"), [80].into());
    assert_eq!(diff_clusters(d, "d.qcow2", "b", "default"), [192].into());
    let mut ab_dev = written.clone();
    ab_dev.insert(80);
    assert_eq!(diff_clusters(d, "d.qcow2", "b", "dev"), ab_dev);

    // diff is read-only: it works with -U on an image another process writes.
    let held = qcowx_core::Image::open_rw(d.join("d.qcow2")).unwrap();
    fails(
        d,
        &["diff", "d.qcow2", "a", "b"],
        &["d.qcow2", "locked", "-U"],
    );
    let v = json(&ok(
        d,
        &["diff", "-U", "--output=json", "d.qcow2", "a", "b"],
    ));
    assert_eq!(v["bytes"], written.len() as u64 * CS);
    drop(held);
}
