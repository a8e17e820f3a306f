//! End-to-end tests of how the `qcowx` binary exits: missing and non-qcow2 files named
//! with exit 1, a closed stdout as a clean exit, `--help` and `--version` with exit 0,
//! unknown commands and options with exit 2.

use qcowx_tests::cli::*;

#[test]
fn missing_files_are_named_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["info", "missing.qcow2"][..],
        &["info", "--output=json", "missing.qcow2"][..],
        &["check", "missing.qcow2"][..],
        &["check", "--repair", "missing.qcow2"][..],
        &["export", "missing.qcow2", "out.raw"][..],
    ] {
        let out = qcowx(d, args);
        assert_code(&out, 1, &format!("{args:?}"));
        let err = stderr(&out);
        assert!(err.starts_with("qcowx: "), "{args:?}: {err}");
        assert!(err.contains("missing.qcow2"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", stdout(&out));
    }
    assert!(!d.join("out.raw").exists());
    // Not a qcow2 image: the header error names the file.
    std::fs::write(d.join("junk.img"), vec![7u8; 4096]).unwrap();
    let out = qcowx(d, &["info", "junk.img"]);
    assert_code(&out, 1, "info junk.img");
    assert!(stderr(&out).contains("junk.img"), "{}", stderr(&out));
}

#[test]
fn a_closed_stdout_is_a_clean_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert_ok(
        &qemu_img(d, &["create", "-f", "qcow2", "p.qcow2", "1M"]),
        "create",
    );
    for args in [
        &["info", "p.qcow2"][..],
        &["info", "--output=json", "p.qcow2"][..],
        &["check", "p.qcow2"][..],
    ] {
        ok_into_closed_stdout(d, args);
    }
}

#[test]
fn help_and_version_exit_0_and_unknown_commands_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = qcowx(d, &["--help"]);
    assert_code(&out, 0, "--help");
    for cmd in ["create", "info", "check", "export"] {
        assert!(stdout(&out).contains(cmd), "{}", stdout(&out));
    }
    assert_code(&qcowx(d, &["--version"]), 0, "--version");
    assert_code(&qcowx(d, &["frobnicate"]), 2, "unknown command");
    assert_code(&qcowx(d, &[]), 2, "no command");
    assert_code(&qcowx(d, &["info", "--output=xml", "x"]), 2, "bad --output");
}
