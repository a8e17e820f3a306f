//! Metadata overlap protection: on an image whose links were damaged after qcowx
//! closed it cleanly (so the open trusts it and scans nothing), a write, discard or
//! copy that would land on metadata is refused, the structure is left intact, the image
//! is marked corrupt as QEMU marks it, and a repair makes it writable again.

use std::fs;
use std::path::Path;

use qcowx_core::{CreateOptions, ErrorKind, Image, OpenOptions, OpenState, DEFAULT_VDI};
use qcowx_tests::{be64, patch, qemu_check, qemu_info, read_at, require_qemu_tools};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;

fn poke64(path: &Path, at: u64, v: u64) {
    patch(path, at, &v.to_be_bytes());
}

fn bytes(path: &Path, at: u64, len: usize) -> Vec<u8> {
    read_at(path, at, len)
}

/// Offsets of an image's structures, read from its header.
struct Layout {
    l1: u64,
    refcount_table: u64,
    refcount_block: u64,
    l2: u64,
}

fn layout(path: &Path) -> Layout {
    let l1 = be64(path, 40);
    let refcount_table = be64(path, 48);
    let refcount_block = be64(path, refcount_table);
    let l2 = be64(path, l1) & 0x00ff_ffff_ffff_fe00;
    Layout {
        l1,
        refcount_table,
        refcount_block,
        l2,
    }
}

/// An image qcowx wrote (guest clusters 0 and 1 allocated) and closed cleanly, with
/// the L2 entry of guest cluster 1 then pointed at `target` (writable, as a damaged
/// image could have it). Returns the layout.
fn damaged(path: &Path, target: impl Fn(&Layout) -> u64) -> Layout {
    let img = Image::create(path, &CreateOptions::new(64 * MIB)).unwrap();
    img.write_at(&[0x11; 2 * CLUSTER as usize], 0).unwrap();
    img.close().unwrap();
    let l = layout(path);
    poke64(path, l.l2 + 8, (1 << 63) | target(&l));
    l
}

fn assert_marked_corrupt(path: &Path) {
    let info = qemu_info(path, true);
    assert_eq!(
        info["format-specific"]["data"]["corrupt"], true,
        "QEMU sees the corrupt bit: {info:#}"
    );
}

/// The whole protocol on one damaged image: refused write, structure intact, corrupt
/// bit, no more writes, read-only reopen, repair, writable again.
#[test]
fn a_write_onto_a_refcount_block_is_refused_and_the_image_marked_corrupt() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let l = damaged(&p, |l| l.refcount_block);
    let before = bytes(&p, l.refcount_block, CLUSTER as usize);

    let img = Image::open_rw(&p).unwrap();
    assert_eq!(
        img.open_state(),
        OpenState::Clean,
        "the damage came after a clean close: no scan at open"
    );
    let e = img.write_at(&[0x2a; 512], CLUSTER).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let msg = e.to_string();
    for want in [
        "refcount block",
        &format!("{:#x}", l.refcount_block),
        "marked corrupt",
    ] {
        assert!(msg.contains(want), "{want:?} missing from: {msg}");
    }
    // Nothing more is written through this handle, not even elsewhere.
    let again = img.write_at(&[0x2b; 512], 0).unwrap_err();
    assert_eq!(again.kind(), ErrorKind::ReadOnly, "{again}");
    // Nor is the structure changed: every operation that would write is refused.
    let structural: [(&str, qcowx_core::Result<()>); 6] = [
        ("snapshot", img.snapshot(DEFAULT_VDI, "s").map(|_| ())),
        ("resize", img.resize(2 * img.size())),
        ("gc", img.gc().map(|_| ())),
        ("discard", img.discard(0, CLUSTER)),
        ("zeroes", img.write_zeroes(0, CLUSTER, false)),
        ("refcount width", img.set_refcount_bits(64)),
    ];
    for (what, r) in structural {
        let e = r.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::ReadOnly, "{what}: {e}");
        assert!(e.to_string().contains("refused write"), "{what}: {e}");
    }
    img.close().unwrap();
    drop(img);

    assert_eq!(
        bytes(&p, l.refcount_block, CLUSTER as usize),
        before,
        "the refcount block is intact"
    );
    assert_marked_corrupt(&p);
    let e = Image::open_rw(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
    assert!(e.to_string().contains("marked corrupt"), "{e}");
    // Read-only opens still work and read the damaged link's target.
    let mut b = [0u8; 2];
    Image::open(&p).unwrap().read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x11, 0x11]);

    // A repair fixes the image and clears the bit; then it is writable again.
    let img = OpenOptions::new().repair(true).open(&p).unwrap();
    let r = img.repair().unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    assert!(!r.marked_corrupt);
    img.close().unwrap();
    assert_eq!(qemu_check(&p).code, 0, "{}", qemu_check(&p).json);
    let img = Image::open_rw(&p).unwrap();
    img.write_at(&[0x2a; 512], CLUSTER).unwrap();
    img.close().unwrap();
    assert_eq!(qemu_check(&p).code, 0, "{}", qemu_check(&p).json);
    let mut b = [0u8; 512];
    Image::open(&p).unwrap().read_at(&mut b, CLUSTER).unwrap();
    assert_eq!(b, [0x2a; 512]);
}

