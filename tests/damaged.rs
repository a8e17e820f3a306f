//! The qcow2 corruption cases of QEMU's iotests (`tests/qemu-iotests/` in QEMU: 060,
//! 080, 261, 271), rebuilt with `qemu-img`, `qemu-io` and byte pokes as the iotests
//! build them (offsets read from each image's header where an iotest assumes them),
//! and qcowx compared with QEMU on each (issue 17):
//!
//! * `qcowx check` exits as `qemu-img check` does (0 clean, 1 check error, 2
//!   corruption, 3 leaks only) and names the damage;
//! * where QEMU refuses to open the image, qcowx refuses too, naming the structure
//!   with offsets in hex;
//! * where QEMU refuses a write on metadata and marks the image corrupt, so does qcowx,
//!   and the metadata is unchanged;
//! * `qcowx check --repair` either fixes the image (then `qemu-img check` is clean and
//!   qcowx reads what QEMU reads from its own repair) or leaves the file as it was;
//! * where QEMU reads an unusual image, qcowx reads the same bytes.
//!
//! Where qcowx decides differently from QEMU on purpose, the test says so. See
//! `qcowx_tests::damaged` for the assertions; `QCOWX_DAMAGED_SEEDS=DIR` saves every
//! damaged image as a fuzz seed (`fuzz/make-seeds`).

use qcowx_tests::damaged::{Case, IMAGE};
use qcowx_tests::{qemu_check, require_qemu_tools};

const M64: u64 = 64 << 20;

/// A 64 MiB compat 1.1 image with 64 KiB clusters, as the iotests make theirs.
fn image(name: &str) -> Case {
    require_qemu_tools();
    Case::create(name, M64, "compat=1.1")
}

/// An image with `write 0 64k` done (L1 entry 0 and its L2 table allocated).
fn written(name: &str) -> Case {
    let c = image(name);
    c.qemu_io(&["write -P 0x11 0 64k"]);
    c
}

// ---- 060: overlapping metadata ----------------------------------------------------------

/// 060 "L2 reference into L1": L1 entry 0 points its L2 table at the L1 table itself.
#[test]
fn iotest_060_l2_into_l1() {
    let c = image("060-l2-into-l1");
    let l1 = c.l1_offset();
    c.poke64(l1, (1 << 63) | l1);
    let c = c.damaged();
    c.check_like_qemu(&["L1"]);
    c.write_refused_like_qemu("write -P 0x2a 0 512", (l1, 8), "L1 table");
    c.repair_like_qemu(&[], false);
}

/// 060 "cluster data reference into refcount block": a data cluster on refcount block
/// 0 (the iotest's issue-17 case: the write turned every refcount into 23130).
#[test]
fn iotest_060_data_into_refblock() {
    let c = image("060-data-into-refblock");
    let rb = c.refblock_offset();
    // Allocate an L2 table right after the metadata, as the iotest does with truncate.
    let l2 = c.bytes().len() as u64;
    let l2 = l2.div_ceil(65536) * 65536;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&c.img)
        .unwrap()
        .set_len(l2 + 65536)
        .unwrap();
    c.poke64(c.l1_offset(), (1 << 63) | l2);
    c.poke(rb + 2 * (l2 >> 16), &[0, 1]);
    c.poke64(l2, (1 << 63) | rb);
    let c = c.damaged();
    c.check_like_qemu(&["0x20000"]);
    c.write_refused_like_qemu("write -P 0x2a 0 512", (rb, 65536), "refcount block");
    c.repair_like_qemu(&[], false);
}

