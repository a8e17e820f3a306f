use super::*;

#[test]
fn the_module_example_runs() -> Result<()> {
    use qcowx_core::{CreateOptions, Image};

    let dir = tempfile::tempdir().unwrap();
    let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
    let out = IoCommand::parse("write -P 0x5a 4k 8k")?.execute(&img)?;
    assert_eq!(out.lines()[0], "wrote 8192/8192 bytes at offset 4096");
    let out = IoCommand::parse("read -P 90 4k 8k")?.execute(&img)?;
    assert!(!out.failed());
    let out = IoCommand::parse("read -P 0x5a 0 8k")?.execute(&img)?;
    assert!(out.failed());
    assert_eq!(
        out.lines()[0],
        "Pattern verification failed at offset 0, 8192 bytes"
    );
    assert_eq!(out.mismatch, Some(0));
    Ok(())
}
use qcowx_core::CreateOptions;

#[test]
fn parses_qemu_io_syntax() {
    assert_eq!(
        IoCommand::parse("write -P 0x5a 0 4k").unwrap(),
        IoCommand::Write {
            offset: 0,
            len: 4096,
            pattern: 0x5a,
            quiet: false
        }
    );
    assert_eq!(
        IoCommand::parse("w  -qP7 1M 0x200").unwrap(),
        IoCommand::Write {
            offset: 1 << 20,
            len: 512,
            pattern: 7,
            quiet: true
        }
    );
    assert_eq!(
        IoCommand::parse("write 0 1").unwrap(),
        IoCommand::Write {
            offset: 0,
            len: 1,
            pattern: DEFAULT_WRITE_PATTERN,
            quiet: false
        }
    );
    assert_eq!(
        IoCommand::parse("write -zu 64k 64k").unwrap(),
        IoCommand::WriteZeroes {
            offset: 65536,
            len: 65536,
            unmap: true,
            quiet: false
        }
    );
    assert_eq!(
        IoCommand::parse("zero 1.5k 512").unwrap(),
        IoCommand::WriteZeroes {
            offset: 1536,
            len: 512,
            unmap: false,
            quiet: false
        }
    );
    assert_eq!(
        IoCommand::parse("read -P 012 0 1").unwrap(),
        IoCommand::Read {
            offset: 0,
            len: 1,
            pattern: Some(10),
            quiet: false
        }
    );
    assert_eq!(
        IoCommand::parse("r 0 1").unwrap(),
        IoCommand::Read {
            offset: 0,
            len: 1,
            pattern: None,
            quiet: false
        }
    );
    assert_eq!(
        IoCommand::parse("discard -q 0 1G").unwrap(),
        IoCommand::Discard {
            offset: 0,
            len: 1 << 30,
            quiet: true
        }
    );
    assert_eq!(IoCommand::parse(" flush ").unwrap(), IoCommand::Flush);
    assert!(IoCommand::parse("write 0 4k").unwrap().writes());
    assert!(!IoCommand::parse("read 0 4k").unwrap().writes());
}

#[test]
fn rejects_bad_commands_with_a_reason() {
    for (bad, why) in [
        ("", "empty command"),
        ("frob 0 1", "unknown command 'frob'"),
        ("write -x 0 1", "option -x is not supported"),
        ("read -z 0 1", "option -z is not supported"),
        ("write -P 300 0 1", "300 is not a valid pattern byte"),
        ("write -P 0 1", "expected OFFSET and LEN"),
        ("write -P", "-P needs a pattern byte"),
        ("write -z -P 1 0 1", "-z and -P cannot be given together"),
        ("write -u 0 1", "-u needs -z"),
        ("write 0 1x", "invalid number '1x'"),
        ("write 0 1.5", "fraction needs a suffix"),
        ("read 0", "expected OFFSET and LEN, got 1"),
        ("read 0 1 2", "got 3"),
        ("flush 0", "flush takes no arguments"),
        ("write 16E 1", "too large"),
        ("write 15E 15E", "overflows"),
    ] {
        let err = IoCommand::parse(bad).unwrap_err().to_string();
        assert!(err.contains(why), "{bad:?}: {err}");
    }
}

#[test]
fn numbers_like_qemu_strtosz() {
    for (s, v) in [
        ("0", 0),
        ("512", 512),
        ("512b", 512),
        ("4k", 4096),
        ("4K", 4096),
        ("0x1000", 4096),
        ("0xbe", 0xbe),
        ("0x2k", 2048),
        ("1.5M", 3 << 19),
        ("2G", 2 << 30),
        ("1e", 1 << 60),
    ] {
        assert_eq!(parse_num(s), Ok(v), "{s}");
    }
    for s in ["", "x", "0x", "0xg", "-1", "1KiB", "k", ".k"] {
        assert!(parse_num(s).is_err(), "{s}");
    }
    assert_eq!(parse_pattern("0xff"), Ok(255));
    assert_eq!(parse_pattern("0"), Ok(0));
    assert_eq!(parse_pattern("017"), Ok(15));
    assert!(parse_pattern("256").is_err());
    assert!(parse_pattern("-1").is_err());
    assert!(parse_pattern("09").is_err());
}

