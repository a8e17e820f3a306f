//! `convert` with several sources, which qemu-img writes one after the other into one
//! output: each command line runs under both tools in two folders holding the same
//! files, and the outputs are compared.

use qcowx_tests::cli::*;

/// Three sources in both folders: a qcow2 image with data, a zero cluster and a hole;
/// a raw file with data after a hole; a small qcow2 image with 4 KiB clusters whose
/// size is not a multiple of 64 KiB.
fn sources(t: &Twins) {
    t.prepare(&["create", "-f", "qcow2", "a.qcow2", "3M"]);
    t.prepare_io(
        "qcow2",
        "a.qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -z 1M 64k",
            "write -P 0x12 2M 512k",
        ],
    );
    t.prepare(&["create", "-f", "raw", "b.raw", "1536K"]);
    t.prepare_io("raw", "b.raw", &["write -P 0x22 512k 512k"]);
    t.prepare(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "c.qcow2",
        "100k",
    ]);
    t.prepare_io("qcow2", "c.qcow2", &["write -P 0x33 4k 8k"]);
}

#[test]
fn several_sources_are_concatenated_as_qemu_img_does() {
    let t = Twins::new();
    sources(&t);
    for (fmt, out) in [("raw", "out.raw"), ("qcow2", "out.qcow2")] {
        t.both(
            &["convert", "-O", fmt, "a.qcow2", "b.raw", "c.qcow2", out],
            Some(0),
        );
        let (q, x) = t.contents(out);
        assert_eq!(x.len(), (3 << 20) + (1536 << 10) + (100 << 10), "{out}");
        assert!(q == x, "{out}: the outputs differ");
        // Each source where the one before it ends.
        assert!(x[..1 << 20].iter().all(|&b| b == 0x11));
        let b = 3 << 20;
        assert!(x[b + (512 << 10)..b + (1 << 20)].iter().all(|&b| b == 0x22));
        let c = b + (1536 << 10);
        assert!(x[c + 4096..c + 12288].iter().all(|&b| b == 0x33));
        let (qi, xi) = t.infos(out);
        assert_eq!(xi["virtual-size"], qi["virtual-size"], "{out}");
    }
    assert_qemu_check_clean(&t.qcowx, "out.qcow2");
    // The holes stay holes: the same map, sources' zeros included.
    let map = |d: &std::path::Path| qemu_ok(d, &["map", "--output=json", "out.qcow2"]).stdout;
    assert_eq!(map(&t.qemu), map(&t.qcowx));

    // Compressed, and into an existing output (-n).
    t.both(
        &[
            "convert", "-c", "-O", "qcow2", "a.qcow2", "c.qcow2", "z.qcow2",
        ],
        Some(0),
    );
    let (q, x) = t.contents("z.qcow2");
    assert!(q == x, "compressed outputs differ");
    assert_qemu_check_clean(&t.qcowx, "z.qcow2");
    t.prepare(&["create", "-f", "raw", "n.raw", "8M"]);
    t.both(&["convert", "-n", "b.raw", "a.qcow2", "n.raw"], Some(0));
    let (q, x) = t.files("n.raw");
    assert!(q == x, "-n outputs differ");
}

#[test]
fn several_sources_refuse_what_needs_one() {
    let t = Twins::new();
    sources(&t);
    t.prepare(&["snapshot", "-c", "s", "a.qcow2"]);
    // The snapshot, bitmaps and backing layer of which source? Refused, no output.
    for args in [
        &["convert", "-l", "s", "a.qcow2", "c.qcow2", "o.raw"][..],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "a.qcow2",
            "c.qcow2",
            "o.raw",
        ][..],
        &[
            "convert", "-O", "qcow2", "-B", "a.qcow2", "-F", "qcow2", "a.qcow2", "c.qcow2", "o.raw",
        ][..],
    ] {
        let out = qcowx(&t.qcowx, args);
        assert_code(&out, 2, &format!("{args:?}"));
        assert!(
            stderr(&out).contains("single source"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!t.qcowx.join("o.raw").exists(), "{args:?} wrote an output");
    }
    // An output that is one of the sources is refused, and the source kept.
    let before = std::fs::read(t.qcowx.join("b.raw")).unwrap();
    let out = qcowx(&t.qcowx, &["convert", "c.qcow2", "b.raw", "b.raw"]);
    assert_code(&out, 1, "an output that is a source");
    assert!(stderr(&out).contains("source"), "{}", stderr(&out));
    assert!(std::fs::read(t.qcowx.join("b.raw")).unwrap() == before);
}