/// 060 "cluster data reference into inactive L2 table": the active L2 entry points at
/// the L2 table the snapshot still uses. QEMU only refuses the write with
/// `overlap-check=all` (its default leaves inactive L2 tables unchecked); qcowx
/// protects every metadata structure always.
#[test]
fn iotest_060_data_into_inactive_l2() {
    let c = image("060-data-into-inactive-l2");
    c.qemu_io(&["write -P 1 0 512"]);
    c.qemu_img(&["snapshot", "-c", "foo", IMAGE]);
    c.qemu_io(&["write -P 2 0 512"]);
    let snap_l1 = c.peek64(c.snapshots_offset());
    let inactive_l2 = c.peek64(snap_l1) & qcowx_tests::damaged::OFFSET_MASK;
    let active_l2 = c.l2_offset(0);
    assert_ne!(
        inactive_l2, active_l2,
        "the write did copy-on-write the L2 table"
    );
    c.poke64(active_l2, (1 << 63) | inactive_l2);
    let c = c.damaged();
    c.check_like_qemu(&[&format!("{inactive_l2:#x}")]);
    c.write_refused_like_qemu("write -P 3 0 512", (inactive_l2, 65536), "L2 table");
    c.repair_like_qemu(&["foo"], false);
}

/// 060 "unaligned L1 entry": an L2 table at 0x42a00. QEMU refuses to read through it.
#[test]
fn iotest_060_unaligned_l1_entry() {
    let c = written("060-unaligned-l1-entry");
    let l2 = c.l2_offset(0);
    c.poke64(c.l1_offset(), (1 << 63) | (l2 + 0x2a00));
    let c = c.damaged();
    // qcowx names the L1 entry's value (0x8000000000042a00); QEMU the table offset.
    let bad = format!("{:x}", l2 + 0x2a00);
    c.check_like_qemu(&["L1", &bad]);
    let out = c.qcowx(&["io", "-c", "read 0 64k", IMAGE]);
    assert!(
        !out.status.success(),
        "qcowx read through an unaligned L2 table"
    );
    qcowx_tests::damaged::assert_message(&c.name, &qcowx_tests::cli::stderr(&out), &[&bad]);
    c.repair_like_qemu(&[], false);
}

/// 060 "unaligned L2 entry": a data cluster at 0x52a00.
#[test]
fn iotest_060_unaligned_l2_entry() {
    let c = written("060-unaligned-l2-entry");
    let l2 = c.l2_offset(0);
    let data = c.peek64(l2) & qcowx_tests::damaged::OFFSET_MASK;
    c.poke64(l2, (1 << 63) | (data + 0x2a00));
    let c = c.damaged();
    // The L2 table that holds the bad entry, in hex.
    let table = format!("{l2:#x}");
    c.check_like_qemu(&["L2", &table]);
    let out = c.qcowx(&["io", "-c", "read 0 64k", IMAGE]);
    assert!(
        !out.status.success(),
        "qcowx read an unaligned data cluster"
    );
    qcowx_tests::damaged::assert_message(&c.name, &qcowx_tests::cli::stderr(&out), &[&table]);
    c.repair_like_qemu(&[], false);
}

/// 060 "writing to an unaligned preallocated zero cluster": a zero cluster
/// preallocated at 0x2a00, inside the header cluster. QEMU refuses the write and marks
/// the image corrupt; qcowx refuses the write open and leaves the file as it was.
#[test]
fn iotest_060_unaligned_prealloc_zero() {
    let c = image("060-unaligned-prealloc-zero");
    c.qemu_io(&["write 0 64k", "discard 0 64k"]);
    let l2 = c.l2_offset(0);
    c.poke64(l2, (1 << 63) | 0x2a00 | 1);
    let c = c.damaged();
    let table = format!("{l2:#x}");
    c.check_like_qemu(&["L2", &table]);
    let before = c.bytes();
    let out = c.qcowx(&["io", "-c", "write -P 0x2a 0 64k", IMAGE]);
    assert!(!out.status.success(), "qcowx wrote into the header cluster");
    qcowx_tests::damaged::assert_message(&c.name, &qcowx_tests::cli::stderr(&out), &[&table]);
    let mut after = c.bytes();
    after[72..80].copy_from_slice(&before[72..80]); // the corrupt bit may be set
    assert!(after == before, "the refused write changed the file");
    c.repair_like_qemu(&[], false);
}

