//! End-to-end tests of the `qcowx` snapshot, VDI, gc, diff, export and io commands,
//! with QEMU's `qemu-img` and `qemu-io` as the oracle.

mod common;
use common::{CS, QCOWX};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use qcowx_tests::cli::*;
use serde_json::Value;

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// `qcowx export [ROOT_ARGS] -O raw FILE`.
fn qcowx_raw(dir: &Path, file: &str, root_args: &[&str]) -> Vec<u8> {
    let mut args = vec!["export"];
    args.extend_from_slice(root_args);
    args.extend(["-O", "raw", file, "qcowx-export.raw"]);
    ok(dir, &args);
    let bytes = std::fs::read(dir.join("qcowx-export.raw")).unwrap();
    std::fs::remove_file(dir.join("qcowx-export.raw")).unwrap();
    bytes
}

/// `qcowx io [--vdi VDI] FILE -c CMD...`, expecting success.
fn io(dir: &Path, file: &str, vdi: Option<&str>, cmds: &[&str]) -> Output {
    let mut args = vec!["io"];
    if let Some(v) = vdi {
        args.extend(["--vdi", v]);
    }
    args.push(file);
    for c in cmds {
        args.extend(["-c", c]);
    }
    ok(dir, &args)
}

fn create(dir: &Path, file: &str, size: &str) {
    ok(dir, &["create", file, size]);
}

fn list(dir: &Path, file: &str) -> Vec<Value> {
    let v = json(&ok(dir, &["list", "--output=json", file]));
    v["roots"].as_array().unwrap().clone()
}

fn root<'a>(roots: &'a [Value], name: &str) -> &'a Value {
    roots
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no root {name} in {roots:#?}"))
}