/// Each structure a data cluster could be pointed at: the write is refused and the
/// structure's bytes stay as they were.
#[test]
fn writes_onto_each_structure_are_refused() {
    type Pick = fn(&Layout) -> u64;
    // (Host offset 0, the header, cannot be named by a link: an entry with offset 0
    // reads as unallocated, in QEMU's rule too.)
    let cases: [(&str, Pick); 3] = [
        ("L1 table", |l| l.l1),
        ("refcount table", |l| l.refcount_table),
        ("L2 table", |l| l.l2),
    ];
    for (name, pick) in cases {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.qcow2");
        let l = damaged(&p, pick);
        let at = pick(&l);
        let before = bytes(&p, at, CLUSTER as usize);
        let img = Image::open_rw(&p).unwrap();
        let e = img.write_at(&[0x2a; 4096], CLUSTER + 4096).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
        assert!(e.to_string().contains(name), "{name}: {e}");
        drop(img);
        let after = bytes(&p, at, CLUSTER as usize);
        assert_eq!(after, before, "{name}: the structure is intact");
    }
}

/// A discard of a cluster whose link points at metadata would punch the structure: it
/// is refused like a write.
#[test]
fn a_discard_never_punches_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let l = damaged(&p, |l| l.refcount_block);
    let before = bytes(&p, l.refcount_block, CLUSTER as usize);
    let img = Image::open_rw(&p).unwrap();
    let e = img.discard(CLUSTER, CLUSTER).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    img.flush().unwrap();
    drop(img);
    assert_eq!(bytes(&p, l.refcount_block, CLUSTER as usize), before);
}

/// A link past every allocated cluster: writing through it would put data where the
/// next allocation goes (a table, say). Refused as damage.
#[test]
fn a_write_through_a_link_past_the_end_of_the_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    damaged(&p, |_| 64 * CLUSTER);
    let file_len = fs::metadata(&p).unwrap().len();
    assert!(file_len <= 64 * CLUSTER, "the link points past the end");
    let img = Image::open_rw(&p).unwrap();
    let e = img.write_at(&[0x2a; 512], CLUSTER).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("past the end"), "{e}");
    drop(img);
    assert_eq!(
        fs::metadata(&p).unwrap().len(),
        file_len,
        "nothing was written"
    );
}

/// The same writes on a sound image go through: the protection refuses nothing a
/// healthy image does (allocation, in place, copy-on-write after a snapshot, discard).
#[test]
fn a_sound_image_is_never_refused() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let img = std::sync::Arc::new(Image::create(&p, &CreateOptions::new(64 * MIB)).unwrap());
    for round in 0..4u8 {
        img.write_at(&[round; 3 * CLUSTER as usize], 0).unwrap();
        img.write_at(&[round; 512], 40 * MIB + 512).unwrap();
        img.snapshot("default", &format!("s{round}")).unwrap();
        img.discard(CLUSTER, CLUSTER).unwrap();
        img.write_at(&[round + 1; 4096], 2 * CLUSTER).unwrap();
    }
    img.delete_snapshot("s0").unwrap();
    img.gc().unwrap();
    img.write_at(&[9; 2 * CLUSTER as usize], 4 * CLUSTER)
        .unwrap();
    img.close().unwrap();
    assert_eq!(qemu_check(&p).code, 0, "{}", qemu_check(&p).json);
    let info = qemu_info(&p, false);
    assert_eq!(info["format-specific"]["data"]["corrupt"], false);
}