/// 060 "unaligned reftable entry": refcount block 0 at 0x22a00.
///
/// On purpose unlike QEMU: `qemu-img check` exits 1 (it cannot read the refcounts and
/// gives up), qcowx checks the rest and reports corruption (2); its repair rebuilds
/// the refcount structure, which QEMU cannot.
#[test]
fn iotest_060_unaligned_reftable_entry() {
    let c = image("060-unaligned-reftable-entry");
    let rt = c.reftable_offset();
    let rb = c.refblock_offset();
    c.poke64(rt, rb + 0x2a00);
    let c = c.damaged();
    assert_eq!(
        qemu_check(&c.img).code,
        1,
        "oracle: qemu-img check gives up"
    );
    c.check_exits(
        2,
        &["refcount table", "0x22a00"],
        "qcowx completes the check",
    );
    c.write_after_refcount_damage("write -P 0x2a 0 64k", "read -P 0x2a 0 64k");
    c.repair_like_qemu(&[], true);
}

/// 060 "empty refcount table": refcount table entry 0 cleared.
#[test]
fn iotest_060_empty_refcount_table() {
    let c = image("060-empty-refcount-table");
    c.poke64(c.reftable_offset(), 0);
    let c = c.damaged();
    c.check_like_qemu(&["refcount=0"]);
    c.write_after_refcount_damage("write -P 0x2a 0 64k", "read -P 0x2a 0 64k");
    c.repair_like_qemu(&[], false);
}

/// 060 "empty refcount table with valid L1 and L2 tables".
#[test]
fn iotest_060_empty_refcount_table_with_l2() {
    let c = written("060-empty-refcount-table-with-l2");
    c.poke64(c.reftable_offset(), 0);
    let c = c.damaged();
    c.check_like_qemu(&["refcount=0"]);
    c.write_after_refcount_damage("write -P 0x2a 0 128k", "read -P 0x2a 0 128k");
    c.repair_like_qemu(&[], false);
}

/// 060 "empty refcount block" (and "with compressed write", whose image is the same
/// with an L2 table: qcowx io has no compressed write).
#[test]
fn iotest_060_empty_refcount_block() {
    let c = image("060-empty-refcount-block");
    c.qemu_io(&["write -P 0x11 64k 64k"]);
    c.poke64(c.refblock_offset(), 0);
    let c = c.damaged();
    c.check_like_qemu(&["refcount=0"]);
    c.write_after_refcount_damage("write -P 0x2a 0 64k", "read -P 0x2a 0 64k");
    c.repair_like_qemu(&[], false);
}

/// 060 "zero refcount table size": `refcount_table_clusters` = 0. QEMU refuses to
/// open the image, but `qemu-img check` reports corruption (2) and `-r all` rebuilds.
#[test]
fn iotest_060_zero_refcount_table_size() {
    let c = image("060-zero-refcount-table-size");
    c.poke32(56, 0);
    let c = c.damaged();
    assert_eq!(qemu_check(&c.img).code, 2, "oracle: qemu-img check");
    // On purpose unlike QEMU: qcowx judges the header before anything else and
    // refuses an image without a refcount table everywhere (check exits 1, "check
    // not completed"; the repair refuses and changes nothing), where QEMU's check
    // alone opens it and rebuilds the table.
    c.check_exits(
        1,
        &["refcount_table_clusters", "header offset 0x38"],
        "qcowx refuses the header",
    );
    c.open_refused_like_qemu(&["refcount_table_clusters"]);
    c.repair_like_qemu(&[], false);
}