fn is_root(dir: &Path) -> bool {
    let probe = dir.join(".uid-probe");
    std::fs::write(&probe, b"").unwrap();
    let uid = std::fs::metadata(&probe).unwrap().uid();
    std::fs::remove_file(&probe).unwrap();
    uid == 0
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

// ---- delete, revert, gc ---------------------------------------------------------------

fn gc_json(d: &Path, file: &str) -> Value {
    let v = json(&ok(d, &["gc", "--output=json", file]));
    assert_eq!(
        keys(&v),
        set(&[
            "filename",
            "roots-removed",
            "clusters-freed",
            "bytes-freed",
            "refcounts-exact",
            "file-size-before",
            "file-size-after",
            "allocated-before",
            "allocated-after"
        ]),
        "{v:#}"
    );
    assert_eq!(v["filename"], file);
    // Nothing writes the image while the command runs: the refcounts come out exact.
    assert_eq!(v["refcounts-exact"], true, "{v:#}");
    assert_eq!(
        v["bytes-freed"].as_u64().unwrap(),
        v["clusters-freed"].as_u64().unwrap() * CS,
        "{v:#}"
    );
    let m = std::fs::metadata(d.join(file)).unwrap();
    assert_eq!(v["file-size-after"].as_u64().unwrap(), m.len(), "{v:#}");
    // What the file occupies, as `du` counts it.
    assert_eq!(
        v["allocated-after"].as_u64().unwrap(),
        m.blocks() * 512,
        "{v:#}"
    );
    v
}

#[test]
fn gc_after_delete_frees_clusters_and_qemu_check_stays_clean() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "g.qcow2", "16M");
    io(d, "g.qcow2", None, &["write -P 1 0 2M"]);
    ok(d, &["snapshot", "g.qcow2", "old"]);
    // Overwriting copies: the first 2 MiB (32 clusters) now belong to "old" alone.
    io(d, "g.qcow2", None, &["write -P 2 0 2M"]);
    ok(d, &["snapshot", "g.qcow2", "keep"]);
    let keep = qemu_raw(d, "g.qcow2", Some("keep"));
    let head = qemu_raw(d, "g.qcow2", None);
    let blocks_before = std::fs::metadata(d.join("g.qcow2")).unwrap().blocks() * 512;

    ok(d, &["delete", "g.qcow2", "--snapshot", "old"]);
    assert!(list(d, "g.qcow2").iter().all(|r| r["name"] != "old"));
    // Deleting only flags the entry: QEMU still sees it until gc compacts the table.
    assert_eq!(qemu_snapshot_names(d, "g.qcow2"), ["old", "keep"]);
    assert_qemu_check_clean(d, "g.qcow2");

    let v = gc_json(d, "g.qcow2");
    assert_eq!(v["roots-removed"], 1, "{v:#}");
    let freed = v["clusters-freed"].as_u64().unwrap();
    assert!(freed >= 32, "{v:#}");
    assert_qemu_check_clean(d, "g.qcow2");
    assert_eq!(qemu_snapshot_names(d, "g.qcow2"), ["keep"]);
    // The space went back to the file system, and nothing live changed.
    let blocks_after = std::fs::metadata(d.join("g.qcow2")).unwrap().blocks() * 512;
    assert!(
        blocks_after + 2 * CS * 16 <= blocks_before,
        "{blocks_before} -> {blocks_after} bytes allocated"
    );
    assert!(qemu_raw(d, "g.qcow2", Some("keep")) == keep);
    assert!(qemu_raw(d, "g.qcow2", None) == head);

    // Nothing left to collect.
    let v = gc_json(d, "g.qcow2");
    assert_eq!(v["roots-removed"], 0);
    assert_eq!(v["clusters-freed"], 0);

    // The human report.
    ok(d, &["delete", "g.qcow2", "--snapshot", "keep"]);
    let text = stdout(&ok(d, &["gc", "g.qcow2"]));
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() == 4 || lines.len() == 5, "{text}");
    assert_eq!(lines[0], "roots removed: 1");
    assert!(lines[1].starts_with("clusters freed: "), "{text}");
    assert!(lines[1].ends_with(" bytes)"), "{text}");
    assert!(
        lines[2].starts_with("file size: ") && lines[2].contains(" -> "),
        "{text}"
    );
    assert!(lines[3].starts_with("allocated on disk: "), "{text}");
    assert_qemu_check_clean(d, "g.qcow2");
    assert!(qemu_raw(d, "g.qcow2", None) == head);
}

