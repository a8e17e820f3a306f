//! Properties of the public API that embedders rely on, checked against QEMU's tools.

use std::process::Command;

use qcowx_core::{CreateOptions, Error, Image, OpenOptions};
use qcowx_tests::{assert_qemu_check_clean, qemu_img_run as qemu_img};

#[test]
fn handles_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Image>();
    assert_send_sync::<Error>();
}

/// Inserts an extension of an unknown type at the front of the extension list of a
/// version 3 image without a backing file.
fn insert_unknown_extension(path: &std::path::Path, kind: u32, data: &[u8]) {
    let mut bytes = std::fs::read(path).unwrap();
    let header_len = u32::from_be_bytes(bytes[100..104].try_into().unwrap()) as usize;
    assert_eq!(
        u64::from_be_bytes(bytes[8..16].try_into().unwrap()),
        0,
        "no backing file"
    );
    let mut ext = Vec::new();
    ext.extend_from_slice(&kind.to_be_bytes());
    ext.extend_from_slice(&(data.len() as u32).to_be_bytes());
    ext.extend_from_slice(data);
    ext.resize(8 + data.len().next_multiple_of(8), 0);
    let cluster = 1usize << u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    let tail: Vec<u8> = bytes[header_len..cluster - ext.len()].to_vec();
    bytes[header_len..header_len + ext.len()].copy_from_slice(&ext);
    bytes[header_len + ext.len()..cluster].copy_from_slice(&tail);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn unknown_extensions_survive_writes_and_bitmaps_stay_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ext.qcow2");
    let p = path.to_str().unwrap();
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", p, "8M"])
        .status
        .success());
    // A persistent bitmap: qcowx maintains it, so its auto-clear bit stays set.
    let out = qemu_img(&["bitmap", "--add", p, "b0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let payload = b"opaque extension payload, kept byte-for-byte";
    insert_unknown_extension(&path, 0x7178_7878, payload);
    assert_qemu_check_clean(&path);

    let img = Image::open_rw(&path).unwrap();
    img.write_at(&[7u8; 4096], 65536).unwrap();
    img.close().unwrap();
    drop(img);

    let img = Image::open(&path).unwrap();
    let ext = img
        .header()
        .extensions
        .get(0x7178_7878)
        .cloned()
        .expect("unknown extension kept");
    assert_eq!(ext.data, payload);
    assert_eq!(img.header().autoclear & 1, 1, "bitmaps kept consistent");
    let b0 = &img.bitmaps().unwrap()[0];
    assert_eq!((b0.name.as_str(), b0.in_use), ("b0", false));
    assert_eq!(img.bitmap_dirty("b0").unwrap(), vec![(65536, 65536)]);
    drop(img);
    assert_qemu_check_clean(&path);
    let raw = std::fs::read(&path).unwrap();
    let needle = payload.as_slice();
    assert!(raw.windows(needle.len()).any(|w| w == needle));
}

#[test]
fn resize_grows_the_l1_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    let mut opts = CreateOptions::new(1 << 20);
    opts.cluster_size = 512; // one L1 entry covers 32 KiB: growth needs a new L1
    let img = Image::create(&path, &opts).unwrap();
    img.write_at(&[1u8; 1000], 5000).unwrap();
    let l1_before = img.header().l1_size;
    img.resize(64 << 20).unwrap();
    assert!(img.header().l1_size > l1_before);
    img.write_at(&[2u8; 512], (64 << 20) - 512).unwrap();
    let mut buf = vec![0u8; 1000];
    img.read_at(&mut buf, 5000).unwrap();
    assert_eq!(buf, vec![1u8; 1000]);
    assert!(matches!(
        img.resize(1 << 20),
        Err(Error::Unsupported { .. })
    ));
    img.close().unwrap();
    drop(img);
    assert_qemu_check_clean(&path);
    let out = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 64 << 20)),
        "{info}"
    );
    let out = Command::new("qemu-io")
        .args(["-c", "read -P 2 67108352 512", "-c", "read -P 1 5000 1000"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(out.status.success());
}

#[test]
fn out_of_range_and_read_only_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.qcow2");
    Image::create(&path, &CreateOptions::new(1 << 20))
        .unwrap()
        .close()
        .unwrap();
    let img = OpenOptions::new().open(&path).unwrap();
    assert!(matches!(img.write_at(&[0], 0), Err(Error::ReadOnly { .. })));
    let mut buf = [0u8; 2];
    assert!(matches!(
        img.read_at(&mut buf, (1 << 20) - 1),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        img.read_at(&mut buf, u64::MAX),
        Err(Error::OutOfRange { .. })
    ));
}

#[test]
fn create_never_replaces_a_file_that_is_not_an_image_unless_asked() {
    use qcowx_core::IfExists;
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes.txt");
    std::fs::write(&notes, b"precious").unwrap();
    // The default replaces only images and empty files.
    let e = Image::create(&notes, &CreateOptions::new(1 << 20)).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e:?}");
    assert_eq!(std::fs::read(&notes).unwrap(), b"precious");
    // Create-new refuses any existing file, even an image, and leaves it alone.
    let img = dir.path().join("a.qcow2");
    let new_only = CreateOptions::new(1 << 20).if_exists(IfExists::Fail);
    Image::create(&img, &new_only).unwrap().close().unwrap();
    let before = std::fs::read(&img).unwrap();
    let e = Image::create(&img, &new_only).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e:?}");
    assert_eq!(e.kind(), qcowx_core::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&img).unwrap(), before);
    let e = Image::create(&notes, &new_only).unwrap_err();
    assert!(matches!(e, Error::AlreadyExists { .. }), "{e:?}");
    // The default replaces an image (as qemu-img create does).
    Image::create(&img, &CreateOptions::new(2 << 20))
        .unwrap()
        .close()
        .unwrap();
    assert_eq!(Image::open(&img).unwrap().size(), 2 << 20);
    // Replace replaces anything.
    let replace = CreateOptions::new(1 << 20).if_exists(IfExists::Replace);
    Image::create(&notes, &replace).unwrap().close().unwrap();
    assert_qemu_check_clean(&notes);
}