/// 060 "incorrect refcount table offset": `refcount_table_offset` = 0 (the refcount
/// table is read from the header cluster). QEMU opens it, checks it as corrupt (2)
/// and repairs it.
#[test]
fn iotest_060_refcount_table_offset_zero() {
    let c = image("060-refcount-table-offset-zero");
    c.poke64(48, 0);
    let c = c.damaged();
    assert_eq!(qemu_check(&c.img).code, 2, "oracle: qemu-img check");
    // On purpose unlike QEMU (which reads the header cluster as the refcount table and
    // reports 30 corruptions): qcowx refuses a refcount table at offset 0 when it
    // reads the header, naming the field; its repair refuses and changes nothing.
    c.check_exits(
        1,
        &["refcount_table_offset", "header offset 0x30"],
        "qcowx refuses the header",
    );
    c.repair_like_qemu(&[], false);
}

/// 060 "dirty corrupt image": refcount block 0 at the unaligned 0xffff2a00 and the
/// dirty bit set. On purpose unlike QEMU: `qemu-img check` exits 1 and its repair
/// leaves leaks (3); qcowx reports the corruption (2) and rebuilds the refcounts.
#[test]
fn iotest_060_dirty_unaligned_refblock() {
    let c = image("060-dirty-unaligned-refblock");
    c.poke64(c.reftable_offset(), 0xffff_2a00);
    c.poke64(72, 1);
    let c = c.damaged();
    assert_eq!(
        qemu_check(&c.img).code,
        1,
        "oracle: qemu-img check gives up"
    );
    c.check_exits(
        2,
        &["refcount table", "0xffff2a00"],
        "qcowx completes the check",
    );
    c.repair_like_qemu(&[], true);
}

/// 060 (QEMU 8.x) "compressed cluster size past EOF": a compressed cluster's sector
/// count runs 128 KiB past the end of the file. QEMU reads it (the data ends inside
/// the file) and `qemu-img check` reports corruption; QEMU's repair truncates the file
/// and leaves the cluster unreadable, so qcowx's repair is compared with QEMU's read
/// of the damaged image instead.
#[test]
fn iotest_060_compressed_past_eof() {
    let c = image("060-compressed-past-eof");
    c.qemu_io(&["write -c -P 0x11 0 64k"]);
    let l2 = c.l2_offset(0);
    let entry = c.peek64(l2);
    assert_eq!(entry >> 62, 1, "a compressed cluster");
    // 64 KiB clusters: the sector count (minus one) is bits 54..61.
    c.poke64(l2, entry | (0xff << 54));
    let c = c.damaged();
    let data = format!("{:#x}", entry & ((1 << 54) - 1));
    c.check_like_qemu(&["compressed", &data]);
    c.reads_like_qemu(IMAGE, &[]);
    c.repair_like_qemu(&[], true);
}

// ---- 080: header, refcount table, snapshot table and L1 validation ----------------------

/// Variants of an 080 case: fresh 64 MiB images, each with its pokes applied (offset,
/// bytes) and saved as a seed named `080-NAME` as it is built (so that every variant
/// is saved even when an earlier one fails its assertions), which QEMU refuses to
/// open: qcowx refuses each too, naming its needles, and `qcowx check` exits as
/// `qemu-img check` does.
#[derive(Default)]
struct Refused(Vec<(Case, Vec<String>)>);

impl Refused {
    fn add(&mut self, name: &str, pokes: &[(u64, &[u8])], needles: &[&str]) {
        let c = image(&format!("080-{name}"));
        for (off, bytes) in pokes {
            c.poke(*off, bytes);
        }
        let needles = needles.iter().map(|n| n.to_string()).collect();
        self.0.push((c.damaged(), needles));
    }

    fn run(self) {
        for (c, needles) in self.0 {
            let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
            c.open_refused_like_qemu(&needles);
            c.check_like_qemu(&needles);
            c.repair_like_qemu(&[], false);
        }
    }
}

/// One [`Refused`] variant.
fn refused_080(name: &str, pokes: &[(u64, &[u8])], needles: &[&str]) {
    let mut r = Refused::default();
    r.add(name, pokes, needles);
    r.run();
}

