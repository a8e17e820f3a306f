//! Opening without a scan: an image qcowx closed cleanly, and that nothing changed in a
//! way that matters since, opens with no scan (`OpenState::Clean`); each of QEMU's
//! operations that could make a qcowx link wrong makes the next open scan
//! (`Reconciled`); a crash makes it rebuild the refcounts (`Recovered`). Whatever the
//! open decided, what every root reads stays right and QEMU's check stays clean.

use std::path::Path;
use std::sync::Arc;

use qcowx_core::{CreateOptions, Image, OpenState};
use qcowx_tests::{assert_qemu_check_clean, qemu_img_ok, qemu_io_ok, require_qemu_tools};

const MIB: u64 = 1 << 20;

fn state_of(path: &Path) -> OpenState {
    let img = Image::open_rw(path).unwrap();
    let s = img.open_state();
    img.close().unwrap();
    s
}

fn read(img: &Arc<Image>, root: &str, off: u64) -> u8 {
    let mut b = [0u8; 1];
    img.open_root(root).unwrap().read_at(&mut b, off).unwrap();
    b[0]
}

/// An image with the default VDI, snapshot `s` and a fork `dev` of it, each written.
fn layered(path: &Path) {
    let img = Arc::new(Image::create(path, &CreateOptions::new(1024 * MIB)).unwrap());
    img.write_at(&[1; 65536], 0).unwrap();
    img.snapshot("default", "s").unwrap();
    img.fork("s", "dev").unwrap();
    img.open_root("dev")
        .unwrap()
        .write_at(&[2; 4096], 0)
        .unwrap();
    img.write_at(&[3; 4096], 0).unwrap();
    img.close().unwrap();
}

#[test]
fn created_and_cleanly_closed_images_open_without_a_scan() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    Image::create(&p, &CreateOptions::new(64 * MIB)).unwrap();
    assert_eq!(state_of(&p), OpenState::Clean, "a new image");
    layered(&p);
    assert_eq!(state_of(&p), OpenState::Clean, "after a clean close");
    assert_eq!(Image::open(&p).unwrap().open_state(), OpenState::ReadOnly);
    assert_qemu_check_clean(&p);
}

#[test]
fn a_crash_image_is_recovered_at_open() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    layered(&p);
    let img = Arc::new(Image::open_rw(&p).unwrap());
    img.write_at(&[9; 65536], 8 * MIB).unwrap();
    img.snapshot("default", "t").unwrap();
    img.write_at(&[8; 4096], 8 * MIB).unwrap();
    img.flush().unwrap();
    // The file as a crash would leave it: dirty, refcounts stale.
    let crashed = dir.path().join("crashed.qcow2");
    std::fs::copy(&p, &crashed).unwrap();
    drop(img);
    let img = Arc::new(Image::open_rw(&crashed).unwrap());
    assert_eq!(img.open_state(), OpenState::Recovered);
    assert_eq!(img.header().incompatible.bits() & 1, 0, "dirty bit cleared");
    assert_eq!(read(&img, "t", 8 * MIB), 9);
    assert_eq!(read(&img, "default", 8 * MIB), 8);
    img.close().unwrap();
    assert_qemu_check_clean(&crashed);
    assert_eq!(state_of(&crashed), OpenState::Clean);
}

/// Runs a QEMU operation on a layered image qcowx closed, then checks what the next
/// open decides, and that writes through every head keep every root right.
fn after_qemu(what: &str, op: impl FnOnce(&Path), expect: OpenState) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    layered(&p);
    op(&p);
    let img = Arc::new(Image::open_rw(&p).unwrap());
    assert_eq!(img.open_state(), expect, "after {what}");
    let before_s = read(&img, "s", 0);
    let before_dev = read(&img, "dev", 0);
    // Write every head where the layers differ: each must copy what it shares.
    img.write_at(&[0x55; 4096], 0).unwrap();
    img.open_root("dev")
        .unwrap()
        .write_at(&[0x66; 4096], 4096)
        .unwrap();
    assert_eq!(read(&img, "s", 0), before_s, "{what}: snapshot s changed");
    assert_eq!(read(&img, "dev", 0), before_dev, "{what}: dev changed");
    assert_eq!(read(&img, "default", 0), 0x55);
    img.close().unwrap();
    assert_qemu_check_clean(&p);
    assert_eq!(state_of(&p), OpenState::Clean, "{what}: closed again");
}