#[test]
fn delete_and_revert_vdis_then_gc() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "v.qcow2", "8M");
    io(d, "v.qcow2", None, &["write -P 1 0 1M"]);
    ok(d, &["snapshot", "v.qcow2", "base"]);
    ok(d, &["fork", "v.qcow2", "base", "dev"]);
    io(d, "v.qcow2", Some("dev"), &["write -P 2 0 1M"]);
    ok(d, &["snapshot", "--vdi", "dev", "v.qcow2", "dev1"]);
    io(d, "v.qcow2", Some("dev"), &["write -P 3 0 512k"]);
    io(d, "v.qcow2", None, &["write -P 4 1M 1M"]);

    // Revert the named VDI: it reads as its snapshot again.
    ok(d, &["revert", "v.qcow2", "--vdi", "dev", "dev1"]);
    io(d, "v.qcow2", Some("dev"), &["read -P 2 0 1M"]);
    let dev1 = qemu_raw(d, "v.qcow2", Some("dev1"));
    assert!(qcowx_raw(d, "v.qcow2", &["--vdi", "dev"]) == dev1);
    // Revert the default VDI to a snapshot of another lineage.
    ok(d, &["revert", "v.qcow2", "--vdi", "default", "base"]);
    io(d, "v.qcow2", None, &["read -P 1 0 1M", "read -P 0 1M 1M"]);
    assert!(qemu_raw(d, "v.qcow2", None) == qemu_raw(d, "v.qcow2", Some("base")));
    assert_qemu_check_clean(d, "v.qcow2");
    // The superseded head of dev and the default VDI's old head stay in the table
    // (flagged deleted) until gc, which frees what they alone held; then QEMU sees one
    // vdi:dev, with dev1's content.
    let names = qemu_snapshot_names(d, "v.qcow2");
    assert_eq!(names[..3], ["base", "vdi:dev", "dev1"]);
    assert_eq!(names.len(), 5);
    assert!(
        names[3..].iter().all(|n| n.starts_with("qcowx-reverted-")),
        "{names:?}"
    );
    let v = gc_json(d, "v.qcow2");
    assert_eq!(v["roots-removed"], 2, "{v:#}");
    assert!(v["clusters-freed"].as_u64().unwrap() >= 8, "{v:#}");
    assert_qemu_check_clean(d, "v.qcow2");
    assert_eq!(
        qemu_snapshot_names(d, "v.qcow2"),
        ["base", "vdi:dev", "dev1"]
    );
    assert!(qemu_raw(d, "v.qcow2", Some("vdi:dev")) == dev1);

    // Delete the VDI: its snapshot stays, and gc frees the head's own clusters.
    io(d, "v.qcow2", Some("dev"), &["write -P 5 4M 1M"]);
    ok(d, &["delete", "v.qcow2", "--vdi", "dev"]);
    let names: Vec<String> = list(d, "v.qcow2")
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["default", "base", "dev1"]);
    let v = gc_json(d, "v.qcow2");
    assert!(v["roots-removed"].as_u64().unwrap() >= 1, "{v:#}");
    assert!(v["clusters-freed"].as_u64().unwrap() >= 16, "{v:#}");
    assert_qemu_check_clean(d, "v.qcow2");
    assert_eq!(qemu_snapshot_names(d, "v.qcow2"), ["base", "dev1"]);
    io(d, "v.qcow2", Some("dev1"), &["read -P 2 0 1M"]);
    // The name is free again.
    ok(d, &["fork", "v.qcow2", "dev1", "dev"]);
    io(
        d,
        "v.qcow2",
        Some("dev"),
        &["read -P 2 0 1M", "read -P 0 4M 1M"],
    );
}

#[test]
fn revert_of_the_default_vdi_gives_its_space_back_at_gc() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "r.qcow2", "8M");
    io(d, "r.qcow2", None, &["write -P 1 0 1M"]);
    ok(d, &["snapshot", "r.qcow2", "base"]);
    io(d, "r.qcow2", None, &["write -P 4 1M 1M"]);
    let blocks_before = std::fs::metadata(d.join("r.qcow2")).unwrap().blocks() * 512;
    ok(d, &["revert", "r.qcow2", "--vdi", "default", "base"]);
    let v = gc_json(d, "r.qcow2");
    assert_qemu_check_clean(d, "r.qcow2");
    // The 16 clusters written after "base" are garbage: gc frees and punches them.
    assert!(v["clusters-freed"].as_u64().unwrap() >= 16, "{v:#}");
    let blocks_after = std::fs::metadata(d.join("r.qcow2")).unwrap().blocks() * 512;
    assert!(
        blocks_after + (1 << 20) <= blocks_before + 2 * CS,
        "{blocks_before} -> {blocks_after} bytes allocated"
    );
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

// ---- io -----------------------------------------------------------------------------