#[test]
fn iotest_080_huge_header_length() {
    let mut r = Refused::default();
    r.add(
        "header-length-ffffffff",
        &[(100, b"\xff\xff\xff\xff")],
        &["header"],
    );
    r.add(
        "header-length-7fffffff",
        &[(100, b"\x7f\xff\xff\xff")],
        &["header"],
    );
    r.run();
}

/// An unknown header extension claiming 2 GiB (placed after the header, whose length
/// QEMU 10 makes 112, not the iotest's 104), the backing file name offset in turn
/// huge, inside the extension, and 0.
#[test]
fn iotest_080_huge_header_extension() {
    let mut r = Refused::default();
    require_qemu_tools();
    let probe = Case::create("probe", M64, "compat=1.1");
    let ext = u64::from(qcowx_tests::be32(&probe.img, 100));
    drop(probe);
    for (tag, backing) in [("ffff", u64::MAX), ("in-ext", ext + 4), ("none", 0)] {
        let b = backing.to_be_bytes();
        let pokes: &[(u64, &[u8])] = &[
            (ext, b"\x12\x34\x56\x78"),
            (ext + 4, b"\x7f\xff\xff\xff"),
            (8, &b),
        ];
        r.add(
            &format!("huge-header-extension-{tag}"),
            pokes,
            &["extension"],
        );
    }
    r.run();
}

#[test]
fn iotest_080_huge_refcount_table_clusters() {
    let mut r = Refused::default();
    for v in [0xffff_ffffu32, 0x0002_0001] {
        let b = v.to_be_bytes();
        r.add(
            &format!("refcount-table-clusters-{v:x}"),
            &[(56, &b)],
            &["refcount_table_clusters"],
        );
    }
    r.run();
}

#[test]
fn iotest_080_misaligned_refcount_table() {
    refused_080(
        "misaligned-refcount-table",
        &[(48, &0x1234_5678_90ab_cdefu64.to_be_bytes())],
        &["refcount_table_offset", "0x1234567890abcdef"],
    );
}

#[test]
fn iotest_080_huge_refcount_table_offset() {
    refused_080(
        "huge-refcount-table-offset",
        &[
            (48, &0xffff_ffff_ffff_0000u64.to_be_bytes()),
            (56, &[0, 0, 0, 0x7f]),
        ],
        &["refcount_table_offset", "0xffffffffffff0000"],
    );
}

/// `nb_snapshots` huge; then a huge `snapshots_offset` with 65535 snapshots.
#[test]
fn iotest_080_invalid_snapshot_table() {
    let mut r = Refused::default();
    for v in [0xffff_ffffu32, 0x7fff_ffff] {
        let b = v.to_be_bytes();
        r.add(
            &format!("nb-snapshots-{v:x}"),
            &[(60, &b)],
            &["nb_snapshots"],
        );
    }
    r.add(
        "snapshots-offset-huge",
        &[
            (64, &0xffff_ffff_ffff_0000u64.to_be_bytes()),
            (60, &[0, 0, 0xff, 0xff]),
        ],
        &["snapshot", "0xffffffffffff0000"],
    );
    r.run();
}

/// The case: a snapshot-table offset that is not cluster-aligned, with no
/// snapshots. QEMU refuses to open the image ("Snapshot table offset invalid") and
/// `qemu-img check` exits 1; qcowx served it, wrote to it and kept the bad offset.
#[test]
fn iotest_080_snapshot_table_offset_unaligned() {
    refused_080(
        "snapshots-offset-unaligned",
        &[(64, &0x1234_5678_90ab_cdefu64.to_be_bytes()), (60, &[0; 4])],
        &["snapshot", "0x1234567890abcdef"],
    );
}

