//! Snapshots, VDIs and GC judged by QEMU's own tools.
//!
//! - After `gc` (image still open) and after a clean close, `qemu-img check` finds no
//!   error and no leak; `qemu-img snapshot -l` lists every root (snapshots by name, VDI
//!   heads as `vdi:NAME`) and nothing else; `qemu-img convert -l snapshot.name=S` of
//!   every snapshot and VDI head equals what qcowx reads from it, and the active layer
//!   equals the default VDI.
//! - QEMU writing the default VDI (`qemu-io`) and running `qemu-img snapshot -c/-a/-d`
//!   on a qcowx image, then qcowx opening it writable (reconciliation): no VDI or
//!   snapshot data is lost, `check` finds no corruption (invariant W holds), and later
//!   qcowx writes to every VDI change no other root.
//! - An image QEMU made with internal snapshots: qcowx lists them as snapshots of the
//!   default VDI, reads them exactly as `qemu-img convert -l snapshot.name=S` does, and
//!   forks from them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use qcowx_core::{CreateOptions, Image, RootKind};
use qcowx_tests::{
    assert_qemu_check_clean, convert_snapshot_to_raw, convert_to_raw, describe, open_ro, open_rw,
    pattern, qemu_img, qemu_img_create, qemu_img_ok, qemu_info, qemu_io_ok, run, run_ok, tempdir,
    ExpectedDisk, Rng,
};

/// The expected roots of an image: name → (kind, content).
type Roots = BTreeMap<String, (RootKind, ExpectedDisk)>;

/// The whole content of root `name` as qcowx reads it.
fn read_root(img: &Arc<Image>, name: &str) -> Vec<u8> {
    let d = img
        .open_root(name)
        .unwrap_or_else(|e| panic!("open_root({name}): {e}"));
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0)
        .unwrap_or_else(|e| panic!("read {name}: {e}"));
    buf
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Asserts that qcowx lists exactly `roots` and reads each as expected.
fn assert_roots(img: &Arc<Image>, roots: &Roots, what: &str) {
    let mut listed: Vec<(String, RootKind)> = img
        .list()
        .unwrap()
        .into_iter()
        .map(|r| (r.name, r.kind))
        .collect();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    let want: Vec<(String, RootKind)> = roots.iter().map(|(n, (k, _))| (n.clone(), *k)).collect();
    assert_eq!(listed, want, "{what}: qcowx list()");
    for (name, (_, content)) in roots {
        let got = read_root(img, name);
        if let Some(at) = first_diff(&got, content.as_bytes()) {
            panic!("{what}: qcowx reads root {name} wrong from byte {at}");
        }
    }
}

