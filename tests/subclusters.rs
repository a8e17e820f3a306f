//! Subcluster allocation on extended-L2 images, judged by QEMU: the same small writes,
//! zero writes and discards into an overlay (64 KiB clusters, 2 KiB subclusters) over
//! a filled backing file, made once by `qcowx io` and once by `qemu-io`, give the same
//! `qemu-img map` (which subclusters are data, zero or the backing file's), the same
//! content, clean checks and no more space; under snapshots too, where a cluster shared
//! with a snapshot is copied with only the subclusters it holds.

use std::path::Path;

use qcowx_tests::cli::{assert_qemu_check_clean, ok, qemu_io, qemu_ok, qemu_raw};
use qcowx_tests::{qemu_map, MapExtent};

const CLUSTER: u64 = 64 << 10;

/// A 4 MiB backing file QEMU filled with a pattern, and two extended-L2 overlays of it.
fn overlays(dir: &Path) {
    qemu_ok(
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "base.qcow2",
            "4M",
        ],
    );
    qemu_io(dir, "qcow2", "base.qcow2", &["write -P 0x11 0 4M"]);
    for top in ["ours.qcow2", "qemu.qcow2"] {
        qemu_ok(
            dir,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=65536,extended_l2=on",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                top,
            ],
        );
    }
}

/// Runs `cmds` (qemu-io syntax) on `ours.qcow2` with `qcowx io` and on `qemu.qcow2`
/// with `qemu-io`.
fn both(dir: &Path, cmds: &[&str]) {
    let mut args = vec!["io"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push("ours.qcow2");
    ok(dir, &args);
    qemu_io(dir, "qcow2", "qemu.qcow2", cmds);
}

/// A map without host offsets (where the clusters went is each program's business;
/// what every guest range reads from is not).
fn shape(dir: &Path, file: &str) -> Vec<MapExtent> {
    qemu_map(&dir.join(file))
        .into_iter()
        .map(|mut e| {
            e.offset = None;
            e
        })
        .collect()
}

/// Host bytes the image's clusters take (the file's allocated size).
fn allocated(dir: &Path, file: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir.join(file)).expect("stat").blocks() * 512
}

fn assert_same(dir: &Path, what: &str) {
    assert_eq!(
        shape(dir, "ours.qcow2"),
        shape(dir, "qemu.qcow2"),
        "{what}: qemu-img map of qcowx's overlay and QEMU's"
    );
    assert_eq!(
        qemu_raw(dir, "ours.qcow2", None),
        qemu_raw(dir, "qemu.qcow2", None),
        "{what}: content"
    );
    assert_qemu_check_clean(dir, "ours.qcow2");
}

/// First writes smaller than a cluster allocate only the subclusters they touch (a
/// write covering part of a subcluster completes it from the backing file); zero writes
/// set zero bits on whole subclusters; partial-cluster discards leave the cluster alone.
#[test]
fn small_writes_zero_writes_and_discards_touch_only_their_subclusters() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    overlays(d);
    let cmds = [
        "write -P 0x22 4k 4k",
        "write -P 0x33 70000 1000",
        "write -P 0x44 200k 6k",
        "write -P 0x45 202k 1k",
        "write -z 8k 4k",
        "write -z 300k 5k",
        "write -z 600k 64k",
        "discard 4k 2k",
        "write -P 0x55 400k 2k",
        "discard 400k 2k",
        "write -z -u 204800 2048",
        "write -P 0x66 1M 128k",
        "write -P 0x67 1060k 2k",
    ];
    both(d, &cmds);
    assert_same(d, "after small writes");
    // Only subclusters were allocated: far less than one cluster per cluster touched.
    let touched_clusters = 6;
    let ours = allocated(d, "ours.qcow2");
    let qemu = allocated(d, "qemu.qcow2");
    assert!(
        ours <= qemu + qemu / 10,
        "qcowx's overlay takes {ours} bytes, QEMU's {qemu}"
    );
    let map = qemu_map(&d.join("ours.qcow2"));
    let own_data: u64 = map
        .iter()
        .filter(|e| e.depth == 0 && e.data)
        .map(|e| e.length)
        .sum();
    assert!(
        own_data < touched_clusters * CLUSTER / 2,
        "the overlay maps {own_data} bytes of its own: whole clusters were allocated"
    );
}

/// Under snapshots: a cluster the overlay holds only some subclusters of, shared with
/// a snapshot, is copied with exactly those subclusters when written again; every
/// snapshot keeps what it held, as the same steps with QEMU's internal snapshots show.
#[test]
fn snapshots_of_subclustered_clusters_keep_what_they_held() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    overlays(d);
    both(d, &["write -P 0x21 6k 2k", "write -P 0x22 130k 3k"]);
    ok(d, &["snapshot", "ours.qcow2", "s1"]);
    qemu_ok(d, &["snapshot", "-c", "s1", "qemu.qcow2"]);
    both(
        d,
        &[
            "write -P 0x31 10k 2k",
            "write -P 0x32 6k 1k",
            "write -z 128k 4k",
            "write -P 0x33 300k 2k",
        ],
    );
    ok(d, &["snapshot", "ours.qcow2", "s2"]);
    qemu_ok(d, &["snapshot", "-c", "s2", "qemu.qcow2"]);
    both(d, &["write -z 8k 4k", "write -P 0x41 131k 1k"]);
    assert_same(d, "after writes under snapshots");
    for s in ["s1", "s2"] {
        assert_eq!(
            qemu_raw(d, "ours.qcow2", Some(s)),
            qemu_raw(d, "qemu.qcow2", Some(s)),
            "snapshot {s}"
        );
    }
    // qcowx's own map and export agree with QEMU's reading of the same file.
    let export = d.join("export.raw");
    ok(
        d,
        &[
            "export",
            "-O",
            "raw",
            "ours.qcow2",
            export.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(&export).unwrap(),
        qemu_raw(d, "ours.qcow2", None),
        "qcowx export equals qemu-img convert"
    );
}

/// `qcowx create` makes extended-L2 images, by flag or with qemu-img's `-o` options,
/// and refuses an option it does not know, naming it.
#[test]
fn create_makes_extended_l2_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_ok(d, &["create", "-f", "qcow2", "base.qcow2", "4M"]);
    ok(
        d,
        &[
            "create",
            "--extended-l2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
        ],
    );
    ok(
        d,
        &[
            "create",
            "-o",
            "cluster_size=32k,extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2",
            "b.qcow2",
        ],
    );
    for (file, cluster) in [("a.qcow2", 65536), ("b.qcow2", 32768)] {
        let info = qcowx_tests::qemu_info(&d.join(file), false);
        assert_eq!(info["cluster-size"], cluster, "{file}: {info}");
        assert_eq!(info["virtual-size"], 4 << 20, "{file}: {info}");
        assert_eq!(
            info["format-specific"]["data"]["extended-l2"], true,
            "{file}: {info}"
        );
        assert_eq!(info["backing-filename"], "base.qcow2", "{file}: {info}");
    }
    qcowx_tests::cli::fails(d, &["create", "-o", "bogus=1", "c.qcow2", "1M"], &["bogus"]);
    assert!(!d.join("c.qcow2").exists());
}