#[test]
fn io_writes_what_qemu_io_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cmds = [
        "write -P 0x5a 0 1M",
        "write 1536 3000",
        "write -P 7 0x100000 0x10000",
        "w -P 255 2.5M 4k",
        "write -z 64k 64k",
        "write -z -u 512k 128k",
        "write -z 600000 1000",
        "discard 768k 64k",
        "flush",
        "write -P 9 16773120 4k",
    ];
    ok(d, &["create", "ours.qcow2", "16M"]);
    assert_ok(
        &qemu_img(d, &["create", "-f", "qcow2", "theirs.qcow2", "16M"]),
        "qemu-img create",
    );
    let mut args = vec!["io", "ours.qcow2"];
    let mut qargs = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c]);
        qargs.extend(["-c", c]);
    }
    qargs.push("theirs.qcow2");
    let ours = ok(d, &args);
    let theirs = run("qemu-io", &qargs, d);
    assert_ok(&theirs, "qemu-io");
    // The same lines, but for the timing ones.
    let strip = |s: String| -> Vec<String> {
        s.lines()
            .filter(|l| !l.contains(" ops; "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(strip(stdout(&ours)), strip(stdout(&theirs)));
    assert_eq!(
        stdout(&ours)
            .lines()
            .filter(|l| l.contains(" ops; "))
            .count(),
        cmds.len() - 1,
        "one timing line per command but flush"
    );
    let cmp = qemu_img(d, &["compare", "ours.qcow2", "theirs.qcow2"]);
    assert_code(&cmp, 0, "qemu-img compare ours theirs");
    assert_qemu_check_clean(d, "ours.qcow2");
    // qemu-io reads qcowx's writes.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5a 0 1536",
            "-c",
            "read -P 0xcd 1536 3000",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "read -P 255 2560k 4k",
            "ours.qcow2",
        ],
        d,
    );
    assert_ok(&out, "qemu-io read");
    assert!(
        !stdout(&out).contains("verification failed"),
        "{}",
        stdout(&out)
    );
    // -q prints nothing.
    let out = io(
        d,
        "ours.qcow2",
        None,
        &["write -q -P 1 0 4k", "read -q -P 1 0 4k"],
    );
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
}

#[test]
fn io_read_pattern_mismatch_fails_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "p.qcow2", "4M");
    io(
        d,
        "p.qcow2",
        None,
        &["write -P 0x5a 0 64k", "write -P 0x5b 8k 1"],
    );
    let args = [
        "io",
        "p.qcow2",
        "-c",
        "read -P 0x5a 0 64k",
        "-c",
        "write -P 0x66 1M 4k",
    ];
    let out = qcowx(d, &args);
    assert_code(&out, 1, "read -P mismatch");
    let text = stdout(&out);
    assert!(
        text.starts_with(
            "Pattern verification failed at offset 0, 65536 bytes\nread 65536/65536 bytes at offset 0\n"
        ),
        "{text}"
    );
    assert!(stderr(&out).contains("offset 8192"), "{}", stderr(&out));
    // Like qemu-io, the next command still ran.
    assert!(
        text.contains("wrote 4096/4096 bytes at offset 1048576"),
        "{text}"
    );
    io(d, "p.qcow2", None, &["read -P 0x66 1M 4k"]);
    // qemu-io reports the same for the same content.
    let q = run(
        "qemu-io",
        &["-f", "qcow2", "-r", "-c", "read -P 0x5a 0 64k", "p.qcow2"],
        d,
    );
    assert_code(&q, 1, "qemu-io read -P mismatch");
    assert!(stdout(&q).starts_with("Pattern verification failed at offset 0, 65536 bytes"));
    // A matching read exits 0.
    io(
        d,
        "p.qcow2",
        None,
        &["read -P 0x5a 0 8k", "read -P 0x5b 8k 1"],
    );
}