#[test]
fn cvtstr_and_timing_like_qemu_io() {
    assert_eq!(cvtstr(4096.0), "4 KiB");
    assert_eq!(cvtstr(1536.0), "1.500 KiB");
    assert_eq!(cvtstr(512.0), "512 bytes");
    assert_eq!(cvtstr(65536.0), "64 KiB");
    assert_eq!(cvtstr(2.33 * 1048576.0), "2.330 MiB");
    // 4 KiB in 1/512 s: 2 MiB/s.
    let line = timing_line(4096, 1, Duration::from_nanos(1_953_125));
    assert_eq!(
        line,
        "4 KiB, 1 ops; 00.00 sec (2 MiB/sec and 512.0000 ops/sec)"
    );
    let line = timing_line(1 << 30, 1, Duration::from_millis(61_500));
    assert!(line.starts_with("1 GiB, 1 ops; 0:01:01.50 ("), "{line}");
}

#[test]
fn executes_on_an_image_and_reports_like_qemu_io() {
    let img = Image::create_in(
        std::sync::Arc::new(qcowx_core::storage::MemStorage::new()),
        &CreateOptions::new(16 << 20),
    )
    .unwrap();
    // Longer than one chunk, not chunk-aligned.
    let len = IO_CHUNK as u64 + 4096 + 100;
    let w = IoCommand::parse(&format!("write -P 0x11 100 {len}"))
        .unwrap()
        .execute(&img)
        .unwrap();
    assert_eq!(
        w.lines()[0],
        format!("wrote {len}/{len} bytes at offset 100")
    );
    assert_eq!(w.lines().len(), 2);
    let r = IoCommand::parse(&format!("read -P 0x11 100 {len}"))
        .unwrap()
        .execute(&img)
        .unwrap();
    assert!(!r.failed());
    assert_eq!(
        r.lines()[0],
        format!("read {len}/{len} bytes at offset 100")
    );
    // One byte changed past the first chunk: found, at its exact offset.
    let at = 100 + IO_CHUNK as u64 + 7;
    img.write_at(&[0x12], at).unwrap();
    let r = IoCommand::parse(&format!("read -q -P 0x11 100 {len}"))
        .unwrap()
        .execute(&img)
        .unwrap();
    assert!(r.failed());
    assert_eq!(r.mismatch, Some(at));
    assert_eq!(
        r.lines(),
        vec![format!(
            "Pattern verification failed at offset 100, {len} bytes"
        )]
    );
    let z = IoCommand::parse("write -z -u 0 64k")
        .unwrap()
        .execute(&img)
        .unwrap();
    assert_eq!(z.lines()[0], "wrote 65536/65536 bytes at offset 0");
    let mut buf = vec![1u8; 65536];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let d = IoCommand::parse("discard 1M 1M")
        .unwrap()
        .execute(&img)
        .unwrap();
    assert_eq!(
        d.lines()[0],
        "discard 1048576/1048576 bytes at offset 1048576"
    );
    let r = IoCommand::parse("read -P 0 1M 1M")
        .unwrap()
        .execute(&img)
        .unwrap();
    assert!(!r.failed());
    let f = IoCommand::Flush.execute(&img).unwrap();
    assert!(f.lines().is_empty());
    assert!(IoCommand::parse("write -q 0 1")
        .unwrap()
        .execute(&img)
        .unwrap()
        .lines()
        .is_empty());
}

#[test]
fn refuses_requests_past_the_end_before_touching_the_disk() {
    let img = Image::create_in(
        std::sync::Arc::new(qcowx_core::storage::MemStorage::new()),
        &CreateOptions::new(1 << 20),
    )
    .unwrap();
    // Would write the first chunk, then fail, if not checked up front.
    let cmd = IoCommand::parse("write -P 9 0 8M").unwrap();
    let err = cmd.execute(&img).unwrap_err();
    assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
    let mut b = [7u8; 1];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0]);
    for c in ["read 1M 1", "write -z 1020k 8k", "discard 0 2M"] {
        let err = IoCommand::parse(c).unwrap().execute(&img).unwrap_err();
        assert!(matches!(err, Error::OutOfRange { .. }), "{c}: {err}");
    }
    // Exactly up to the end is fine.
    assert!(IoCommand::parse("read 1020k 4k")
        .unwrap()
        .execute(&img)
        .is_ok());
}

#[test]
fn snapshots_read_but_refuse_writes() {
    let img = std::sync::Arc::new(
        Image::create_in(
            std::sync::Arc::new(qcowx_core::storage::MemStorage::new()),
            &CreateOptions::new(1 << 20),
        )
        .unwrap(),
    );
    IoCommand::parse("write -P 3 0 64k")
        .unwrap()
        .execute(&*img)
        .unwrap();
    img.snapshot("default", "s").unwrap();
    IoCommand::parse("write -P 4 0 64k")
        .unwrap()
        .execute(&*img)
        .unwrap();
    let snap = img.open_root("s").unwrap();
    let r = IoCommand::parse("read -P 3 0 64k")
        .unwrap()
        .execute(&snap)
        .unwrap();
    assert!(!r.failed());
    let err = IoCommand::parse("write 0 1")
        .unwrap()
        .execute(&snap)
        .unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }), "{err}");
    let head = img.open_root("default").unwrap();
    assert!(!IoCommand::parse("read -P 4 0 64k")
        .unwrap()
        .execute(&head)
        .unwrap()
        .failed());
}
