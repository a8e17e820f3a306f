//! `compare -s` (strict mode) against `qemu-img compare -s`: the same files, made by
//! QEMU's tools, compared by both; the exit status and the message must agree. Strict
//! mode tells sizes and block status apart, as QEMU's does: data against zeros, a zero
//! cluster against an unallocated one, stored against compressed, and a run that
//! reaches the end of the disk against one that does not. (Plain `compare`:
//! `cli_map_convert.rs`.)

use qcowx_tests::cli::*;

#[test]
fn strict_compare_agrees_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let create = |name: &str, size: &str, cmds: &[&str]| {
        qemu_ok(d, &["create", "-f", "qcow2", name, size]);
        if !cmds.is_empty() {
            qemu_io(d, "qcow2", name, cmds);
        }
    };
    // Data, a zero cluster, zeros written as data.
    create(
        "mixed.qcow2",
        "4M",
        &["write -P 1 0 64k", "write -z 1M 64k", "write -P 0 2M 64k"],
    );
    qemu_ok(d, &["convert", "-O", "qcow2", "mixed.qcow2", "flat.qcow2"]);
    qemu_ok(d, &["convert", "-O", "raw", "mixed.qcow2", "mixed.raw"]);
    qemu_ok(
        d,
        &["convert", "-S", "0", "-O", "raw", "mixed.qcow2", "full.raw"],
    );
    qemu_ok(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "mixed.qcow2",
            "packed.qcow2",
        ],
    );
    create("big.qcow2", "8M", &[]);
    create("head.qcow2", "4M", &["write -P 1 0 64k"]);
    // The unallocated run after the data stops short of the end.
    std::fs::copy(d.join("flat.qcow2"), d.join("capped.qcow2")).unwrap();
    qemu_io(d, "qcow2", "capped.qcow2", &["write -z 4032k 64k"]);
    create(
        "two2.qcow2",
        "4M",
        &["write -P 1 0 64k", "write -P 1 2M 64k"],
    );
    create(
        "two3.qcow2",
        "4M",
        &["write -P 1 0 64k", "write -P 1 3M 64k"],
    );

    let pairs = [
        ("mixed.qcow2", "mixed.qcow2", 0),
        ("mixed.qcow2", "flat.qcow2", 1),
        ("flat.qcow2", "head.qcow2", 0),
        ("mixed.qcow2", "mixed.raw", 1),
        ("mixed.raw", "full.raw", 1),
        ("head.qcow2", "packed.qcow2", 1),
        ("mixed.qcow2", "big.qcow2", 1),
        ("flat.qcow2", "mixed.raw", 1),
        ("full.raw", "full.raw", 0),
        ("flat.qcow2", "capped.qcow2", 1),
        ("two2.qcow2", "two3.qcow2", 1),
        ("packed.qcow2", "packed.qcow2", 0),
    ];
    for (a, b, code) in pairs {
        let theirs = qemu_img(d, &["compare", "-s", a, b]);
        let ours = qcowx(d, &["compare", "-s", a, b]);
        assert_code(&theirs, code, &format!("qemu-img compare -s {a} {b}"));
        assert_code(&ours, code, &format!("qcowx compare -s {a} {b}"));
        assert_eq!(stdout(&ours), stdout(&theirs), "compare -s {a} {b}");
    }
    // Without -s the same pairs with equal contents are identical.
    for (a, b) in [("mixed.qcow2", "flat.qcow2"), ("mixed.raw", "full.raw")] {
        assert_code(
            &qcowx(d, &["compare", a, b]),
            0,
            &format!("compare {a} {b}"),
        );
    }
    // The JSON says what kind of difference it is.
    let v = json(&qcowx(
        d,
        &["compare", "-s", "--output=json", "mixed.qcow2", "big.qcow2"],
    ));
    assert_eq!(v["mismatch-kind"], "size");
    assert_eq!(v["mismatch-offset"], serde_json::Value::Null);
    let v = json(&qcowx(
        d,
        &["compare", "-s", "--output=json", "mixed.raw", "full.raw"],
    ));
    assert_eq!(
        (v["mismatch-kind"].as_str(), v["mismatch-offset"].as_u64()),
        (Some("block-status"), Some(0))
    );
}