#[test]
fn io_rejects_bad_commands_before_touching_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "b.qcow2", "4M");
    ok(d, &["snapshot", "b.qcow2", "s"]);
    let before = std::fs::read(d.join("b.qcow2")).unwrap();
    for (cmd, why) in [
        ("frob 0 1", "unknown command 'frob'"),
        ("write -x 0 1", "option -x is not supported"),
        ("write -P 300 0 1", "not a valid pattern byte"),
        ("write 0 1Q", "invalid number"),
        ("write -z -P 1 0 1", "-z and -P"),
        ("read 0", "expected OFFSET and LEN"),
        ("", "empty command"),
    ] {
        // A valid command first: nothing runs when any command is bad.
        let out = qcowx(d, &["io", "b.qcow2", "-c", "write 0 4k", "-c", cmd]);
        assert_code(&out, 2, &format!("io -c {cmd:?}"));
        assert!(stderr(&out).contains(why), "{cmd:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
    usage_error(d, &["io", "b.qcow2"]);
    usage_error(d, &["io", "-c", "flush"]);
    assert!(
        std::fs::read(d.join("b.qcow2")).unwrap() == before,
        "image changed"
    );

    // Past the end of the disk: exit 1, nothing written, later commands still run.
    let out = qcowx(
        d,
        &[
            "io",
            "b.qcow2",
            "-c",
            "write -P 1 4190208 8k",
            "-c",
            "write -P 2 0 4k",
        ],
    );
    assert_code(&out, 1, "write past the end");
    assert!(
        stderr(&out).contains("past the end of the disk"),
        "{}",
        stderr(&out)
    );
    io(
        d,
        "b.qcow2",
        None,
        &["read -P 0 4190208 4k", "read -P 2 0 4k"],
    );
    // A snapshot cannot be written, and the error says how to get a writable VDI.
    fails(
        d,
        &["io", "--vdi", "s", "b.qcow2", "-c", "write 0 1"],
        &["b.qcow2", "read-only", "qcowx fork b.qcow2 s NEW_VDI"],
    );
    fails(
        d,
        &["io", "--vdi", "nope", "b.qcow2", "-c", "read 0 1"],
        &["b.qcow2", "'nope' not found", "qcowx list b.qcow2"],
    );
    assert_qemu_check_clean(d, "b.qcow2");
}

// ---- errors -------------------------------------------------------------------------

#[test]
fn missing_files_wrong_names_and_duplicates_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["snapshot", "missing.qcow2", "s"][..],
        &["list", "missing.qcow2"][..],
        &["list", "--output=json", "missing.qcow2"][..],
        &["fork", "missing.qcow2", "s", "v"][..],
        &["delete", "missing.qcow2", "--snapshot", "s"][..],
        &["revert", "missing.qcow2", "--vdi", "default", "s"][..],
        &["gc", "missing.qcow2"][..],
        &["diff", "missing.qcow2", "a", "b"][..],
        &["export", "--snapshot", "s", "missing.qcow2", "out.raw"][..],
        &["io", "missing.qcow2", "-c", "read 0 1"][..],
    ] {
        let out = qcowx(d, args);
        assert_code(&out, 1, &format!("{args:?}"));
        assert!(
            stderr(&out).contains("missing.qcow2"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert!(!d.join("missing.qcow2").exists() && !d.join("out.raw").exists());

    create(d, "n.qcow2", "4M");
    io(d, "n.qcow2", None, &["write -P 1 0 64k"]);
    ok(d, &["snapshot", "n.qcow2", "s"]);
    ok(d, &["fork", "n.qcow2", "s", "v"]);
    let listed = list(d, "n.qcow2");
    let not_found = |args: &[&str], what: &str| {
        fails(
            d,
            args,
            &["n.qcow2", what, "not found", "qcowx list n.qcow2"],
        );
    };
    not_found(&["snapshot", "--vdi", "nope", "n.qcow2", "t"], "VDI 'nope'");
    not_found(&["snapshot", "--vdi", "s", "n.qcow2", "t"], "VDI 's'");
    not_found(&["fork", "n.qcow2", "nope", "w"], "snapshot 'nope'");
    not_found(&["fork", "n.qcow2", "v", "w"], "snapshot 'v'");
    not_found(
        &["delete", "n.qcow2", "--snapshot", "nope"],
        "snapshot 'nope'",
    );
    not_found(&["delete", "n.qcow2", "--snapshot", "v"], "snapshot 'v'");
    not_found(&["delete", "n.qcow2", "--vdi", "nope"], "VDI 'nope'");
    not_found(&["delete", "n.qcow2", "--vdi", "s"], "VDI 's'");
    not_found(&["revert", "n.qcow2", "--vdi", "nope", "s"], "VDI 'nope'");
    not_found(
        &["revert", "n.qcow2", "--vdi", "default", "nope"],
        "snapshot 'nope'",
    );
    not_found(&["diff", "n.qcow2", "s", "nope"], "'nope'");
    not_found(&["diff", "n.qcow2", "nope", "s"], "'nope'");
    not_found(
        &["export", "--snapshot", "nope", "n.qcow2", "o.raw"],
        "snapshot 'nope'",
    );
    not_found(
        &["export", "--snapshot", "v", "n.qcow2", "o.raw"],
        "snapshot 'v'",
    );
    not_found(&["export", "--vdi", "s", "n.qcow2", "o.raw"], "VDI 's'");
    assert!(!d.join("o.raw").exists());

    // Names are shared by snapshots and VDIs; "default" is taken.
    for args in [
        &["snapshot", "n.qcow2", "s"][..],
        &["snapshot", "n.qcow2", "v"][..],
        &["snapshot", "--vdi", "v", "n.qcow2", "default"][..],
        &["fork", "n.qcow2", "s", "v"][..],
        &["fork", "n.qcow2", "s", "s"][..],
        &["fork", "n.qcow2", "s", "default"][..],
    ] {
        fails(
            d,
            args,
            &["n.qcow2", "already exists", "qcowx list n.qcow2"],
        );
    }
    for args in [
        &["snapshot", "n.qcow2", "a b"][..],
        &["snapshot", "n.qcow2", "a/b"][..],
        &["fork", "n.qcow2", "s", "vdi:x"][..],
    ] {
        fails(d, args, &["invalid name"]);
    }
    fails(
        d,
        &["delete", "n.qcow2", "--vdi", "default"],
        &["default VDI cannot be deleted"],
    );
    // None of that changed anything.
    assert_eq!(list(d, "n.qcow2"), listed);
    assert_qemu_check_clean(d, "n.qcow2");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "u.qcow2", "4M");
    ok(d, &["snapshot", "u.qcow2", "s"]);
    let before = std::fs::read(d.join("u.qcow2")).unwrap();
    for args in [
        &["snapshot", "u.qcow2"][..],
        &["snapshot", "--vdi", "u.qcow2", "x"][..],
        &["snapshot", "u.qcow2", "a", "b"][..],
        &["list"][..],
        &["list", "--output=xml", "u.qcow2"][..],
        &["fork", "u.qcow2", "s"][..],
        &["delete", "u.qcow2"][..],
        &["delete", "u.qcow2", "--snapshot", "s", "--vdi", "v"][..],
        &["delete", "u.qcow2", "s"][..],
        &["revert", "u.qcow2", "s"][..],
        &["revert", "u.qcow2", "--vdi"][..],
        &["gc", "u.qcow2", "extra"][..],
        &["gc", "--output=yaml", "u.qcow2"][..],
        &["diff", "u.qcow2", "s"][..],
        &["diff", "--output", "u.qcow2", "s", "default"][..],
        &[
            "export",
            "--snapshot",
            "s",
            "--vdi",
            "default",
            "u.qcow2",
            "o.raw",
        ][..],
        &["export", "--snapshot", "u.qcow2", "o.raw"][..],
        &["export", "-O", "vdi", "--snapshot", "s", "u.qcow2", "o.raw"][..],
        &["gc", "-U", "u.qcow2"][..],
        &["snapshot", "-U", "u.qcow2", "x"][..],
    ] {
        usage_error(d, args);
    }
    assert!(
        std::fs::read(d.join("u.qcow2")).unwrap() == before,
        "image changed"
    );
    assert!(!d.join("o.raw").exists());
    // --help names every command.
    let help = stdout(&ok(d, &["--help"]));
    for cmd in [
        "snapshot", "list", "fork", "delete", "revert", "gc", "diff", "export", "io",
    ] {
        assert!(
            help.contains(&format!("\n  {cmd} ")),
            "{cmd} missing from\n{help}"
        );
    }
}

#[test]
fn a_locked_image_is_refused_and_force_share_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "busy.qcow2", "4M");
    io(d, "busy.qcow2", None, &["write -P 3 0 64k"]);
    ok(d, &["snapshot", "busy.qcow2", "s"]);
    let held = qcowx_core::Image::open_rw(d.join("busy.qcow2")).unwrap();
    held.write_at(&[4u8; 4096], 1 << 20).unwrap();
    held.flush().unwrap();
    for args in [
        &["snapshot", "busy.qcow2", "t"][..],
        &["fork", "busy.qcow2", "s", "v"][..],
        &["delete", "busy.qcow2", "--snapshot", "s"][..],
        &["revert", "busy.qcow2", "--vdi", "default", "s"][..],
        &["gc", "busy.qcow2"][..],
        &["io", "busy.qcow2", "-c", "read 0 1"][..],
    ] {
        let err = fails(d, args, &["busy.qcow2", "locked"]);
        assert!(!err.contains("-U"), "{args:?} cannot share: {err}");
    }
    for args in [
        &["list", "busy.qcow2"][..],
        &["diff", "busy.qcow2", "s", "default"][..],
        &["export", "--snapshot", "s", "busy.qcow2", "s.raw"][..],
    ] {
        fails(d, args, &["busy.qcow2", "locked", "-U (--force-share)"]);
    }
    // -U reads it.
    let roots = json(&ok(d, &["list", "-U", "--output=json", "busy.qcow2"]));
    assert_eq!(roots["roots"].as_array().unwrap().len(), 2);
    ok(d, &["list", "--force-share", "busy.qcow2"]);
    let v = json(&ok(
        d,
        &["diff", "-U", "--output=json", "busy.qcow2", "s", "default"],
    ));
    assert_eq!(v["ranges"][0]["offset"], 1 << 20, "{v:#}");
    ok(
        d,
        &["export", "-U", "--snapshot", "s", "busy.qcow2", "s.raw"],
    );
    let raw = std::fs::read(d.join("s.raw")).unwrap();
    assert!(raw[..CS as usize].iter().all(|&b| b == 3));
    assert!(raw[CS as usize..].iter().all(|&b| b == 0));
    // Once the holder closes, the writers run.
    held.close().unwrap();
    drop(held);
    ok(d, &["snapshot", "busy.qcow2", "t"]);
    assert_qemu_check_clean(d, "busy.qcow2");
}

