//! End-to-end tests of `qcowx delete`, `revert` and `gc`: what gc frees and gives back to
//! the file system, with `qemu-img check` clean and the live content unchanged.

mod common;
use common::{create, io, keys, list, qcowx_raw, CS};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use qcowx_tests::cli::*;
use serde_json::Value;

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
