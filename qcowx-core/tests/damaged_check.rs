//! Damage `check` must see, and unusual-but-valid images it must accept, each built
//! with QEMU's tools and a few pokes and judged against `qemu-img check`.

use std::fs;
use std::path::Path;

use qcowx_core::{Image, OpenOptions};
use qcowx_tests::{
    be64, patch, qemu_check, qemu_img_create, qemu_img_ok, qemu_io_ok, read_at, require_qemu_tools,
};

fn poke(path: &Path, at: u64, bytes: &[u8]) {
    patch(path, at, bytes);
}

fn qcowx_check(path: &Path) -> qcowx_core::CheckReport {
    Image::open(path).unwrap().check().unwrap()
}

fn mentions(r: &qcowx_core::CheckReport, needle: &str) -> bool {
    r.messages.iter().any(|m| m.contains(needle))
}

/// A compressed cluster whose sector count runs a cluster or more past the end of
/// the file: QEMU counts it as a corruption, and so does qcowx.
#[test]
fn a_compressed_cluster_running_past_the_end_of_the_file_is_damage() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.qcow2");
    qemu_img_create(&p, 64 << 20, "cluster_size=4096");
    qemu_io_ok("qcow2", &p, &["write -c -P 0x5a 0 4k"]);
    let l2 = be64(&p, be64(&p, 40)) & 0x00ff_ffff_ffff_fe00;
    let entry = be64(&p, l2);
    // cluster_bits 12: the sector count is 9 bits (bits 53..61); make it the largest.
    let x = 62 - (12 - 8);
    let with_len = entry | (((1u64 << (12 - 8)) - 1) << x);
    let file_len = fs::metadata(&p).unwrap().len();
    let host = with_len & ((1u64 << x) - 1);
    assert!(
        host + 512 * 16 > file_len + 4096,
        "the poke makes it run past"
    );
    poke(&p, l2, &with_len.to_be_bytes());
    let q = qemu_check(&p);
    assert_eq!(q.code, 2, "QEMU: {:#}", q.json);
    let r = qcowx_check(&p);
    assert_eq!(r.exit_code(), 2, "{:?}", r.messages);
    assert!(
        mentions(&r, "runs past the end of the file"),
        "{:?}",
        r.messages
    );
}

/// A compressed cluster with subcluster bits on an extended-L2 image: damage in
/// QEMU's check, and in qcowx's, named with the entry's offset and the bitmap in hex.
#[test]
fn a_compressed_cluster_with_a_subcluster_bitmap_is_damage() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.qcow2");
    qemu_img_create(&p, 64 << 20, "extended_l2=on");
    qemu_io_ok("qcow2", &p, &["write -c -P 0x5a 0 64k"]);
    let l2 = be64(&p, be64(&p, 40)) & 0x00ff_ffff_ffff_fe00;
    poke(&p, l2 + 8, &0x0000_0001_0000_0001u64.to_be_bytes());
    let q = qemu_check(&p);
    assert_eq!(q.code, 2, "QEMU: {:#}", q.json);
    let r = qcowx_check(&p);
    assert_eq!(r.exit_code(), 2, "{:?}", r.messages);
    assert!(
        mentions(&r, &format!("L2 entry at offset {l2:#x}"))
            && mentions(&r, "non-zero subcluster bitmap 0x0000000100000001"),
        "{:?}",
        r.messages
    );
}

/// Version 2 allows snapshot-table entries that are all zero (no L1 table, no extra
/// data): QEMU lists and reads them, and qcowx opens the image and reads them too.
#[test]
fn a_version_2_image_with_all_zero_snapshot_entries_opens() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("z.qcow2");
    qemu_img_create(&p, 64 << 20, "compat=0.10");
    poke(&p, 60, &3u32.to_be_bytes());
    poke(&p, 64, &(1u64 << 20).to_be_bytes());
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len((1 << 20) + 3 * 40)
        .unwrap();
    qemu_img_ok(&["snapshot", "-l", p.to_str().unwrap()]);
    let img = Image::open(&p).unwrap();
    assert_eq!(img.info().unwrap().snapshots.len(), 3);
    let mut b = vec![1u8; 65536];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // QEMU reports the unaccounted table clusters (refcount 0): one error, as qcowx.
    let r = img.check().unwrap();
    assert_eq!(r.exit_code(), qemu_check(&p).code, "{:?}", r.messages);
    assert_eq!(r.corruptions, 1, "{:?}", r.messages);
}