#[test]
fn qemu_writes_in_place_keep_the_stamp() {
    require_qemu_tools();
    // Clusters already allocated: no table changes, nothing that matters.
    after_qemu(
        "qemu-io write in place",
        |p| {
            qemu_io_ok("qcow2", p, &["write -P 7 8192 4096"]);
        },
        OpenState::Clean,
    );
    after_qemu(
        "qemu-img check -r all of a clean image",
        |p| {
            qemu_img_ok(&["check", "-r", "all", p.to_str().unwrap()]);
        },
        OpenState::Clean,
    );
}

#[test]
fn qemu_operations_that_matter_make_the_open_scan() {
    require_qemu_tools();
    after_qemu(
        "qemu-io write to a new L2 table",
        |p| {
            qemu_io_ok("qcow2", p, &["write -P 7 600M 4096"]);
        },
        OpenState::Reconciled,
    );
    after_qemu(
        "qemu-img snapshot -c",
        |p| {
            qemu_img_ok(&["snapshot", "-c", "q", p.to_str().unwrap()]);
        },
        OpenState::Reconciled,
    );
    after_qemu(
        "qemu-img snapshot -d",
        |p| {
            qemu_img_ok(&["snapshot", "-c", "q", p.to_str().unwrap()]);
            // A qcowx session that writes stamps the image with snapshot q in it.
            let img = Image::open_rw(p).unwrap();
            img.write_at(&[1; 512], 2 << 20).unwrap();
            img.close().unwrap();
            qemu_img_ok(&["snapshot", "-d", "q", p.to_str().unwrap()]);
        },
        OpenState::Reconciled,
    );
    // Applying a VDI head as QEMU's active layer makes the head's tables shared.
    after_qemu(
        "qemu-img snapshot -a of a VDI head",
        |p| {
            qemu_img_ok(&["snapshot", "-a", "vdi:dev", p.to_str().unwrap()]);
        },
        OpenState::Reconciled,
    );
    after_qemu(
        "qemu-img amend -o refcount_bits=8",
        |p| {
            qemu_img_ok(&["amend", "-o", "refcount_bits=8", p.to_str().unwrap()]);
        },
        OpenState::Reconciled,
    );
    after_qemu(
        "qemu-img resize",
        |p| {
            qemu_img_ok(&["resize", p.to_str().unwrap(), "2G"]);
        },
        OpenState::Reconciled,
    );
}

/// An image QEMU made (its header area is one full sector, with the feature name
/// table) is stamped when a qcowx session that wrote it closes, and then opens without
/// a scan; a session that changed nothing leaves the file as it was.
#[test]
fn an_image_qemu_made_is_stamped_at_its_first_qcowx_close() {
    require_qemu_tools();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    qemu_img_ok(&["create", "-f", "qcow2", p.to_str().unwrap(), "1G"]);
    qemu_io_ok("qcow2", &p, &["write -P 3 0 1M"]);
    let before = std::fs::read(&p).unwrap();
    assert_eq!(state_of(&p), OpenState::Reconciled, "never closed by qcowx");
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "a session that wrote nothing"
    );
    let img = Arc::new(Image::open_rw(&p).unwrap());
    assert_eq!(img.open_state(), OpenState::Reconciled);
    img.write_at(&[4; 4096], 8 << 20).unwrap();
    img.snapshot("default", "s").unwrap();
    img.close().unwrap();
    drop(img);
    assert_eq!(
        state_of(&p),
        OpenState::Clean,
        "stamped at the close that wrote"
    );
    assert_qemu_check_clean(&p);
    qemu_io_ok("qcow2", &p, &["read -P 3 0 1M", "read -P 4 8M 4k"]);
}