#[test]
fn iotest_080_invalid_l1_table() {
    let mut r = Refused::default();
    for v in [0xffff_ffffu32, 0x7fff_ffff] {
        let b = v.to_be_bytes();
        r.add(&format!("l1-size-{v:x}"), &[(36, &b)], &["l1_size"]);
    }
    r.add(
        "l1-offset-huge",
        &[
            (40, &0x7fff_ffff_ffff_0000u64.to_be_bytes()),
            (36, &[0, 0, 0xff, 0xff]),
        ],
        &["l1_table_offset", "0x7fffffffffff0000"],
    );
    r.add(
        "l1-offset-unaligned",
        &[
            (40, &0x1234_5678_90ab_cdefu64.to_be_bytes()),
            (36, &[0, 0, 0, 1]),
        ],
        &["l1_table_offset", "0x1234567890abcdef"],
    );
    r.run();
}

#[test]
fn iotest_080_invalid_backing_file_size() {
    refused_080(
        "backing-file-size",
        &[(8, &0x1000u64.to_be_bytes()), (16, b"\xff\xff\xff\xff")],
        &["backing"],
    );
}

/// An L2 entry with a huge host offset (with reserved bits set, then plain). QEMU's
/// `qemu-img snapshot -c` fails on it; `qcowx snapshot` must fail too and leave the
/// file as it was, and check must agree with QEMU's.
#[test]
fn iotest_080_l2_entry_huge_offset() {
    // Every variant is built (and saved as a seed) before any is asserted on.
    let cases: Vec<_> = [
        ("reserved-bits", 0xbfff_ffff_ffff_0000u64),
        ("standard", 0x8000_00ff_ffff_0000),
    ]
    .into_iter()
    .map(|(tag, entry)| {
        let c = image(&format!("080-l2-entry-huge-offset-{tag}"));
        c.qemu_io(&["write 0 512"]);
        c.poke64(c.l2_offset(0), entry);
        (tag, entry, c.damaged())
    })
    .collect();
    for (tag, entry, c) in cases {
        let q = c.qemu_img(&["snapshot", "-c", "test", &c.copy("qemu-snap")]);
        assert!(
            !q.status.success(),
            "oracle: qemu-img snapshot -c succeeded"
        );
        let host = format!("{:#x}", entry & qcowx_tests::damaged::OFFSET_MASK);
        c.check_like_qemu(&[&host]);
        let before = c.bytes();
        let out = c.qcowx(&["snapshot", IMAGE, "test"]);
        assert!(!out.status.success(), "{tag}: qcowx snapshot succeeded");
        qcowx_tests::damaged::assert_message(&c.name, &qcowx_tests::cli::stderr(&out), &[]);
        assert!(
            c.bytes() == before,
            "{tag}: a failed snapshot changed the file"
        );
        c.repair_like_qemu(&[], false);
    }
}

/// A snapshot's L1 table offset unaligned (0x400200), then its size huge
/// (0x10000000): QEMU cannot read the snapshot (`qemu-img convert -s` fails) and
/// `qemu-img check` reports the damage; qcowx must refuse to export the snapshot,
/// naming it in hex.
#[test]
fn iotest_080_invalid_snapshot_l1() {
    // Every variant is built (and saved as a seed) before any is asserted on.
    let cases: Vec<_> = [
        ("offset", 0u64, 0x40_0200u64.to_be_bytes().to_vec()),
        ("size", 8, 0x1000_0000u32.to_be_bytes().to_vec()),
    ]
    .into_iter()
    .map(|(tag, off, bytes)| {
        let c = image(&format!("080-snapshot-l1-{tag}"));
        c.qemu_io(&["write 0 512"]);
        c.qemu_img(&["snapshot", "-c", "test", IMAGE]);
        c.poke(c.snapshots_offset() + off, &bytes);
        (tag, c.damaged())
    })
    .collect();
    for (tag, c) in cases {
        let q = c.qemu_img(&[
            "convert",
            "-l",
            "snapshot.name=test",
            "-O",
            "raw",
            IMAGE,
            "q.raw",
        ]);
        assert!(!q.status.success(), "oracle: QEMU read the snapshot");
        c.check_like_qemu(&["snapshot"]);
        match c.qcowx_reads(IMAGE, Some("test")) {
            Ok(_) => panic!("{tag}: qcowx exported a snapshot with a bad L1 table"),
            Err(e) => qcowx_tests::damaged::assert_message(&c.name, &e, &["snapshot"]),
        }
        c.repair_like_qemu(&[], false);
    }
}