/// How a test makes a folder read-only for `qcowx`.
enum ReadOnly {
    /// Not root: the image file's write permission is taken away.
    Chmod,
    /// Root (which chmod does not stop): a read-only bind mount of the folder in a
    /// private mount namespace made for each command.
    Mount,
}

const RO_MOUNT: &str =
    r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@""#;

/// The way to make `ro` read-only here, `None` when running as root without the right
/// to make mount namespaces.
fn read_only_method(d: &Path, ro: &Path) -> Option<ReadOnly> {
    if !is_root(d) {
        return Some(ReadOnly::Chmod);
    }
    // The probe must fail to create a file in the read-only folder.
    let probe = ro.join("probe");
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", RO_MOUNT, "sh"])
        .arg(ro)
        .args(["touch"])
        .arg(&probe)
        .output()
        .ok()?;
    let refused = !out.status.success() && stderr(&out).contains("Read-only file system");
    (refused && !probe.exists()).then_some(ReadOnly::Mount)
}

/// Runs `qcowx args` in `d` with folder `ro` read-only.
fn qcowx_read_only(how: &ReadOnly, d: &Path, ro: &Path, args: &[&str]) -> Output {
    match how {
        ReadOnly::Chmod => qcowx(d, args),
        ReadOnly::Mount => {
            let out = Command::new("unshare")
                .args(["-m", "sh", "-c", RO_MOUNT, "sh"])
                .arg(ro)
                .arg(QCOWX)
                .args(args)
                .current_dir(d)
                .output()
                .unwrap();
            assert!(!stderr(&out).contains("mount:"), "{}", stderr(&out));
            out
        }
    }
}