/// Guest data linked onto a snapshot's L2 table (QEMU's iotest 060 "data reference
/// into inactive L2 table"): a writable open refuses the image, and a repair moves the
/// data to a cluster of its own. Afterwards QEMU checks the image clean, both layers
/// read what QEMU reads from a copy it repaired itself, and the image takes writes.
#[test]
fn a_repair_moves_data_off_a_snapshot_l2_table() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let q = dir.path().join("q.qcow2");
    qcowx_tests::qemu_img_create(&p, 64 * MIB, "compat=1.1");
    qcowx_tests::qemu_io_ok("qcow2", &p, &["write -P 1 0 512"]);
    qcowx_tests::qemu_img_ok(&["snapshot", "-c", "foo", p.to_str().unwrap()]);
    qcowx_tests::qemu_io_ok("qcow2", &p, &["write -P 2 0 512"]);
    // The snapshot's L2 table stays where it was; the active L1 now links a copy.
    let snapshot_l2 = {
        let table = be64(&p, 64);
        let snap_l1 = be64(&p, table);
        be64(&p, snap_l1) & 0x00ff_ffff_ffff_fe00
    };
    let active_l2 = layout(&p).l2;
    assert_ne!(snapshot_l2, active_l2);
    poke64(&p, active_l2, (1 << 63) | snapshot_l2);
    fs::copy(&p, &q).unwrap();
    let before = fs::read(&p).unwrap();

    let e = Image::open_rw(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        e.to_string().contains(&format!("{snapshot_l2:#x}")),
        "the message names the cluster: {e}"
    );
    assert_eq!(
        fs::read(&p).unwrap(),
        before,
        "a refused open changes nothing"
    );

    let img = OpenOptions::new().repair(true).open(&p).unwrap();
    let r = img.repair().unwrap();
    assert_eq!(r.corruptions, 0, "{:?}", r.messages);
    img.close().unwrap();
    assert_eq!(qemu_check(&p).code, 0, "{:#}", qemu_check(&p).json);
    assert_eq!(
        be64(&p, be64(&p, be64(&p, 64))) & 0x00ff_ffff_ffff_fe00,
        snapshot_l2,
        "the snapshot's L2 table kept its place"
    );

    qcowx_tests::qemu_img_ok(&["check", "-r", "all", q.to_str().unwrap()]);
    for snapshot in [None, Some("foo")] {
        let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
        match snapshot {
            None => {
                qcowx_tests::convert_to_raw(&p, &a);
                qcowx_tests::convert_to_raw(&q, &b);
            }
            Some(s) => {
                qcowx_tests::convert_snapshot_to_raw(&p, s, &a);
                qcowx_tests::convert_snapshot_to_raw(&q, s, &b);
            }
        }
        assert!(
            fs::read(&a).unwrap() == fs::read(&b).unwrap(),
            "{snapshot:?} reads as QEMU's repair has it"
        );
    }
    let img = Image::open_rw(&p).unwrap();
    img.write_at(&[4; 512], 0).unwrap();
    img.close().unwrap();
    assert_eq!(qemu_check(&p).code, 0, "{:#}", qemu_check(&p).json);
    qcowx_tests::qemu_io_ok("qcow2", &p, &["read -P 4 0 512"]);
}

/// The guard on L2 tables: a named VDI's L1 entry (not covered by the clean-close
/// stamp, so the open trusts it) pointed at the active L1 table, writable. A write that
/// allocates through it would change "entries" of that table: refused, naming the L1
/// table, and the active L1 table is intact.
#[test]
fn an_l2_table_that_is_another_structure_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let img = std::sync::Arc::new(Image::create(&p, &CreateOptions::new(64 * MIB)).unwrap());
    img.write_at(&[1; 4096], 0).unwrap();
    img.snapshot("default", "s").unwrap();
    img.fork("s", "dev").unwrap();
    img.open_root("dev")
        .unwrap()
        .write_at(&[2; 4096], 0)
        .unwrap();
    img.close().unwrap();
    drop(img);

    let (n, table) = (
        u32::from_be_bytes(read_at(&p, 60, 4).try_into().unwrap()),
        be64(&p, 64),
    );
    let bytes = read_at(
        &p,
        table,
        (fs::metadata(&p).unwrap().len() - table) as usize,
    );
    let entries = qcowx_core::format::snapshot::parse_table(&bytes, table, n).unwrap();
    let dev = entries
        .iter()
        .find(|e| e.name == "vdi:dev")
        .expect("the VDI head's entry");
    let active_l1 = layout(&p).l1;
    patch(
        &p,
        dev.l1_table_offset,
        &((1u64 << 63) | active_l1).to_be_bytes(),
    );
    let before = read_at(&p, active_l1, 512);

    let img = std::sync::Arc::new(Image::open_rw(&p).unwrap());
    assert_eq!(img.open_state(), OpenState::Clean);
    // Guest cluster 5 of the "table" is an unused L1 slot: the write allocates.
    let e = img
        .open_root("dev")
        .unwrap()
        .write_at(&[3; 512], 5 * CLUSTER)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        e.to_string().contains("L1 table") && e.to_string().contains(&format!("{active_l1:#x}")),
        "{e}"
    );
    drop(img);
    assert_eq!(
        read_at(&p, active_l1, 512),
        before,
        "the L1 table is intact"
    );
}
