//! Snapshot table entries whose name is not UTF-8: QEMU takes any bytes, qcowx reads
//! them with replacement characters, which write back longer. Offsets into the file's
//! table computed from such entries are wrong, so qcowx must move the table rather than
//! append to it or patch a flag in place (a fuzzed image once lost its table that way).

use qcowx_tests::cli::stderr;
use qcowx_tests::damaged::{Case, IMAGE};
use qcowx_tests::qemu_check;

const M4: u64 = 4 << 20;

/// A QEMU image with data and snapshots `snapA` (whose name's bytes then become 0xff,
/// not UTF-8, same length) and `snapB`; qcowx's own snapshot `mine` when `with_mine`.
fn image(name: &str, with_mine: bool) -> Case {
    let c = Case::create(name, M4, "");
    c.qemu_io(&["write -P 0x41 0 64k"]);
    c.qemu_img(&["snapshot", "-c", "snapA", IMAGE]);
    c.qemu_io(&["write -P 0x42 64k 64k"]);
    if with_mine {
        let out = c.qcowx(&["snapshot", IMAGE, "mine"]);
        qcowx_tests::cli::assert_ok(&out, "qcowx snapshot mine");
    }
    c.qemu_img(&["snapshot", "-c", "snapB", IMAGE]);
    c.qemu_io(&["write -P 0x43 128k 64k"]);
    let (start, mut entries) = c.snapshot_table();
    let e = &mut entries[0];
    assert!(e.id_name.ends_with(b"snapA"), "oracle: entry 0 is snapA");
    // Five bytes that write back as fifteen: past the entry's padding.
    let at = e.id_name.len() - 5;
    e.id_name[at..].fill(0xff);
    c.write_snapshot_table(start, &entries);
    qemu_check(&c.img).assert_clean("oracle: a name of any bytes");
    c
}

/// The snapshots QEMU lists, by name bytes as `qemu-img snapshot -l` prints them.
fn listed(c: &Case) -> String {
    let out = c.qemu_img(&["snapshot", "-l", IMAGE]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_snapshot_appended_after_a_name_that_is_not_utf8_lands_whole() {
    let c = image("non-utf8-append", false);
    let before = (
        c.qemu_reads(IMAGE, Some("snapB")),
        c.qemu_reads(IMAGE, None),
    );
    let out = c.qcowx(&["snapshot", IMAGE, "s1"]);
    qcowx_tests::cli::assert_ok(&out, "qcowx snapshot s1");
    qemu_check(&c.img).assert_clean("after qcowx appended a snapshot");
    let list = listed(&c);
    assert!(
        list.contains("snapB") && list.contains("s1"),
        "QEMU lists:\n{list}"
    );
    assert!(c.qemu_reads(IMAGE, Some("snapB")) == before.0);
    assert!(c.qemu_reads(IMAGE, Some("s1")) == before.1);
    // And again: the table qcowx wrote is its own now.
    let out = c.qcowx(&["snapshot", IMAGE, "s2"]);
    qcowx_tests::cli::assert_ok(&out, "qcowx snapshot s2");
    qemu_check(&c.img).assert_clean("after a second snapshot");
    assert!(listed(&c).contains("s2"));
}

#[test]
fn a_flag_written_after_a_name_that_is_not_utf8_lands_on_its_entry() {
    let c = image("non-utf8-flags", true);
    let snap_b = c.qemu_reads(IMAGE, Some("snapB"));
    // Deleting marks qcowx's entry with a flag: written into the entry, at an offset
    // computed from the entries before it.
    let out = c.qcowx(&["delete", "--snapshot", "mine", IMAGE]);
    qcowx_tests::cli::assert_ok(&out, "qcowx delete mine");
    qemu_check(&c.img).assert_clean("after qcowx flagged an entry");
    let out = c.qcowx(&["list", IMAGE]);
    qcowx_tests::cli::assert_ok(&out, "qcowx list");
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !list.contains("mine") && list.contains("snapB"),
        "qcowx lists:\n{list}"
    );
    // The entry itself is whole: QEMU lists it, by its name, until gc removes it.
    let list = listed(&c);
    assert!(
        list.contains("mine") && list.contains("snapB"),
        "QEMU lists:\n{list}"
    );
    assert!(c.qemu_reads(IMAGE, Some("snapB")) == snap_b);
    let out = c.qcowx(&["gc", IMAGE]);
    qcowx_tests::cli::assert_ok(&out, "qcowx gc");
    qemu_check(&c.img).assert_clean("after gc");
    let list = listed(&c);
    assert!(
        !list.contains("mine") && list.contains("snapB"),
        "QEMU lists after gc:\n{list}"
    );
    assert!(c.qemu_reads(IMAGE, Some("snapB")) == snap_b);
}
