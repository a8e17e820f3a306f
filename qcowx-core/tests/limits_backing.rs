//! Limits of backing files, at the limit and one past it (spec/limits.md): the length
//! of a backing file name, and the depth of a backing chain.
//!
//! At the limit the operation works (and QEMU, the oracle, accepts the result); one
//! past it qcowx refuses with a typed error that names the limit, and QEMU refuses
//! the same input.
//!
//! The QEMU tools come from the Debian package `qemu-utils`; a missing tool fails the
//! test with a message naming it.

mod limits_common;

use std::process::Command;

use qcowx_core::engine::backing::MAX_BACKING_DEPTH;
use qcowx_core::engine::chain::backing_chain;
use qcowx_core::format::header::MAX_BACKING_NAME;
use qcowx_core::{CreateOptions, Error, Image, LockMode};
use qcowx_tests::{
    assert_qemu_check_clean, describe, error_text, qemu_img_fails, qemu_img_ok, run, tempdir,
};

use limits_common::{create, p};

// ---- the backing file name -------------------------------------------------------------------

/// A backing file name of 1,023 bytes is stored and followed; 1,024 is refused, by
/// qcowx and by QEMU.
#[test]
fn backing_file_name_at_the_limit_works_and_one_byte_more_is_refused() {
    let dir = tempdir();
    let base = dir.path().join("base.qcow2");
    create(&base, 1 << 20, 65536);
    {
        let img = Image::open_rw(&base).expect("open");
        img.write_at(b"from the base", 0).expect("write");
        img.close().expect("close");
    }
    // "././...//base.qcow2" names the base at any length: "./" pairs, and one
    // doubled "/" for odd lengths.
    let name = |len: usize| {
        let pad = len - "base.qcow2".len();
        format!("{}{}base.qcow2", "./".repeat(pad / 2), "/".repeat(pad % 2))
    };
    let at_name = name(MAX_BACKING_NAME as usize);
    assert_eq!(at_name.len(), MAX_BACKING_NAME as usize);
    let top = dir.path().join("top.qcow2");
    let mut opts = CreateOptions::new(1 << 20);
    opts.backing_file = Some(at_name.clone());
    opts.backing_format = Some("qcow2".into());
    let img = Image::create(&top, &opts).expect("a 1,023-byte backing name");
    let mut buf = [0u8; 13];
    img.read_at(&mut buf, 0)
        .expect("read through the backing file");
    assert_eq!(&buf, b"from the base");
    assert_eq!(img.header().backing_file.as_deref(), Some(at_name.as_str()));
    img.close().expect("close");
    assert_qemu_check_clean(&top);

    let longer = name(MAX_BACKING_NAME as usize + 1);
    assert_eq!(longer.len(), MAX_BACKING_NAME as usize + 1);
    opts.backing_file = Some(longer.clone());
    let err =
        Image::create(dir.path().join("past.qcow2"), &opts).expect_err("a 1,024-byte backing name");
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let msg = qemu_img_fails(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        &longer,
        "-F",
        "qcow2",
        &p(&dir.path().join("qemu-past.qcow2")),
        "1M",
    ]);
    assert!(msg.contains("backing file"), "{msg}");
    // QEMU stores the 1,023-byte name.
    let qemu_at = dir.path().join("qemu-at.qcow2");
    qemu_img_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        &at_name,
        "-F",
        "qcow2",
        &p(&qemu_at),
        "1M",
    ]);
}

// ---- the backing chain ---------------------------------------------------------------------

/// A top image over 256 backing layers opens and reads the base's data through all
/// of them (so does QEMU); over 257 layers qcowx refuses with `Error::Backing`, both
/// when opening and when listing the chain.
#[test]
fn backing_chain_at_the_limit_opens_and_one_layer_more_is_refused() {
    let dir = tempdir();
    let name = |i: usize| format!("L{i:04}.qcow2");
    let path = |i: usize| dir.path().join(name(i));
    // L0000 is the base; L0001 its overlay, copied byte for byte to every later layer
    // with the backing name patched (all names have the same length).
    let mut opts = CreateOptions::new(64 << 10);
    opts.cluster_size = 512;
    let base = Image::create(path(0), &opts).expect("base");
    base.write_at(b"deep data", 4096).expect("write");
    base.close().expect("close");
    opts.backing_file = Some(name(0));
    opts.backing_format = Some("qcow2".into());
    Image::create(path(1), &opts)
        .and_then(|i| i.close())
        .expect("overlay");
    let template = std::fs::read(path(1)).expect("read overlay");
    let name_at = template
        .windows(name(0).len())
        .position(|w| w == name(0).as_bytes())
        .expect("backing name in the header");
    let layers = MAX_BACKING_DEPTH + 1; // one past the limit below the top
    for i in 2..=layers {
        let mut bytes = template.clone();
        bytes[name_at..name_at + name(0).len()].copy_from_slice(name(i - 1).as_bytes());
        std::fs::write(path(i), &bytes).expect("write layer");
    }

    // Top L0256: 256 layers below it.
    let at_limit = path(MAX_BACKING_DEPTH);
    let img = Image::open(&at_limit).expect("256 backing layers");
    let mut buf = [0u8; 9];
    img.read_at(&mut buf, 4096)
        .expect("read through 256 layers");
    assert_eq!(&buf, b"deep data");
    drop(img);
    let chain = backing_chain(&at_limit, None, LockMode::Shared).expect("chain of 257 images");
    assert_eq!(chain.len(), MAX_BACKING_DEPTH + 1);
    let out = run(Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "read -P 0x64 4096 1"])
        .arg(&at_limit));
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"),
        "qemu-io over 256 layers: {}",
        describe(&out)
    );

    // Top L0257: 257 layers below it.
    let past = path(layers);
    let err = Image::open(&past).expect_err("257 backing layers");
    assert!(matches!(err, Error::Backing { .. }), "{err:?}");
    assert!(
        error_text(&err).contains(&format!("deeper than {MAX_BACKING_DEPTH} layers")),
        "{}",
        error_text(&err)
    );
    let err = backing_chain(&past, None, LockMode::Shared).expect_err("chain of 258 images");
    assert!(
        err.to_string()
            .contains(&format!("deeper than {MAX_BACKING_DEPTH} layers")),
        "{err}"
    );
}