// ---- 261: snapshot table entries --------------------------------------------------------

/// 261 "repair botched v3": a v2 image whose snapshots carry no extra data, 42 bytes
/// of it (unknown to QEMU) and 8 bytes (valid in v2), forced to version 3 without the
/// upgrade (v3 wants 16 bytes of extra data in every entry). `qemu-img check` reports
/// the incomplete entries (2) and `-r all` completes them.
#[test]
fn iotest_261_botched_v3_snapshot_entries() {
    require_qemu_tools();
    let c = Case::v2_uneven_snapshot_extra("261-botched-v3", M64);
    assert_eq!(qemu_check(&c.img).code, 0, "oracle: the v2 image is valid");
    c.poke32(4, 3); // version
    c.poke32(100, 0x68); // header_length
    c.poke32(96, 4); // refcount_order
    let c = c.damaged();
    c.check_like_qemu(&["snapshot"]);
    c.repair_like_qemu(&["sn0", "sn1", "sn2"], false);
}

/// 261 "too many snapshots", in small: a v2 image whose snapshot table entries are
/// all zero (valid in v2: no L1 table, empty ID and name). QEMU lists, checks and
/// reads it; so must qcowx.
#[test]
fn iotest_261_v2_zero_snapshot_entries() {
    require_qemu_tools();
    let c = Case::create("261-v2-zero-snapshots", M64, "compat=0.10");
    c.qemu_io(&["write -P 0x77 0 64k"]);
    // The table in a fresh cluster at the end of the file, counted in refcount block 0.
    let table = (c.bytes().len() as u64).div_ceil(65536) * 65536;
    c.poke(table, &[0; 3 * 40]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&c.img)
        .unwrap()
        .set_len(table + 65536)
        .unwrap();
    c.poke(c.refblock_offset() + 2 * (table >> 16), &[0, 1]);
    c.poke64(64, table);
    c.poke32(60, 3);
    let c = c.damaged();
    assert_eq!(
        qemu_check(&c.img).code,
        0,
        "oracle: QEMU finds the image valid"
    );
    c.check_exits(0, &[], "the image is valid");
    let info = c.qcowx(&["info", IMAGE]);
    qcowx_tests::cli::assert_ok(&info, "qcowx info");
    c.reads_like_qemu(IMAGE, &[]);
}

// ---- 271: extended L2 -------------------------------------------------------------------

/// 271 "compressed cluster with subcluster bitmap != 0": the bitmap of a compressed
/// cluster's L2 entry says subcluster 31 is allocated and 0 is zero. The iotest calls
/// it harmless (QEMU ignores the bitmap when reading), but `qemu-img check` of QEMU 10
/// reports it as corruption; QEMU's repair then frees the compressed data (it is left
/// unreadable), so qcowx's repair is compared with QEMU's read of the damaged image.
#[test]
fn iotest_271_compressed_subcluster_bitmap() {
    require_qemu_tools();
    let c = Case::create(
        "271-compressed-subcluster-bitmap",
        1 << 20,
        "extended_l2=on",
    );
    c.qemu_io(&["write -c -P 11 0 64k"]);
    let l2 = c.l2_offset(0);
    c.poke(l2 + 11, &[0x01, 0x80]);
    let c = c.damaged();
    c.check_like_qemu(&["compressed", "bitmap"]);
    c.reads_like_qemu(IMAGE, &[]);
    c.repair_like_qemu(&[], true);
}
