//! End-to-end tests of `qcowx io` against `qemu-io`: the same writes and output, read
//! pattern mismatches, and bad commands refused before the image is touched.

mod common;
use common::{create, io};

use qcowx_tests::cli::*;

#[test]
fn io_writes_what_qemu_io_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cmds = [
        "write -P 0x5a 0 1M",
        "write 1536 3000",
        "write -P 7 0x100000 0x10000",
        "w -P 255 2.5M 4k",
        "write -z 64k 64k",
        "write -z -u 512k 128k",
        "write -z 600000 1000",
        "discard 768k 64k",
        "flush",
        "write -P 9 16773120 4k",
    ];
    ok(d, &["create", "ours.qcow2", "16M"]);
    assert_ok(
        &qemu_img(d, &["create", "-f", "qcow2", "theirs.qcow2", "16M"]),
        "qemu-img create",
    );
    let mut args = vec!["io", "ours.qcow2"];
    let mut qargs = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c]);
        qargs.extend(["-c", c]);
    }
    qargs.push("theirs.qcow2");
    let ours = ok(d, &args);
    let theirs = run("qemu-io", &qargs, d);
    assert_ok(&theirs, "qemu-io");
    // The same lines, but for the timing ones.
    let strip = |s: String| -> Vec<String> {
        s.lines()
            .filter(|l| !l.contains(" ops; "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(strip(stdout(&ours)), strip(stdout(&theirs)));
    assert_eq!(
        stdout(&ours)
            .lines()
            .filter(|l| l.contains(" ops; "))
            .count(),
        cmds.len() - 1,
        "one timing line per command but flush"
    );
    let cmp = qemu_img(d, &["compare", "ours.qcow2", "theirs.qcow2"]);
    assert_code(&cmp, 0, "qemu-img compare ours theirs");
    assert_qemu_check_clean(d, "ours.qcow2");
    // qemu-io reads qcowx's writes.
    let out = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5a 0 1536",
            "-c",
            "read -P 0xcd 1536 3000",
            "-c",
            "read -P 0 64k 64k",
            "-c",
            "read -P 255 2560k 4k",
            "ours.qcow2",
        ],
        d,
    );
    assert_ok(&out, "qemu-io read");
    assert!(
        !stdout(&out).contains("verification failed"),
        "{}",
        stdout(&out)
    );
    // -q prints nothing.
    let out = io(
        d,
        "ours.qcow2",
        None,
        &["write -q -P 1 0 4k", "read -q -P 1 0 4k"],
    );
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
}

#[test]
fn io_read_pattern_mismatch_fails_like_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "p.qcow2", "4M");
    io(
        d,
        "p.qcow2",
        None,
        &["write -P 0x5a 0 64k", "write -P 0x5b 8k 1"],
    );
    let args = [
        "io",
        "p.qcow2",
        "-c",
        "read -P 0x5a 0 64k",
        "-c",
        "write -P 0x66 1M 4k",
    ];
    let out = qcowx(d, &args);
    assert_code(&out, 1, "read -P mismatch");
    let text = stdout(&out);
    assert!(
        text.starts_with(
            "Pattern verification failed at offset 0, 65536 bytes\nread 65536/65536 bytes at offset 0\n"
        ),
        "{text}"
    );
    assert!(stderr(&out).contains("offset 8192"), "{}", stderr(&out));
    // Like qemu-io, the next command still ran.
    assert!(
        text.contains("wrote 4096/4096 bytes at offset 1048576"),
        "{text}"
    );
    io(d, "p.qcow2", None, &["read -P 0x66 1M 4k"]);
    // qemu-io reports the same for the same content.
    let q = run(
        "qemu-io",
        &["-f", "qcow2", "-r", "-c", "read -P 0x5a 0 64k", "p.qcow2"],
        d,
    );
    assert_code(&q, 1, "qemu-io read -P mismatch");
    assert!(stdout(&q).starts_with("Pattern verification failed at offset 0, 65536 bytes"));
    // A matching read exits 0.
    io(
        d,
        "p.qcow2",
        None,
        &["read -P 0x5a 0 8k", "read -P 0x5b 8k 1"],
    );
}

#[test]
fn io_rejects_bad_commands_before_touching_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "b.qcow2", "4M");
    ok(d, &["snapshot", "b.qcow2", "s"]);
    let before = std::fs::read(d.join("b.qcow2")).unwrap();
    for (cmd, why) in [
        ("frob 0 1", "unknown command 'frob'"),
        ("write -x 0 1", "option -x is not supported"),
        ("write -P 300 0 1", "not a valid pattern byte"),
        ("write 0 1Q", "invalid number"),
        ("write -z -P 1 0 1", "-z and -P"),
        ("read 0", "expected OFFSET and LEN"),
        ("", "empty command"),
    ] {
        // A valid command first: nothing runs when any command is bad.
        let out = qcowx(d, &["io", "b.qcow2", "-c", "write 0 4k", "-c", cmd]);
        assert_code(&out, 2, &format!("io -c {cmd:?}"));
        assert!(stderr(&out).contains(why), "{cmd:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty());
    }
    usage_error(d, &["io", "b.qcow2"]);
    usage_error(d, &["io", "-c", "flush"]);
    assert!(
        std::fs::read(d.join("b.qcow2")).unwrap() == before,
        "image changed"
    );

    // Past the end of the disk: exit 1, nothing written, later commands still run.
    let out = qcowx(
        d,
        &[
            "io",
            "b.qcow2",
            "-c",
            "write -P 1 4190208 8k",
            "-c",
            "write -P 2 0 4k",
        ],
    );
    assert_code(&out, 1, "write past the end");
    assert!(
        stderr(&out).contains("past the end of the disk"),
        "{}",
        stderr(&out)
    );
    io(
        d,
        "b.qcow2",
        None,
        &["read -P 0 4190208 4k", "read -P 2 0 4k"],
    );
    // A snapshot cannot be written, and the error says how to get a writable VDI.
    fails(
        d,
        &["io", "--vdi", "s", "b.qcow2", "-c", "write 0 1"],
        &["b.qcow2", "read-only", "qcowx fork b.qcow2 s NEW_VDI"],
    );
    fails(
        d,
        &["io", "--vdi", "nope", "b.qcow2", "-c", "read 0 1"],
        &["b.qcow2", "'nope' not found", "qcowx list b.qcow2"],
    );
    assert_qemu_check_clean(d, "b.qcow2");
}