/// `qemu-img info` snapshot names (with `-U` while qcowx holds the image).
fn qemu_snapshot_names(path: &Path, force_share: bool) -> Vec<String> {
    let info = qemu_info(path, force_share);
    let mut names: Vec<String> = info
        .get("snapshots")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .map(|s| s["name"].as_str().expect("snapshot name"))
                // A reverted head's old entry gets a generated name.
                .map(|n| {
                    if n.starts_with("qcowx-reverted-") {
                        "qcowx-reverted-*".to_string()
                    } else {
                        n.to_string()
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The snapshot-table name QEMU shows for a root.
fn qemu_name(name: &str, kind: RootKind) -> String {
    match kind {
        RootKind::Snapshot => name.to_string(),
        RootKind::Vdi => format!("vdi:{name}"),
    }
}

/// Asserts that QEMU sees exactly the expected roots with the expected content:
/// `qemu-img snapshot -l` and `info` list every non-default root (and nothing else),
/// `convert -l snapshot.name=S` of each equals the model, the active layer equals the
/// default VDI. `force_share` (-U) when qcowx holds the image open. `stale` names
/// entries of deleted roots and superseded VDI heads that gc has not removed yet:
/// QEMU lists them too, and resolves a name to its first entry, so roots sharing a
/// name with one are not converted.
fn assert_qemu_sees(
    path: &Path,
    roots: &Roots,
    stale: &[&str],
    scratch: &Path,
    force_share: bool,
    what: &str,
) {
    let mut want: Vec<String> = roots
        .iter()
        .filter(|(n, _)| n.as_str() != "default")
        .map(|(n, (k, _))| qemu_name(n, *k))
        .chain(stale.iter().map(|s| s.to_string()))
        .collect();
    want.sort();
    assert_eq!(
        qemu_snapshot_names(path, force_share),
        want,
        "{what}: qemu-img info snapshot names"
    );
    let mut cmd = qemu_img();
    cmd.args(["snapshot", "-l"]);
    if force_share {
        cmd.arg("-U");
    }
    let out = run_ok(cmd.arg(path));
    let listing = String::from_utf8_lossy(&out.stdout);
    for name in &want {
        assert!(
            name.ends_with('*') || listing.split_whitespace().any(|w| w == name),
            "{what}: qemu-img snapshot -l does not list {name}: {listing}"
        );
    }
    for (name, (kind, content)) in roots {
        if stale.contains(&qemu_name(name, *kind).as_str()) {
            continue;
        }
        let raw = scratch.join("root.raw");
        let _ = std::fs::remove_file(&raw);
        let mut cmd = qemu_img();
        cmd.arg("convert");
        if force_share {
            cmd.arg("-U");
        }
        if name != "default" {
            cmd.args(["-l", &format!("snapshot.name={}", qemu_name(name, *kind))]);
        }
        run_ok(cmd.args(["-O", "raw"]).arg(path).arg(&raw));
        let got = std::fs::read(&raw).unwrap();
        if let Some(at) = first_diff(&got, content.as_bytes()) {
            panic!(
                "{what}: qemu-img convert of root {name} differs from qcowx's content at byte {at}"
            );
        }
    }
}

/// `qemu-img check` (with `-U` when qcowx holds the image) finds nothing.
fn assert_qemu_check(path: &Path, force_share: bool, what: &str) {
    if !force_share {
        assert_qemu_check_clean(path);
        return;
    }
    let out = run(qemu_img()
        .args(["check", "-U", "-f", "qcow2", "--output=json"])
        .arg(path));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let count = |k: &str| json.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    assert!(
        out.status.success() && count("leaks") == 0 && count("corruptions") == 0,
        "{what}: qemu-img check -U: {}",
        describe(&out)
    );
}

/// Random writes, zero writes and discards through qcowx on VDI `vdi`.
fn scribble(img: &Arc<Image>, roots: &mut Roots, vdi: &str, rng: &mut Rng, n: usize) {
    let d = img.open_root(vdi).unwrap();
    let model = &mut roots.get_mut(vdi).unwrap().1;
    let size = model.size();
    let cs = model.cluster_size();
    for _ in 0..n {
        let len = rng.range(1, 3 * cs);
        let off = rng.below(size - len + 1);
        match rng.below(8) {
            0 => {
                d.write_zeroes(off, len, rng.chance(1, 2)).unwrap();
                model.zero(off, len);
            }
            1 => {
                d.discard(off, len).unwrap();
                model.discard(off, len);
            }
            _ => {
                let data = pattern(rng.next_u64(), len as usize);
                d.write_at(&data, off).unwrap();
                model.write(off, &data);
            }
        }
    }
}

fn snapshot(img: &Arc<Image>, roots: &mut Roots, vdi: &str, name: &str) {
    img.snapshot(vdi, name).unwrap();
    let content = roots[vdi].1.clone();
    roots.insert(name.to_string(), (RootKind::Snapshot, content));
}

fn fork(img: &Arc<Image>, roots: &mut Roots, snap: &str, name: &str) {
    img.fork(snap, name).unwrap();
    let content = roots[snap].1.clone();
    roots.insert(name.to_string(), (RootKind::Vdi, content));
}

/// Builds an image with several VDIs, snapshots of each, deleted roots and a revert.
fn build(path: &Path, cs: u64, size: u64, seed: u64) -> (Arc<Image>, Roots) {
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = cs;
    let img = Arc::new(Image::create(path, &opts).unwrap());
    let mut roots = Roots::new();
    roots.insert(
        "default".into(),
        (RootKind::Vdi, ExpectedDisk::zeroed(size, cs)),
    );
    let mut rng = Rng::new(seed);
    scribble(&img, &mut roots, "default", &mut rng, 12);
    snapshot(&img, &mut roots, "default", "base");
    scribble(&img, &mut roots, "default", &mut rng, 8);
    fork(&img, &mut roots, "base", "web");
    fork(&img, &mut roots, "base", "db");
    scribble(&img, &mut roots, "web", &mut rng, 8);
    scribble(&img, &mut roots, "db", &mut rng, 8);
    snapshot(&img, &mut roots, "web", "web-1");
    snapshot(&img, &mut roots, "db", "db-1");
    scribble(&img, &mut roots, "web", &mut rng, 6);
    snapshot(&img, &mut roots, "default", "day-2");
    scribble(&img, &mut roots, "default", &mut rng, 6);
    snapshot(&img, &mut roots, "web", "web-2");
    scribble(&img, &mut roots, "web", &mut rng, 6);
    // Deleted roots whose space gc returns.
    fork(&img, &mut roots, "web-1", "tmp");
    scribble(&img, &mut roots, "tmp", &mut rng, 6);
    img.delete_vdi("tmp").unwrap();
    roots.remove("tmp");
    img.delete_snapshot("web-2").unwrap();
    roots.remove("web-2");
    // A revert: the old head's own data becomes garbage.
    img.revert("db", "db-1").unwrap();
    roots.get_mut("db").unwrap().1 = roots["db-1"].1.clone();
    scribble(&img, &mut roots, "db", &mut rng, 4);
    (img, roots)
}

fn judge_gc_and_close(cs: u64, seed: u64) {
    let dir = tempdir();
    let path = dir.path().join("vdis.qcow2");
    let what = format!("cs={cs} seed={seed}");
    let (img, mut roots) = build(&path, cs, 4 << 20, seed);
    assert_roots(&img, &roots, &format!("{what}: before gc"));

    let report = img.gc().unwrap();
    assert_eq!(report.roots_removed, 3, "{what}: {report:?}");
    assert!(report.clusters_freed > 0, "{what}: {report:?}");
    assert_roots(&img, &roots, &format!("{what}: after gc"));
    let check = img.check().unwrap();
    assert!(
        !check.dirty && check.corruptions == 0 && check.leaks == 0,
        "{what}: qcowx check after gc: {check:?}"
    );
    // QEMU judges the image as gc left it, while qcowx still holds it.
    assert_qemu_check(&path, true, &format!("{what}: after gc"));
    assert_qemu_sees(
        &path,
        &roots,
        &[],
        dir.path(),
        true,
        &format!("{what}: after gc"),
    );

    // More work, a clean close, and QEMU judges again.
    let mut rng = Rng::new(seed + 100);
    scribble(&img, &mut roots, "web", &mut rng, 5);
    snapshot(&img, &mut roots, "web", "web-3");
    scribble(&img, &mut roots, "default", &mut rng, 5);
    img.close().unwrap();
    drop(img);
    assert_qemu_check(&path, false, &format!("{what}: after close"));
    assert_qemu_sees(
        &path,
        &roots,
        &[],
        dir.path(),
        false,
        &format!("{what}: after close"),
    );
    let img = Arc::new(open_ro(&path));
    assert_roots(&img, &roots, &format!("{what}: reopened"));
}

#[test]
fn gc_and_clean_close_leave_an_image_qemu_accepts_64k() {
    judge_gc_and_close(65536, 1);
}

#[test]
fn gc_and_clean_close_leave_an_image_qemu_accepts_4k() {
    judge_gc_and_close(4096, 2);
}

/// `qemu-io -c 'write -P PAT OFF LEN'` on the default VDI, recorded in the model.
fn qemu_write(path: &Path, roots: &mut Roots, writes: &[(u8, u64, u64)]) {
    let cmds: Vec<String> = writes
        .iter()
        .map(|(p, o, l)| format!("write -P {p} {o} {l}"))
        .collect();
    qemu_io_ok("qcow2", path, &cmds);
    let model = &mut roots.get_mut("default").unwrap().1;
    for &(p, o, l) in writes {
        model.write(o, &vec![p; l as usize]);
    }
}

fn judge_qemu_writes(cs: u64, seed: u64) {
    let dir = tempdir();
    let path = dir.path().join("mixed.qcow2");
    let what = format!("cs={cs} seed={seed}");
    let (img, mut roots) = build(&path, cs, 4 << 20, seed);
    img.close().unwrap();
    drop(img);
    let p = path.to_str().unwrap();

    // QEMU writes the default VDI over clusters it shares with snapshots and VDIs.
    qemu_write(
        &path,
        &mut roots,
        &[
            (0x41, 0, 4096),
            (0x42, 70000, 150000),
            (0x43, 3 << 20, 65536),
        ],
    );
    // QEMU takes a snapshot, writes more, and the snapshot keeps the old data.
    qemu_img_ok(&["snapshot", "-c", "qemu-1", p]);
    let c = roots["default"].1.clone();
    roots.insert("qemu-1".into(), (RootKind::Snapshot, c));
    qemu_write(
        &path,
        &mut roots,
        &[(0x44, 0, 200000), (0x45, 1 << 20, 8192)],
    );
    // QEMU deletes a qcowx snapshot...
    qemu_img_ok(&["snapshot", "-d", "day-2", p]);
    roots.remove("day-2");
    // ... applies another one to the active layer ...
    qemu_img_ok(&["snapshot", "-a", "web-1", p]);
    roots.get_mut("default").unwrap().1 = roots["web-1"].1.clone();
    qemu_write(&path, &mut roots, &[(0x46, 12345, 5000)]);
    // ... and applies a VDI head: the default VDI now shares clusters with VDI "web".
    // ("db" was reverted: until gc its old head stays in the table as a deleted root
    // named "qcowx-reverted-…"; "vdi:db" names the new head only.)
    qemu_img_ok(&["snapshot", "-a", "vdi:web", p]);
    roots.get_mut("default").unwrap().1 = roots["web"].1.clone();
    qemu_write(&path, &mut roots, &[(0x47, 2 << 20, 3000)]);
    assert_qemu_check_clean(&path);
    // QEMU itself agrees with the model.
    // Not yet collected: VDI "tmp" and snapshot "web-2" (deleted), the head "db" had
    // before its revert.
    let stale = ["vdi:tmp", "web-2", "qcowx-reverted-*"];
    assert_qemu_sees(
        &path,
        &roots,
        &stale,
        dir.path(),
        false,
        &format!("{what}: QEMU's view"),
    );

    // qcowx opens it writable: reconciliation restores invariant W.
    let img = Arc::new(open_rw(&path));
    assert_roots(&img, &roots, &format!("{what}: after QEMU"));
    let check = img.check().unwrap();
    assert_eq!(check.corruptions, 0, "{what}: {:?}", check.messages);
    let qemu_1 = img.list().unwrap().into_iter().find(|r| r.name == "qemu-1");
    assert_eq!(
        qemu_1.map(|r| (r.kind, r.vdi)),
        Some((RootKind::Snapshot, "default".to_string())),
        "{what}: QEMU's snapshot belongs to the default VDI"
    );

    // Writes to every VDI, over the whole disk, change no other root.
    let mut rng = Rng::new(seed + 7);
    let vdis: Vec<String> = roots
        .iter()
        .filter(|(_, (k, _))| *k == RootKind::Vdi)
        .map(|(n, _)| n.clone())
        .collect();
    for v in &vdis {
        let d = img.open_root(v).unwrap();
        let size = roots[v].1.size();
        let mut off = rng.below(cs);
        while off < size {
            let len = rng.range(1, 2 * cs).min(size - off);
            let data = pattern(rng.next_u64(), len as usize);
            d.write_at(&data, off).unwrap();
            roots.get_mut(v).unwrap().1.write(off, &data);
            off += len + rng.below(2 * cs);
        }
        assert_roots(&img, &roots, &format!("{what}: after writing {v}"));
    }
    fork(&img, &mut roots, "qemu-1", "from-qemu");
    scribble(&img, &mut roots, "from-qemu", &mut rng, 6);
    assert_roots(&img, &roots, &format!("{what}: after forking qemu-1"));
    let report = img.gc().unwrap();
    let check = img.check().unwrap();
    assert!(
        check.corruptions == 0 && check.leaks == 0,
        "{what}: after gc {report:?}: {check:?}"
    );
    img.close().unwrap();
    drop(img);
    assert_qemu_check(&path, false, &format!("{what}: after qcowx"));
    assert_qemu_sees(
        &path,
        &roots,
        &[],
        dir.path(),
        false,
        &format!("{what}: after qcowx"),
    );
}

#[test]
fn qemu_writes_and_snapshot_commands_lose_no_vdi_data_64k() {
    judge_qemu_writes(65536, 3);
}

#[test]
fn qemu_writes_and_snapshot_commands_lose_no_vdi_data_4k() {
    judge_qemu_writes(4096, 4);
}

#[test]
fn qemu_internal_snapshots_read_and_fork_in_qcowx() {
    let dir = tempdir();
    let path = dir.path().join("qemu.qcow2");
    let p = path.to_str().unwrap();
    let size = 4u64 << 20;
    qemu_img_create(&path, size, "cluster_size=65536");
    qemu_io_ok(
        "qcow2",
        &path,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 2M 300k",
            "write -z 100k 64k",
        ],
    );
    qemu_img_ok(&["snapshot", "-c", "a", p]);
    qemu_io_ok(
        "qcow2",
        &path,
        &["write -P 0x21 512k 1M", "discard 2M 128k"],
    );
    qemu_img_ok(&["snapshot", "-c", "b", p]);
    qemu_io_ok("qcow2", &path, &["write -P 0x31 0 64k"]);
    let raw = |name: &str| {
        let out = dir.path().join(format!("{name}.raw"));
        let _ = std::fs::remove_file(&out);
        if name == "default" {
            convert_to_raw(&path, &out);
        } else {
            convert_snapshot_to_raw(&path, name, &out);
        }
        std::fs::read(&out).unwrap()
    };
    let mut roots = Roots::new();
    for name in ["default", "a", "b"] {
        let kind = if name == "default" {
            RootKind::Vdi
        } else {
            RootKind::Snapshot
        };
        roots.insert(
            name.into(),
            (kind, ExpectedDisk::from_bytes(raw(name), 65536)),
        );
    }

    // Read-only: no reconciliation, same view.
    let img = Arc::new(open_ro(&path));
    assert_roots(&img, &roots, "read-only");
    for r in img.list().unwrap() {
        assert_eq!(r.vdi, "default", "{} belongs to the default VDI", r.name);
    }
    drop(img);

    let img = Arc::new(open_rw(&path));
    assert_roots(&img, &roots, "writable");
    let check = img.check().unwrap();
    assert_eq!(check.corruptions, 0, "{:?}", check.messages);
    fork(&img, &mut roots, "a", "fa");
    fork(&img, &mut roots, "b", "fb");
    let mut rng = Rng::new(9);
    scribble(&img, &mut roots, "fa", &mut rng, 10);
    scribble(&img, &mut roots, "fb", &mut rng, 10);
    scribble(&img, &mut roots, "default", &mut rng, 10);
    snapshot(&img, &mut roots, "fa", "fa-1");
    scribble(&img, &mut roots, "fa", &mut rng, 4);
    assert_roots(&img, &roots, "after forks");
    img.close().unwrap();
    drop(img);
    assert_qemu_check_clean(&path);
    assert_qemu_sees(&path, &roots, &[], dir.path(), false, "after qcowx");
}

/// A revert puts the VDI's new head in its old head's place in the snapshot table
/// (the old head moves to the end as a deleted root), so QEMU, which resolves a name
/// to the first matching entry, reads `vdi:NAME` as the reverted content even before
/// gc.
#[test]
fn qemu_reads_a_reverted_vdi_head_before_gc() {
    let dir = tempdir();
    let path = dir.path().join("reverted.qcow2");
    let img = Arc::new(Image::create(&path, &CreateOptions::new(1 << 20)).unwrap());
    let mut roots = Roots::new();
    roots.insert(
        "default".into(),
        (RootKind::Vdi, ExpectedDisk::zeroed(1 << 20, 65536)),
    );
    snapshot(&img, &mut roots, "default", "empty");
    fork(&img, &mut roots, "empty", "v");
    let d = img.open_root("v").unwrap();
    d.write_at(&[7u8; 4096], 0).unwrap();
    roots.get_mut("v").unwrap().1.write(0, &[7u8; 4096]);
    img.revert("v", "empty").unwrap();
    roots.get_mut("v").unwrap().1 = roots["empty"].1.clone();
    assert_roots(&img, &roots, "qcowx");
    img.close().unwrap();
    drop(img);
    let raw = dir.path().join("v.raw");
    convert_snapshot_to_raw(&path, "vdi:v", &raw);
    let got = std::fs::read(&raw).unwrap();
    assert!(
        first_diff(&got, roots["v"].1.as_bytes()).is_none(),
        "qemu-img convert -l snapshot.name=vdi:v shows the head from before the revert"
    );
}