#[test]
fn a_read_only_image_is_readable_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("ro")).unwrap();
    create(d, "ro/r.qcow2", "4M");
    io(d, "ro/r.qcow2", None, &["write -P 6 0 64k"]);
    ok(d, &["snapshot", "ro/r.qcow2", "s"]);
    let ro = d.join("ro");
    let Some(how) = read_only_method(d, &ro) else {
        eprintln!(
            "NOTE: running as root without mount namespaces: the read-only file case is \
             not tested here (lock and --force-share behaviour is, elsewhere)"
        );
        return;
    };
    if let ReadOnly::Chmod = how {
        use std::os::unix::fs::PermissionsExt;
        let p = d.join("ro/r.qcow2");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    let before = std::fs::read(d.join("ro/r.qcow2")).unwrap();
    for args in [
        &["snapshot", "ro/r.qcow2", "t"][..],
        &["fork", "ro/r.qcow2", "s", "v"][..],
        &["delete", "ro/r.qcow2", "--snapshot", "s"][..],
        &["revert", "ro/r.qcow2", "--vdi", "default", "s"][..],
        &["gc", "ro/r.qcow2"][..],
        &["io", "ro/r.qcow2", "-c", "write 0 1"][..],
    ] {
        let out = qcowx_read_only(&how, d, &ro, args);
        assert_code(&out, 1, &format!("{args:?} on a read-only image"));
        let err = stderr(&out);
        assert!(
            err.starts_with("qcowx: ") && err.contains("ro/r.qcow2"),
            "{args:?}: {err}"
        );
        let why = match how {
            ReadOnly::Mount => "Read-only file system",
            ReadOnly::Chmod => "Permission denied",
        };
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(err.contains("needs write access"), "{args:?}: {err}");
    }
    assert!(
        std::fs::read(d.join("ro/r.qcow2")).unwrap() == before,
        "image changed"
    );
    // Readers work.
    let out = qcowx_read_only(&how, d, &ro, &["list", "--output=json", "ro/r.qcow2"]);
    assert_ok(&out, "list of a read-only image");
    assert_eq!(json(&out)["roots"][1]["name"], "s");
    let out = qcowx_read_only(&how, d, &ro, &["diff", "ro/r.qcow2", "s", "default"]);
    assert_ok(&out, "diff of a read-only image");
    assert_eq!(stdout(&out), "total: 0 bytes\n");
    let out = qcowx_read_only(
        &how,
        d,
        &ro,
        &["export", "--snapshot", "s", "ro/r.qcow2", "s.raw"],
    );
    assert_ok(&out, "export of a read-only image");
    assert!(std::fs::read(d.join("s.raw")).unwrap()[..CS as usize]
        .iter()
        .all(|&b| b == 6));
}

#[test]
fn a_closed_stdout_is_a_clean_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "p.qcow2", "4M");
    ok(d, &["snapshot", "p.qcow2", "s"]);
    for args in [
        &["list", "p.qcow2"][..],
        &["list", "--output=json", "p.qcow2"][..],
        &["diff", "p.qcow2", "s", "default"][..],
        &[
            "io",
            "p.qcow2",
            "-c",
            "write -P 8 0 4k",
            "-c",
            "read -P 8 0 4k",
        ][..],
    ] {
        ok_into_closed_stdout(d, args);
    }
    // The io commands ran although nobody read their output.
    io(d, "p.qcow2", None, &["read -P 8 0 4k"]);
}