/// A version 3 entry with less than 16 bytes of extra data (a v2 image whose header
/// was made v3 without rewriting its table): check reports it, repair completes it
/// (VM state size and disk size, as QEMU's repair does) and QEMU then finds the image
/// clean, with the snapshot still reading as before.
#[test]
fn an_incomplete_version_3_snapshot_entry_is_reported_and_repaired() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v.qcow2");
    qemu_img_create(&p, 64 << 20, "compat=0.10");
    qemu_io_ok("qcow2", &p, &["write -P 0x17 0 64k"]);
    let ps = p.to_str().unwrap();
    qemu_img_ok(&["snapshot", "-c", "sn0", ps]);
    qemu_io_ok("qcow2", &p, &["write -P 0x18 0 64k"]);
    // Rewrite the one entry with no extra data (v2 allows it), then make it v3.
    let table = be64(&p, 64);
    let mut e = read_at(&p, table, 40);
    let extra = u32::from_be_bytes(e[36..40].try_into().unwrap()) as u64;
    let id_len = u16::from_be_bytes(e[12..14].try_into().unwrap()) as usize;
    let name_len = u16::from_be_bytes(e[14..16].try_into().unwrap()) as usize;
    let strings = read_at(&p, table + 40 + extra, id_len + name_len);
    e[36..40].copy_from_slice(&0u32.to_be_bytes());
    let mut entry = e;
    entry.extend_from_slice(&strings);
    entry.resize(entry.len().next_multiple_of(8), 0);
    poke(&p, table, &entry);
    poke(&p, 4, &3u32.to_be_bytes());
    poke(&p, 96, &4u32.to_be_bytes());
    poke(&p, 100, &104u32.to_be_bytes());

    let r = qcowx_check(&p);
    assert_eq!(r.exit_code(), 2, "{:?}", r.messages);
    assert!(
        mentions(&r, "snapshot table entry 0 ('sn0') at offset 0x")
            && mentions(&r, "is incomplete"),
        "{:?}",
        r.messages
    );
    let img = OpenOptions::new().repair(true).open(&p).unwrap();
    let fixed = img.repair().unwrap();
    assert_eq!(fixed.corruptions, 0, "{:?}", fixed.messages);
    img.close().unwrap();
    assert_eq!(qemu_check(&p).code, 0, "{:#}", qemu_check(&p).json);
    let img = std::sync::Arc::new(Image::open(&p).unwrap());
    let snap = &img.info().unwrap().snapshots[0];
    assert_eq!(snap.disk_size, Some(64 << 20));
    let mut b = [0u8; 4];
    img.open_root("sn0").unwrap().read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x17; 4]);
}

/// An unaligned snapshot-table offset: QEMU refuses to open, so does qcowx, naming
/// the field, its place in the header and the value in hex.
#[test]
fn an_unaligned_snapshot_table_offset_is_refused_at_open() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("u.qcow2");
    qemu_img_create(&p, 64 << 20, "");
    qemu_img_ok(&["snapshot", "-c", "s", p.to_str().unwrap()]);
    let off = be64(&p, 64);
    poke(&p, 64, &(off + 0x200).to_be_bytes());
    let e = Image::open(&p).unwrap_err().to_string();
    for want in [
        "snapshots_offset",
        "header offset 0x40",
        &format!("{:#x}", off + 0x200),
    ] {
        assert!(e.contains(want), "{want:?} missing from: {e}");
    }
}
