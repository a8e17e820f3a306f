//! End-to-end tests of `qcowx import`, `tree`, `map`, `resize`, `rename`, `compare`,
//! `convert`, `completions` and `man`, the shared behaviour (`-q`, progress bars,
//! exit codes, broken pipes), and every command's JSON against the key tables of
//! `spec/cli-json.md`. QEMU's `qemu-img` and `qemu-io` are the oracle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use qcowx_tests::cli::*;
use serde_json::Value;

const QCOWX: &str = env!("CARGO_BIN_EXE_qcowx");
const CS: u64 = 65536;

/// Asserts that `got` reads as `want`: equal over `want`'s length and zeros after
/// (`qemu-img convert -l` writes a snapshot at the image's current size).
fn assert_reads_as(got: &[u8], want: &[u8], what: &str) {
    assert!(
        got.len() >= want.len(),
        "{what}: {} < {}",
        got.len(),
        want.len()
    );
    if let Some(i) = got[..want.len()].iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: {} != {}",
            got[i], want[i]
        );
    }
    assert!(
        got[want.len()..].iter().all(|&b| b == 0),
        "{what}: non-zero bytes past the layer's size"
    );
}

/// Whether the tests run as root (chmod does not stop root).
fn is_root(d: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let p = d.join("root-probe");
    std::fs::write(&p, b"x").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
    let writable = std::fs::OpenOptions::new().write(true).open(&p).is_ok();
    std::fs::remove_file(&p).unwrap();
    writable
}

// ---- import ------------------------------------------------------------------------

/// Builds `base.{raw,qcow2}` <- `l1.qcow2` <- … <- `l{depth}.qcow2` in `d` with
/// `qemu-img create -b` and `qemu-io` writes: data, zeroed clusters over data from
/// below, zeroed partial clusters, a few layers with 4 KiB clusters and one that grows
/// the disk. Returns the files, bottom first.
fn make_chain(d: &Path, raw_base: bool, depth: usize) -> Vec<String> {
    let size = 1u64 << 20;
    let base = if raw_base { "base.raw" } else { "base.qcow2" };
    let fmt = if raw_base { "raw" } else { "qcow2" };
    qemu_ok(d, &["create", "-f", fmt, base, &size.to_string()]);
    qemu_io(
        d,
        fmt,
        base,
        &[
            "write -P 0xb0 0 192k",
            "write -P 0xb1 700k 8k",
            "write -P 0xb2 960k 64k",
        ],
    );
    let mut files = vec![base.to_string()];
    let mut cur_size = size;
    for i in 1..=depth {
        let name = format!("l{i}.qcow2");
        let (prev, prev_fmt) = (files[i - 1].clone(), if i == 1 { fmt } else { "qcow2" });
        // One layer in the middle grows the disk by half.
        if i == depth.div_ceil(2) && depth > 1 {
            cur_size += size / 2;
        }
        let cluster = if i % 4 == 1 {
            "cluster_size=4096"
        } else {
            "cluster_size=65536"
        };
        qemu_ok(
            d,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                cluster,
                "-b",
                &prev,
                "-F",
                prev_fmt,
                &name,
                &cur_size.to_string(),
            ],
        );
        let k = i as u64;
        let data_at = (k * 37 % 16) * CS + (k % 3) * 4096;
        let data_len = 4096 * (1 + k % 17);
        let zero_at = (k * 11 % 16) * CS;
        let partial_zero = ((k * 5 + 3) % 16) * CS + 1024;
        let mut cmds = vec![
            format!("write -P {} {data_at} {data_len}", 0x10 + (k % 200)),
            format!("write -z {zero_at} 64k"),
            format!("write -z {partial_zero} 512"),
        ];
        if cur_size > size {
            cmds.push(format!(
                "write -P {} {} 4k",
                0x20 + (k % 200),
                size + k * 4096
            ));
        }
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(d, "qcow2", &name, &cmds);
        files.push(name);
    }
    files
}

/// Imports the chain under its top, then checks every snapshot against `qemu-img
/// convert` of its layer, the default VDI against the top, and the image with
/// `qemu-img check`. `extra` goes on the command line.
fn import_and_verify(d: &Path, files: &[String], extra: &[&str]) {
    let top = files.last().unwrap();
    let mut args = vec!["import", "--output=json", top, "out.qcow2"];
    args.extend(extra);
    let out = ok_quiet(d, &args);
    // Nothing is left under the temporary name.
    let names: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("qcowx-import")),
        "{names:?}"
    );
    let report = json(&out);
    let layers = report["layers"].as_array().unwrap();
    assert_eq!(layers.len(), files.len(), "{report:#}");
    assert_eq!(report["snapshots"], (files.len() - 1) as u64);
    assert_eq!(report["filename"], "out.qcow2");
    assert_eq!(report["top"], top.as_str());
    assert_qemu_check_clean(d, "out.qcow2");
    let info = json(&qemu_ok(d, &["info", "--output=json", "out.qcow2"]));
    assert!(info.get("backing-filename").is_none(), "{info:#}");
    let top_info = json(&qemu_ok(d, &["info", "--output=json", top]));
    assert_eq!(info["cluster-size"], top_info["cluster-size"]);
    assert_eq!(info["virtual-size"], top_info["virtual-size"]);
    // Snapshot names: the file stems, bottom first, in the table in that order.
    let list = json(&ok_quiet(d, &["list", "--output=json", "out.qcow2"]));
    let roots = list["roots"].as_array().unwrap();
    assert_eq!(roots.len(), files.len());
    for (i, file) in files[..files.len() - 1].iter().enumerate() {
        let stem = file.rsplit_once('.').unwrap().0;
        assert_eq!(layers[i]["snapshot"], stem, "{report:#}");
        assert_eq!(layers[i]["filename"], file.as_str());
        assert_eq!(roots[i + 1]["name"], stem);
        assert_eq!(roots[i + 1]["kind"], "snapshot");
        let parent = if i == 0 {
            Value::Null
        } else {
            Value::from(files[i - 1].rsplit_once('.').unwrap().0)
        };
        assert_eq!(roots[i + 1]["parent"], parent, "{list:#}");
        let want = qemu_raw(d, file, None);
        let got = qemu_raw(d, "out.qcow2", Some(stem));
        assert_reads_as(&got, &want, &format!("snapshot {stem} vs {file}"));
        assert_eq!(roots[i + 1]["virtual-size"], want.len() as u64);
    }
    assert_eq!(layers.last().unwrap()["snapshot"], Value::Null);
    let cmp = qemu_img(d, &["compare", "out.qcow2", top]);
    assert_code(&cmp, 0, "qemu-img compare out.qcow2 TOP");
}

#[test]
fn import_chains_of_depth_1_over_raw_and_qcow2_bases() {
    for raw in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let files = make_chain(dir.path(), raw, 1);
        import_and_verify(dir.path(), &files, &[]);
    }
}

#[test]
fn import_chains_of_depth_8_over_raw_and_qcow2_bases() {
    for raw in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let files = make_chain(dir.path(), raw, 8);
        import_and_verify(dir.path(), &files, &[]);
    }
}

/// `--no-sync` leaves the disk to the kernel; the image it writes is the same.
#[test]
fn import_without_sync_writes_the_same_image() {
    for raw in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let files = make_chain(dir.path(), raw, 8);
        import_and_verify(dir.path(), &files, &["--no-sync"]);
    }
}

#[test]
fn import_chain_of_depth_64_over_a_raw_base() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_chain(dir.path(), true, 64);
    import_and_verify(dir.path(), &files, &[]);
}

#[test]
fn import_chain_of_depth_64_over_a_qcow2_base() {
    let dir = tempfile::tempdir().unwrap();
    let files = make_chain(dir.path(), false, 64);
    import_and_verify(dir.path(), &files, &[]);
}

#[test]
fn import_of_a_lone_image_and_human_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A raw file alone: no snapshots, the default VDI reads as the file.
    qemu_ok(d, &["create", "-f", "raw", "disk.raw", "2M"]);
    qemu_io(d, "raw", "disk.raw", &["write -P 0x61 1M 100k"]);
    let out = ok_quiet(d, &["import", "disk.raw", "a.qcow2"]);
    let text = stdout(&out);
    assert!(
        text.contains("disk.raw (raw, 2 MiB) -> default VDI"),
        "{text}"
    );
    assert!(text.contains("Imported 1 layers into 'a.qcow2'"), "{text}");
    assert_code(
        &qemu_img(d, &["compare", "a.qcow2", "disk.raw"]),
        0,
        "compare",
    );
    let info = json(&qemu_ok(d, &["info", "--output=json", "a.qcow2"]));
    assert_eq!(info["cluster-size"], 65536);
    assert!(info.get("snapshots").is_none());
    assert_qemu_check_clean(d, "a.qcow2");
    // Names are sanitized and made unique.
    qemu_ok(d, &["create", "-f", "qcow2", "my disk.qcow2", "1M"]);
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "my disk.qcow2",
            "-F",
            "qcow2",
            "default.img",
            "1M",
        ],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "default.img",
            "-F",
            "qcow2",
            "t.qcow2",
            "1M",
        ],
    );
    let v = json(&ok_quiet(
        d,
        &["import", "--output=json", "t.qcow2", "b.qcow2"],
    ));
    assert_eq!(v["layers"][0]["snapshot"], "my_disk");
    assert_eq!(v["layers"][1]["snapshot"], "default-2");
    // -q: nothing on stdout.
    let out = ok_quiet(d, &["-q", "import", "t.qcow2", "c.qcow2"]);
    assert!(out.stdout.is_empty());
}

#[test]
fn import_errors_name_the_file_and_leave_the_chain_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = make_chain(d, false, 2);
    // A layer in use by a writer is refused (the holder itself may write the file:
    // the unchanged-chain check below starts after it is closed).
    let held = qcowx_core::Image::open_rw(d.join("l1.qcow2")).unwrap();
    fails_quiet(
        d,
        1,
        &["import", "l2.qcow2", "o.qcow2"],
        &["l1.qcow2", "lock"],
    );
    held.close().unwrap();
    drop(held);
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(d.join(f)).unwrap())
        .collect();
    fails_quiet(
        d,
        1,
        &["import", "missing.qcow2", "o.qcow2"],
        &["missing.qcow2"],
    );
    assert!(!d.join("o.qcow2").exists());
    // The output may not be a file of the chain.
    for target in ["base.qcow2", "l1.qcow2", "l2.qcow2"] {
        fails_quiet(
            d,
            1,
            &["import", "l2.qcow2", target],
            &[target, "a file of the chain"],
        );
    }
    // A missing backing file is named.
    std::fs::rename(d.join("base.qcow2"), d.join("gone.qcow2")).unwrap();
    fails_quiet(d, 1, &["import", "l2.qcow2", "o.qcow2"], &["base.qcow2"]);
    std::fs::rename(d.join("gone.qcow2"), d.join("base.qcow2")).unwrap();
    for (f, b) in files.iter().zip(&before) {
        assert!(std::fs::read(d.join(f)).unwrap() == *b, "{f} changed");
    }
    // A layer smaller than the one below it is refused, naming both.
    qemu_ok(d, &["create", "-f", "qcow2", "big.qcow2", "4M"]);
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "big.qcow2",
            "-F",
            "qcow2",
            "small.qcow2",
            "2M",
        ],
    );
    fails_quiet(
        d,
        1,
        &["import", "small.qcow2", "o2.qcow2"],
        &["small.qcow2", "big.qcow2", "smaller"],
    );
    // Usage errors.
    usage_error(d, &["import", "l2.qcow2"]);
    usage_error(d, &["import", "--output=xml", "l2.qcow2", "o.qcow2"]);
    // No failed import leaves its temporary file behind.
    let stray: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("qcowx-import"))
        .collect();
    assert!(stray.is_empty(), "left behind: {stray:?}");
}

#[test]
fn import_replaces_an_output_only_when_done_and_not_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = make_chain(d, false, 2);
    // An output in use by another writer is refused and left alone.
    qemu_ok(d, &["create", "-f", "qcow2", "out.qcow2", "1M"]);
    let before = std::fs::read(d.join("out.qcow2")).unwrap();
    let held = qcowx_core::Image::open_rw(d.join("out.qcow2")).unwrap();
    let top = files.last().unwrap().as_str();
    fails_quiet(d, 1, &["import", top, "out.qcow2"], &["out.qcow2", "lock"]);
    held.close().unwrap();
    drop(held);
    assert!(std::fs::read(d.join("out.qcow2")).unwrap() == before);
    // A free one is replaced by the complete import.
    import_and_verify(d, &files, &[]);
    let stray: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("qcowx-import"))
        .collect();
    assert!(stray.is_empty(), "left behind: {stray:?}");
}

// ---- tree --------------------------------------------------------------------------

/// Parses `tree --dot` output: node ids and edges.
fn parse_dot(text: &str) -> (BTreeSet<String>, BTreeSet<(String, String)>) {
    /// Reads a quoted DOT string at the start of `s`: (value, rest).
    fn quoted(s: &str) -> Option<(String, &str)> {
        let s = s.strip_prefix('"')?;
        let mut out = String::new();
        let mut chars = s.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    let (_, n) = chars.next()?;
                    out.push(if n == 'n' { '\n' } else { n });
                }
                '"' => return Some((out, &s[i + 1..])),
                c => out.push(c),
            }
        }
        None
    }
    let mut nodes = BTreeSet::new();
    let mut edges = BTreeSet::new();
    let body = text.trim();
    assert!(body.starts_with("digraph"), "{text}");
    assert!(body.ends_with('}'), "{text}");
    for line in body.lines().map(str::trim) {
        let Some((a, rest)) = quoted(line) else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(rest) = rest.strip_prefix("->") {
            let (b, tail) = quoted(rest.trim_start()).expect("edge target");
            assert_eq!(tail.trim(), ";", "{line}");
            edges.insert((a, b));
        } else {
            assert!(rest.starts_with('[') && rest.ends_with("];"), "{line}");
            assert!(nodes.insert(a), "node declared twice: {line}");
        }
    }
    for (a, b) in &edges {
        assert!(nodes.contains(a) && nodes.contains(b), "edge {a} -> {b}");
    }
    (nodes, edges)
}

fn edges(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// default with snapshots s1 and s2; dev forked from s1 with snapshot d1; test forked
/// from s2.
fn make_tree(d: &Path) {
    ok_quiet(d, &["create", "t.qcow2", "4M"]);
    ok_quiet(d, &["io", "t.qcow2", "-c", "write -P 1 0 256k"]);
    ok_quiet(d, &["snapshot", "t.qcow2", "s1"]);
    ok_quiet(d, &["io", "t.qcow2", "-c", "write -P 2 0 64k"]);
    ok_quiet(d, &["snapshot", "t.qcow2", "s2"]);
    ok_quiet(d, &["fork", "t.qcow2", "s1", "dev"]);
    ok_quiet(
        d,
        &["io", "t.qcow2", "--vdi", "dev", "-c", "write -P 3 1M 128k"],
    );
    ok_quiet(d, &["snapshot", "t.qcow2", "--vdi", "dev", "d1"]);
    ok_quiet(d, &["fork", "t.qcow2", "s2", "test"]);
    ok_quiet(d, &["io", "t.qcow2", "-c", "write -P 4 2M 64k"]);
}

#[test]
fn tree_dot_parses_back_to_the_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_tree(d);
    let out = ok_quiet(d, &["tree", "--dot", "t.qcow2"]);
    let (nodes, edge_set) = parse_dot(&stdout(&out));
    assert_eq!(nodes, set(&["default", "s1", "s2", "dev", "d1", "test"]));
    assert_eq!(
        edge_set,
        edges(&[
            ("default", "s1"),
            ("default", "s2"),
            ("s1", "dev"),
            ("dev", "d1"),
            ("s2", "test"),
        ])
    );
    // The JSON agrees with the DOT edges and with list.
    let v = json(&ok_quiet(d, &["tree", "--output=json", "t.qcow2"]));
    let nodes_json = v["nodes"].as_array().unwrap();
    assert_eq!(nodes_json.len(), 6);
    assert_eq!(
        nodes_json[0]["name"], "default",
        "pre-order starts at the default VDI's tree"
    );
    let mut from_parents = BTreeSet::new();
    let mut from_children = BTreeSet::new();
    for n in nodes_json {
        let name = n["name"].as_str().unwrap().to_string();
        if let Some(p) = n["tree-parent"].as_str() {
            from_parents.insert((p.to_string(), name.clone()));
        }
        for c in n["children"].as_array().unwrap() {
            from_children.insert((name.clone(), c.as_str().unwrap().to_string()));
        }
    }
    assert_eq!(from_parents, edge_set);
    assert_eq!(from_children, edge_set);
    let by_name: BTreeMap<String, &Value> = nodes_json
        .iter()
        .map(|n| (n["name"].as_str().unwrap().to_string(), n))
        .collect();
    // Exclusive sizes: dev wrote 2 new clusters into a copied L2 table, but snapshot
    // d1 shares those with it: dev owns its L1 only. The default VDI wrote 1 cluster
    // after s2 (new data, an L2 copy, and its own L1).
    assert_eq!(by_name["dev"]["exclusive-bytes"], CS);
    assert_eq!(by_name["default"]["exclusive-bytes"], 3 * CS);
    assert_eq!(by_name["default"]["mapped-bytes"], 5 * CS);
    assert_eq!(by_name["test"]["exclusive-bytes"], CS, "only its L1");
    // s1 alone keeps its L1 and the original L2 table; its data is shared.
    assert_eq!(by_name["s1"]["exclusive-bytes"], 2 * CS);
    assert_eq!(by_name["s1"]["mapped-bytes"], 4 * CS);
    // Deleting a snapshot and collecting gives back at least what it alone held.
    let d1_excl = by_name["d1"]["exclusive-bytes"].as_u64().unwrap();
    assert_eq!(d1_excl, CS, "d1 shares everything with dev but its L1");
    ok_quiet(d, &["delete", "t.qcow2", "--vdi", "dev"]);
    let v = json(&ok_quiet(d, &["tree", "--output=json", "t.qcow2"]));
    let d1 = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "d1")
        .unwrap();
    assert_eq!(
        d1["exclusive-bytes"],
        4 * CS,
        "d1 now owns dev's data and tables"
    );
    ok_quiet(d, &["delete", "t.qcow2", "--snapshot", "d1"]);
    let gc = json(&ok_quiet(d, &["gc", "--output=json", "t.qcow2"]));
    let freed = gc["bytes-freed"].as_u64().unwrap();
    // d1's own clusters, dev's L1 and head entry clusters, and the old snapshot table.
    assert!(freed >= 4 * CS + CS, "freed {freed}");
    assert!(freed <= 4 * CS + 3 * CS, "freed {freed}");
    assert_qemu_check_clean(d, "t.qcow2");
}

#[test]
fn tree_human_svg_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_tree(d);
    let text = stdout(&ok_quiet(d, &["tree", "t.qcow2"]));
    let heads: Vec<&str> = text
        .lines()
        .map(|l| l.split("  (").next().unwrap())
        .collect();
    assert_eq!(
        heads,
        [
            "default",
            "├─ s1",
            "│  └─ dev",
            "│     └─ d1",
            "└─ s2",
            "   └─ test"
        ],
        "{text}"
    );
    assert!(text.contains("snapshot of default"), "{text}");
    // The built-in renderer (QCOWX_DOT empty): one group per root, names as text.
    let out = Command::new(QCOWX)
        .args(["tree", "--svg", "t.svg", "t.qcow2"])
        .env("QCOWX_DOT", "")
        .current_dir(d)
        .output()
        .unwrap();
    assert_code(&out, 0, "tree --svg (built-in)");
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
    let svg = std::fs::read_to_string(d.join("t.svg")).unwrap();
    assert!(svg.starts_with("<?xml"), "{svg}");
    assert!(svg.contains("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<g class=\"snapshot\">").count(), 3);
    assert_eq!(svg.matches("<g class=\"vdi\">").count(), 3);
    assert_eq!(svg.matches("<line ").count(), 5);
    for n in ["default", "s1", "s2", "dev", "d1", "test"] {
        assert!(svg.contains(&format!(">{n}</text>")), "{n}");
    }
    // A missing `dot` program falls back to the built-in renderer.
    std::fs::remove_file(d.join("t.svg")).unwrap();
    let out = Command::new(QCOWX)
        .args(["tree", "--svg", "t.svg", "t.qcow2"])
        .env("QCOWX_DOT", d.join("no-such-dot"))
        .current_dir(d)
        .output()
        .unwrap();
    assert_code(&out, 0, "tree --svg without dot");
    assert!(std::fs::read_to_string(d.join("t.svg"))
        .unwrap()
        .contains("</svg>"));
    // A `dot` program gets the DOT text on stdin and `-Tsvg -o OUT`.
    let fake = d.join("fake-dot");
    std::fs::write(
        &fake,
        "#!/bin/sh\n[ \"$1\" = -Tsvg ] && [ \"$2\" = -o ] || exit 9\ncat > \"$3.dot\"\necho '<svg>fake</svg>' > \"$3\"\n",
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = Command::new(QCOWX)
        .args(["tree", "--svg", "g.svg", "t.qcow2"])
        .env("QCOWX_DOT", &fake)
        .current_dir(d)
        .output()
        .unwrap();
    assert_code(&out, 0, "tree --svg with a dot program");
    assert_eq!(
        std::fs::read_to_string(d.join("g.svg")).unwrap(),
        "<svg>fake</svg>\n"
    );
    let given = std::fs::read_to_string(d.join("g.svg.dot")).unwrap();
    assert_eq!(given, stdout(&ok_quiet(d, &["tree", "--dot", "t.qcow2"])));
    // A failing `dot` is an error that says how to avoid it.
    let out = Command::new(QCOWX)
        .args(["tree", "--svg", "g.svg", "t.qcow2"])
        .env("QCOWX_DOT", "false")
        .current_dir(d)
        .output()
        .unwrap();
    assert_code(&out, 1, "tree --svg with a failing dot");
    assert!(stderr(&out).contains("g.svg"), "{}", stderr(&out));
    assert!(stderr(&out).contains("QCOWX_DOT"), "{}", stderr(&out));
    // Errors.
    fails_quiet(d, 1, &["tree", "nope.qcow2"], &["nope.qcow2"]);
    usage_error(d, &["tree", "--dot", "--output=json", "t.qcow2"]);
    let held = qcowx_core::Image::open_rw(d.join("t.qcow2")).unwrap();
    fails_quiet(d, 1, &["tree", "t.qcow2"], &["t.qcow2", "locked", "-U"]);
    let v = json(&ok_quiet(d, &["tree", "-U", "--output=json", "t.qcow2"]));
    assert_eq!(v["nodes"].as_array().unwrap().len(), 6);
    drop(held);
}

// ---- map ---------------------------------------------------------------------------

fn qemu_map(d: &Path, file: &str) -> Value {
    json(&qemu_ok(d, &["map", "--output=json", file]))
}

fn qcowx_map(d: &Path, args: &[&str]) -> Value {
    let mut all = vec!["map", "--output=json"];
    all.extend(args);
    json(&ok_quiet(d, &all))
}

fn assert_map_matches_qemu(d: &Path, file: &str) {
    let ours = qcowx_map(d, &[file]);
    assert_eq!(ours["filename"], file);
    assert_eq!(ours["root"], "default");
    let theirs = qemu_map(d, file);
    assert_eq!(
        ours["extents"], theirs,
        "{file}: qcowx map differs from qemu-img map"
    );
}

#[test]
fn map_matches_qemu_img_map_on_images_and_chains() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A qcowx image: data, a zero cluster over data, a discarded cluster, a partial
    // zero write, an unaligned end.
    ok_quiet(d, &["create", "a.qcow2", "3000k"]);
    ok_quiet(
        d,
        &[
            "io",
            "a.qcow2",
            "-c",
            "write -P 1 0 192k",
            "-c",
            "write -P 2 512k 64k",
            "-c",
            "write -z 64k 64k",
            "-c",
            "discard 512k 64k",
            "-c",
            "write -P 3 1M 4k",
            "-c",
            "write -z 1M 512",
            "-c",
            "write -P 4 2944k 8k",
        ],
    );
    assert_map_matches_qemu(d, "a.qcow2");
    // A QEMU chain: raw base with holes, a 4 KiB-cluster middle layer with a
    // compressed cluster and zeros, a top layer past the base's end.
    qemu_ok(d, &["create", "-f", "raw", "base.raw", "2M"]);
    qemu_io(
        d,
        "raw",
        "base.raw",
        &["write -P 9 64k 64k", "write -P 8 1M 16k"],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "3M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "mid.qcow2",
        &[
            "write -P 2 0 4k",
            "write -z 128k 64k",
            "write -c -P 4 1536k 4k",
            "write -P 5 2100k 8k",
        ],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "4M",
        ],
    );
    assert_map_matches_qemu(d, "mid.qcow2");
    assert_map_matches_qemu(d, "top.qcow2");
    // qcowx writes on top of the chain.
    ok_quiet(
        d,
        &[
            "io",
            "top.qcow2",
            "-c",
            "write -P 6 3M 64k",
            "-c",
            "write -z 0 64k",
        ],
    );
    assert_map_matches_qemu(d, "top.qcow2");
    // Extended L2 entries (subclusters), zero clusters that keep their host cluster
    // in a backing file, and unallocated subclusters of allocated clusters.
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "x.qcow2",
            "4M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "x.qcow2",
        &[
            "write -P 1 0 4k",
            "write -P 2 64k 64k",
            "write -z 72k 4k",
            "write -z 1M 8k",
            "write -P 3 2M 100k",
            "write -P 4 3M 64k",
            "write -z 3M 64k",
        ],
    );
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "x.qcow2",
            "-F",
            "qcow2",
            "x2.qcow2",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "x2.qcow2",
        &["write -P 9 8k 4k", "write -z 2M 4k"],
    );
    assert_map_matches_qemu(d, "x.qcow2");
    assert_map_matches_qemu(d, "x2.qcow2");
    ok_quiet(d, &["io", "x2.qcow2", "-c", "write -P 5 3M 32k"]);
    assert_map_matches_qemu(d, "x2.qcow2");
    // The human table is qemu-img's where there is nothing compressed.
    let ours = stdout(&ok_quiet(d, &["map", "a.qcow2"]));
    let theirs = stdout(&qemu_ok(d, &["map", "a.qcow2"]));
    assert_eq!(ours, theirs);
    let ours = stdout(&ok_quiet(d, &["map", "top.qcow2"]));
    assert!(ours.starts_with("Offset          Length          Mapped to       File\n"));
    assert!(ours.contains("compressed      mid.qcow2"), "{ours}");
    // -q: nothing.
    assert!(ok_quiet(d, &["-q", "map", "top.qcow2"]).stdout.is_empty());
}

/// Per-cluster data/zero classification of map extents inside `[0, size)`.
fn classify(extents: &Value, size: u64) -> Vec<bool> {
    let mut out = vec![false; size.div_ceil(CS) as usize];
    for e in extents.as_array().unwrap() {
        if e["data"] != true {
            continue;
        }
        let start = e["start"].as_u64().unwrap();
        let end = (start + e["length"].as_u64().unwrap()).min(size);
        let mut c = start / CS;
        while c * CS < end {
            out[c as usize] = true;
            c += 1;
        }
    }
    out
}

#[test]
fn map_of_snapshots_and_vdis_agrees_with_qemu_copies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_ok(d, &["create", "-f", "raw", "b.raw", "4M"]);
    qemu_io(d, "raw", "b.raw", &["write -P 7 3M 64k"]);
    ok_quiet(d, &["create", "-b", "b.raw", "-F", "raw", "s.qcow2", "4M"]);
    ok_quiet(
        d,
        &[
            "io",
            "s.qcow2",
            "-c",
            "write -P 1 0 128k",
            "-c",
            "write -z 3M 64k",
        ],
    );
    ok_quiet(d, &["snapshot", "s.qcow2", "one"]);
    ok_quiet(
        d,
        &[
            "io",
            "s.qcow2",
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "write -z 0 64k",
        ],
    );
    ok_quiet(d, &["snapshot", "s.qcow2", "two"]);
    ok_quiet(d, &["fork", "s.qcow2", "one", "dev"]);
    ok_quiet(
        d,
        &["io", "s.qcow2", "--vdi", "dev", "-c", "write -P 3 2M 64k"],
    );
    let size = 4 << 20;
    for (args, name) in [
        (vec!["--snapshot", "one"], "one"),
        (vec!["--snapshot", "two"], "two"),
        (vec!["--vdi", "dev"], "vdi:dev"),
    ] {
        let mut a = args.clone();
        a.push("s.qcow2");
        let ours = qcowx_map(d, &a);
        assert_eq!(ours["root"], args[1]);
        let copy = format!("{}.qcow2", args[1]);
        let opt = format!("snapshot.name={name}");
        qemu_ok(d, &["convert", "-l", &opt, "-O", "qcow2", "s.qcow2", &copy]);
        let theirs = qemu_map(d, &copy);
        assert_eq!(
            classify(&ours["extents"], size),
            classify(&theirs, size),
            "{args:?}: data clusters differ from qemu-img's copy"
        );
        let total: u64 = ours["extents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert_eq!(total, size);
    }
    // Depth: the snapshot's unallocated ranges fall through to the raw backing file.
    let one = qcowx_map(d, &["--snapshot", "one", "s.qcow2"]);
    let backing: Vec<&Value> = one["extents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 1 && e["data"] == true)
        .collect();
    assert_eq!(backing.len(), 0, "3M is zeroed in 'one': {one:#}");
    let dev = qcowx_map(d, &["--vdi", "dev", "s.qcow2"]);
    assert!(dev["extents"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["depth"] == 1 && e["zero"] == true && e["present"] == true));
    // Errors.
    fails_quiet(
        d,
        1,
        &["map", "--snapshot", "nope", "s.qcow2"],
        &["s.qcow2", "snapshot 'nope' not found", "qcowx list s.qcow2"],
    );
    fails_quiet(
        d,
        1,
        &["map", "--vdi", "one", "s.qcow2"],
        &["VDI 'one' not found"],
    );
    fails_quiet(d, 1, &["map", "missing.qcow2"], &["missing.qcow2"]);
    usage_error(d, &["map", "--snapshot", "one", "--vdi", "dev", "s.qcow2"]);
    let held = qcowx_core::Image::open_rw(d.join("s.qcow2")).unwrap();
    fails_quiet(d, 1, &["map", "s.qcow2"], &["s.qcow2", "locked", "-U"]);
    ok_quiet(d, &["map", "-U", "s.qcow2"]);
    drop(held);
}

// ---- resize and rename -------------------------------------------------------------

fn virtual_size(d: &Path, file: &str) -> u64 {
    json(&qemu_ok(d, &["info", "-U", "--output=json", file]))["virtual-size"]
        .as_u64()
        .unwrap()
}

#[test]
fn resize_grows_and_refuses_to_shrink() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_quiet(d, &["create", "r.qcow2", "1M"]);
    ok_quiet(d, &["io", "r.qcow2", "-c", "write -P 5 0 64k"]);
    ok_quiet(d, &["snapshot", "r.qcow2", "small"]);
    let out = ok_quiet(d, &["resize", "r.qcow2", "2M"]);
    assert_eq!(stdout(&out), "Image resized.\n");
    assert_eq!(virtual_size(d, "r.qcow2"), 2 << 20);
    let v = json(&ok_quiet(
        d,
        &["resize", "--output=json", "r.qcow2", "+1.5M"],
    ));
    assert_eq!(v["old-size"], 2 << 20);
    assert_eq!(v["new-size"], (7 << 20) / 2);
    assert_eq!(v["filename"], "r.qcow2");
    let raw = qemu_raw(d, "r.qcow2", Some("small"));
    assert!(raw[..CS as usize].iter().all(|&b| b == 5));
    // Large sizes need a bigger L1 table.
    ok_quiet(d, &["resize", "r.qcow2", "+100G"]);
    assert_eq!(virtual_size(d, "r.qcow2"), (100 << 30) + (7 << 20) / 2);
    // Rounded up to 512.
    ok_quiet(d, &["-q", "resize", "r.qcow2", "+1000"]);
    assert_eq!(virtual_size(d, "r.qcow2") % 512, 0);
    assert_qemu_check_clean(d, "r.qcow2");
    let list = json(&ok_quiet(d, &["list", "--output=json", "r.qcow2"]));
    assert_eq!(
        list["roots"][1]["virtual-size"],
        1 << 20,
        "the snapshot keeps its size"
    );
    // Shrinking is refused with a reason, and changes nothing.
    let size = virtual_size(d, "r.qcow2");
    for args in [
        &["resize", "r.qcow2", "-1M"][..],
        &["resize", "r.qcow2", "1M"][..],
    ] {
        fails_quiet(d, 1, args, &["r.qcow2", "shrinking", "only grows"]);
    }
    assert_eq!(virtual_size(d, "r.qcow2"), size);
    // Bad sizes are usage errors.
    for bad in ["12Q", "+", "abc", "--1M", "99999E"] {
        let err = usage_error(d, &["resize", "r.qcow2", bad]);
        assert!(err.contains(bad), "{bad}: {err}");
    }
    fails_quiet(d, 1, &["resize", "missing.qcow2", "1G"], &["missing.qcow2"]);
    let held = qcowx_core::Image::open(d.join("r.qcow2")).unwrap();
    let err = fails_quiet(d, 1, &["resize", "r.qcow2", "+1M"], &["r.qcow2", "locked"]);
    assert!(!err.contains("-U"), "{err}");
    drop(held);
}

#[test]
fn resize_over_a_longer_backing_file_reads_zeros_past_the_old_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_ok(d, &["create", "-f", "qcow2", "long.qcow2", "4M"]);
    qemu_io(d, "qcow2", "long.qcow2", &["write -P 0x44 0 4M"]);
    ok_quiet(
        d,
        &["create", "-b", "long.qcow2", "-F", "qcow2", "o.qcow2", "1M"],
    );
    ok_quiet(d, &["resize", "o.qcow2", "3M"]);
    qemu_io(
        d,
        "qcow2",
        "o.qcow2",
        &["read -P 0x44 0 1M", "read -P 0 1M 2M"],
    );
    assert_qemu_check_clean(d, "o.qcow2");
}

#[test]
fn resize_and_rename_refuse_a_read_only_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("ro")).unwrap();
    ok_quiet(d, &["create", "ro/r.qcow2", "1M"]);
    ok_quiet(d, &["snapshot", "ro/r.qcow2", "s"]);
    let before = std::fs::read(d.join("ro/r.qcow2")).unwrap();
    let run_ro = |args: &[&str]| -> Output {
        if is_root(d) {
            let script =
                r#"mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@""#;
            Command::new("unshare")
                .args(["-m", "sh", "-c", script, "sh"])
                .arg(d.join("ro"))
                .arg(QCOWX)
                .args(args)
                .current_dir(d)
                .output()
                .unwrap()
        } else {
            use std::os::unix::fs::PermissionsExt;
            let p = d.join("ro/r.qcow2");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
            qcowx(d, args)
        }
    };
    // Probe: when mount namespaces are not available to root, say so and stop.
    let probe = run_ro(&["list", "ro/r.qcow2"]);
    if !probe.status.success() && stderr(&probe).contains("mount") {
        eprintln!("NOTE: no mount namespaces here: the read-only case is not tested");
        return;
    }
    for args in [
        &["resize", "ro/r.qcow2", "2M"][..],
        &["rename", "ro/r.qcow2", "--snapshot", "s", "t"][..],
    ] {
        let out = run_ro(args);
        assert_code(&out, 1, &format!("{args:?}"));
        let err = stderr(&out);
        assert!(err.contains("ro/r.qcow2"), "{err}");
        assert!(err.contains("needs write access"), "{err}");
    }
    assert!(std::fs::read(d.join("ro/r.qcow2")).unwrap() == before);
    // Readers still work.
    let out = run_ro(&["map", "--output=json", "--snapshot", "s", "ro/r.qcow2"]);
    assert_code(&out, 0, "map of a read-only image");
}

#[test]
fn rename_snapshots_and_vdis() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_quiet(d, &["create", "n.qcow2", "1M"]);
    ok_quiet(d, &["io", "n.qcow2", "-c", "write -P 1 0 64k"]);
    ok_quiet(d, &["snapshot", "n.qcow2", "s1"]);
    ok_quiet(d, &["fork", "n.qcow2", "s1", "dev"]);
    ok_quiet(d, &["snapshot", "n.qcow2", "--vdi", "dev", "d1"]);
    // A snapshot QEMU made, then one of ours on top of it.
    qemu_ok(d, &["snapshot", "-c", "qemu-snap", "n.qcow2"]);
    ok_quiet(d, &["snapshot", "n.qcow2", "after"]);
    let before = json(&ok_quiet(d, &["list", "--output=json", "n.qcow2"]));
    let out = ok_quiet(
        d,
        &["rename", "n.qcow2", "--snapshot", "s1", "golden-image"],
    );
    assert!(out.stdout.is_empty());
    ok_quiet(d, &["rename", "n.qcow2", "--vdi", "dev", "develop"]);
    ok_quiet(d, &["rename", "n.qcow2", "--snapshot", "qemu-snap", "q2"]);
    let after = json(&ok_quiet(d, &["list", "--output=json", "n.qcow2"]));
    let find = |v: &Value, n: &str| -> Value {
        v["roots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} not in {v:#}"))
    };
    assert_eq!(
        find(&after, "golden-image")["uid"],
        find(&before, "s1")["uid"]
    );
    assert_eq!(
        find(&after, "golden-image")["id"],
        find(&before, "s1")["id"]
    );
    assert_eq!(find(&after, "develop")["uid"], find(&before, "dev")["uid"]);
    assert_eq!(find(&after, "d1")["vdi"], "develop");
    assert_eq!(find(&after, "d1")["parent"], "golden-image");
    assert_eq!(find(&after, "q2")["uid"], find(&before, "qemu-snap")["uid"]);
    assert_eq!(
        find(&after, "after")["parent"],
        "q2",
        "lineage through QEMU's snapshot"
    );
    let mut names: Vec<String> = stdout(&qemu_ok(d, &["snapshot", "-l", "n.qcow2"]))
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
        .collect();
    names.sort();
    assert_eq!(names, ["after", "d1", "golden-image", "q2", "vdi:develop"]);
    assert_qemu_check_clean(d, "n.qcow2");
    let raw = qemu_raw(d, "n.qcow2", Some("golden-image"));
    assert!(raw[..CS as usize].iter().all(|&b| b == 1));
    // Errors.
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--snapshot", "s1", "x"],
        &["n.qcow2", "snapshot 's1' not found", "qcowx list n.qcow2"],
    );
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--vdi", "d1", "x"],
        &["VDI 'd1' not found"],
    );
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--snapshot", "d1", "develop"],
        &["'develop' already exists"],
    );
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--snapshot", "d1", "default"],
        &["'default' already exists"],
    );
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--vdi", "default", "x"],
        &["default VDI cannot be renamed"],
    );
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--snapshot", "d1", "bad name"],
        &["invalid name 'bad name'"],
    );
    fails_quiet(
        d,
        1,
        &["rename", "nope.qcow2", "--snapshot", "a", "b"],
        &["nope.qcow2"],
    );
    usage_error(d, &["rename", "n.qcow2", "d1", "x"]);
    usage_error(d, &["rename", "n.qcow2", "--snapshot", "--vdi", "d1", "x"]);
    usage_error(d, &["rename", "n.qcow2", "--snapshot", "d1"]);
    let held = qcowx_core::Image::open(d.join("n.qcow2")).unwrap();
    fails_quiet(
        d,
        1,
        &["rename", "n.qcow2", "--snapshot", "d1", "x"],
        &["n.qcow2", "locked"],
    );
    drop(held);
    assert_eq!(
        json(&ok_quiet(d, &["list", "--output=json", "n.qcow2"])),
        after,
        "failed renames change nothing"
    );
}

// ---- compare and convert -----------------------------------------------------------

/// Runs `qcowx compare` and `qemu-img compare` on the same pair: same exit code, same
/// stdout.
fn compare_like_qemu(d: &Path, a: &str, b: &str) -> i32 {
    let ours = qcowx(d, &["compare", a, b]);
    let theirs = qemu_img(d, &["compare", a, b]);
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "{a} {b}: qcowx {} / qemu-img {}",
        stdout(&ours),
        stdout(&theirs)
    );
    assert_eq!(stdout(&ours), stdout(&theirs), "{a} {b}");
    ours.status.code().unwrap()
}

#[test]
fn compare_agrees_with_qemu_img_compare() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_ok(d, &["create", "-f", "qcow2", "a.qcow2", "4M"]);
    qemu_io(
        d,
        "qcow2",
        "a.qcow2",
        &["write -P 1 0 1M", "write -P 2 3M 4k"],
    );
    qemu_ok(d, &["convert", "-O", "raw", "a.qcow2", "a.raw"]);
    ok_quiet(d, &["convert", "-O", "qcow2", "a.qcow2", "b.qcow2"]);
    assert_eq!(compare_like_qemu(d, "a.qcow2", "a.raw"), 0);
    assert_eq!(compare_like_qemu(d, "a.raw", "b.qcow2"), 0);
    // One byte differs (reported at its sector).
    std::fs::copy(d.join("a.raw"), d.join("c.raw")).unwrap();
    qemu_io(d, "raw", "c.raw", &["write -P 9 700001 1"]);
    assert_eq!(compare_like_qemu(d, "a.qcow2", "c.raw"), 1);
    // Data against zeros, either way round.
    qemu_ok(d, &["create", "-f", "qcow2", "z.qcow2", "4M"]);
    assert_eq!(compare_like_qemu(d, "z.qcow2", "a.qcow2"), 1);
    assert_eq!(compare_like_qemu(d, "a.raw", "z.qcow2"), 1);
    // Sizes differ: a zero tail is identical, a non-zero tail is not.
    qemu_ok(
        d,
        &[
            "create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "l.qcow2", "6M",
        ],
    );
    assert_eq!(compare_like_qemu(d, "a.qcow2", "l.qcow2"), 0);
    qemu_io(d, "qcow2", "l.qcow2", &["write -P 3 5000000 100"]);
    assert_eq!(compare_like_qemu(d, "l.qcow2", "a.raw"), 1);
    // Errors: exit 2, both.
    assert_eq!(
        qemu_img(d, &["compare", "a.raw", "missing.raw"])
            .status
            .code(),
        Some(2)
    );
    fails_quiet(d, 2, &["compare", "a.raw", "missing.raw"], &["missing.raw"]);
    usage_error(d, &["compare", "-f", "vmdk", "a.raw", "a.qcow2"]);
    // Forced formats: a qcow2 file read as raw differs from its content.
    let out = qcowx(d, &["compare", "-f", "raw", "a.qcow2", "a.raw"]);
    assert_code(&out, 1, "compare -f raw");
    // -q and JSON.
    let out = qcowx(d, &["-q", "compare", "a.qcow2", "c.raw"]);
    assert_code(&out, 1, "compare -q");
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    let out = qcowx(d, &["compare", "--output=json", "a.qcow2", "c.raw"]);
    assert_code(&out, 1, "compare --output=json");
    let v = json(&out);
    assert_eq!(v["identical"], false);
    assert_eq!(v["mismatch-offset"], 700001 / 512 * 512);
    assert_eq!(v["size-a"], 4 << 20);
    let v = json(&ok_quiet(
        d,
        &["compare", "--output=json", "a.qcow2", "b.qcow2"],
    ));
    assert_eq!(v["mismatch-offset"], Value::Null);
    // A locked image is refused, -U reads it.
    let held = qcowx_core::Image::open_rw(d.join("b.qcow2")).unwrap();
    fails_quiet(
        d,
        2,
        &["compare", "a.raw", "b.qcow2"],
        &["b.qcow2", "locked", "-U"],
    );
    ok_quiet(d, &["compare", "-U", "a.raw", "b.qcow2"]);
    drop(held);
}

/// Deterministic bytes: half random, half repeating text, per 4 KiB.
fn mixed_data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = qcowx_tests::Rng::new(seed);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let mut random = [0u8; 2048];
        rng.fill(&mut random);
        out.extend_from_slice(&random);
        out.extend(b"qcowx compresses this part ".iter().cycle().take(2048));
    }
    out.truncate(len);
    out
}

#[test]
fn convert_between_raw_and_qcow2_and_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A chain with data of every kind: compressible, incompressible, mixed.
    qemu_ok(d, &["create", "-f", "raw", "base.raw", "8M"]);
    std::fs::write(d.join("mixed.bin"), mixed_data(1 << 20, 7)).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("base.raw"))
            .unwrap();
        f.write_all_at(&mixed_data(1 << 20, 7), 2 << 20).unwrap();
        let random: Vec<u8> = mixed_data(1 << 20, 9)
            .chunks(4096)
            .flat_map(|c| c[..2048].to_vec())
            .collect();
        f.write_all_at(&random, 5 << 20).unwrap();
    }
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
            "8M",
        ],
    );
    qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &["write -P 0x5a 0 1M", "write -z 2M 64k"],
    );
    // qcow2 chain -> raw, raw -> qcow2.
    ok_quiet(d, &["convert", "top.qcow2", "flat.raw"]);
    assert_eq!(
        std::fs::read(d.join("flat.raw")).unwrap(),
        qemu_raw(d, "top.qcow2", None)
    );
    ok_quiet(
        d,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "flat.raw",
            "back.qcow2",
        ],
    );
    assert_qemu_check_clean(d, "back.qcow2");
    assert_code(
        &qemu_img(d, &["compare", "back.qcow2", "top.qcow2"]),
        0,
        "raw->qcow2",
    );
    // Compressed, with the input's cluster size and with small clusters (compressed
    // data then spans host clusters).
    for (out, extra) in [
        ("c64.qcow2", None),
        ("c4.qcow2", Some("4K")),
        ("c512.qcow2", Some("512")),
    ] {
        let mut args = vec!["convert", "-c", "-O", "qcow2"];
        if let Some(cs) = extra {
            args.extend(["--cluster-size", cs]);
        }
        args.extend(["top.qcow2", out]);
        ok_quiet(d, &args);
        assert_qemu_check_clean(d, out);
        assert_code(&qemu_img(d, &["compare", out, "top.qcow2"]), 0, out);
        let check = json(&qemu_ok(d, &["check", "--output=json", out]));
        let compressed = check["compressed-clusters"].as_u64().unwrap_or(0);
        let allocated = check["allocated-clusters"].as_u64().unwrap();
        assert!(compressed > 0, "{out}: {check:#}");
        assert!(
            compressed < allocated,
            "{out}: random data stays uncompressed: {check:#}"
        );
        let map = qemu_map(d, out);
        assert!(map
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["compressed"] == true));
        // qcowx reads it back too, and maps it as QEMU does.
        assert_map_matches_qemu(d, out);
        assert_code(&qcowx(d, &["compare", out, "flat.raw"]), 0, out);
    }
    let small = std::fs::metadata(d.join("c64.qcow2")).unwrap().len();
    let plain = std::fs::metadata(d.join("back.qcow2")).unwrap().len();
    assert!(small < plain, "compressed {small} >= plain {plain}");
    // QEMU can write to a compressed image (copy-on-write of compressed clusters).
    qemu_io(
        d,
        "qcow2",
        "c64.qcow2",
        &["write -P 0x77 4k 4k", "read -P 0x5a 0 4k"],
    );
    assert_qemu_check_clean(d, "c64.qcow2");
    // Errors.
    let err = usage_error(d, &["convert", "-c", "top.qcow2", "x.raw"]);
    assert!(err.contains("-O qcow2"), "{err}");
    usage_error(d, &["convert", "-O", "vmdk", "top.qcow2", "x"]);
    fails_quiet(
        d,
        1,
        &["convert", "missing.qcow2", "x.raw"],
        &["missing.qcow2"],
    );
    fails_quiet(
        d,
        1,
        &["convert", "-O", "qcow2", "top.qcow2", "top.qcow2"],
        &["source image itself"],
    );
    fails_quiet(
        d,
        1,
        &[
            "convert",
            "-O",
            "qcow2",
            "--cluster-size",
            "3000",
            "top.qcow2",
            "y.qcow2",
        ],
        &["cluster size"],
    );
    let held = qcowx_core::Image::open_rw(d.join("back.qcow2")).unwrap();
    fails_quiet(
        d,
        1,
        &["convert", "back.qcow2", "z.raw"],
        &["back.qcow2", "locked", "-U"],
    );
    ok_quiet(d, &["convert", "-U", "back.qcow2", "z.raw"]);
    drop(held);
}

// ---- completions, man, help --------------------------------------------------------

const COMMANDS: [&str; 21] = [
    "create",
    "info",
    "check",
    "export",
    "snapshot",
    "list",
    "fork",
    "delete",
    "revert",
    "gc",
    "diff",
    "io",
    "import",
    "tree",
    "map",
    "resize",
    "rename",
    "compare",
    "convert",
    "completions",
    "man",
];

#[test]
fn completions_and_man_pages_come_from_the_same_definitions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let text = stdout(&ok_quiet(d, &["completions", shell]));
        for cmd in ["import", "tree", "rename", "compare"] {
            assert!(text.contains(cmd), "{shell}: {cmd}");
        }
    }
    let bash = stdout(&ok_quiet(d, &["completions", "bash"]));
    assert!(bash.contains("complete -F _qcowx"), "{bash}");
    usage_error(d, &["completions", "tcsh"]);
    let page = stdout(&ok_quiet(d, &["man"]));
    assert!(
        page.contains(".TH qcowx 1"),
        "{}",
        &page[..200.min(page.len())]
    );
    for cmd in COMMANDS {
        assert!(
            page.contains(&format!("qcowx\\-{cmd}")) || page.contains(cmd),
            "{cmd}"
        );
    }
    let page = stdout(&ok_quiet(d, &["man", "import"]));
    assert!(page.contains(".TH qcowx-import 1"), "{page}");
    assert!(page.contains("qcowx import"), "{page}");
    assert!(
        page.contains("first free suffix"),
        "the naming rule is documented"
    );
    let err = usage_error(d, &["man", "frobnicate"]);
    assert!(err.contains("frobnicate"), "{err}");
    // Every command has a man page and help.
    for cmd in COMMANDS {
        let page = stdout(&ok_quiet(d, &["man", cmd]));
        assert!(page.contains(&format!(".TH qcowx-{cmd} 1")), "{cmd}");
        ok_quiet(d, &[cmd, "--help"]);
    }
    let help = stdout(&ok_quiet(d, &["--help"]));
    for cmd in COMMANDS {
        assert!(help.contains(cmd), "{cmd} not in --help");
    }
}

// ---- shared behaviour --------------------------------------------------------------

#[test]
fn quiet_suppresses_human_output_but_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for args in [
        &["-q", "create", "q.qcow2", "1M"][..],
        &["create", "-q", "q2.qcow2", "1M"][..],
        &["-q", "info", "q.qcow2"][..],
        &["-q", "check", "q.qcow2"][..],
        &["-q", "snapshot", "q.qcow2", "s"][..],
        &["-q", "list", "q.qcow2"][..],
        &["-q", "tree", "q.qcow2"][..],
        &["-q", "map", "q.qcow2"][..],
        &["-q", "diff", "q.qcow2", "s", "default"][..],
        &["-q", "resize", "q.qcow2", "2M"][..],
        &["-q", "compare", "q.qcow2", "q.qcow2"][..],
        &["-q", "io", "q.qcow2", "-c", "write 0 512"][..],
        &["-q", "gc", "q.qcow2"][..],
    ] {
        let out = ok_quiet(d, args);
        assert!(out.stdout.is_empty(), "{args:?}: {}", stdout(&out));
    }
    assert!(d.join("q2.qcow2").exists());
    for args in [
        &["-q", "info", "--output=json", "q.qcow2"][..],
        &["-q", "list", "--output=json", "q.qcow2"][..],
        &["-q", "tree", "--output=json", "q.qcow2"][..],
        &["-q", "map", "--output=json", "q.qcow2"][..],
        &["-q", "gc", "--output=json", "q.qcow2"][..],
    ] {
        json(&ok_quiet(d, args));
    }
    assert!(stdout(&ok_quiet(d, &["-q", "tree", "--dot", "q.qcow2"])).starts_with("digraph"));
    // check -q still gives its exit code.
    let out = qcowx(d, &["-q", "check", "missing.qcow2"]);
    assert_code(&out, 1, "check -q missing");
    assert!(stderr(&out).contains("missing.qcow2"));
}

/// Runs `cmd` (a shell command line) with a terminal as stdout and stderr (`script`),
/// returning everything written to the terminal.
fn on_a_terminal(d: &Path, cmd: &str) -> String {
    let out = Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .current_dir(d)
        .stdin(Stdio::null())
        .output()
        .expect("script (util-linux) runs commands on a terminal");
    assert_code(&out, 0, cmd);
    stdout(&out)
}

#[test]
fn progress_bars_only_on_a_terminal_and_never_with_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_ok(d, &["create", "-f", "qcow2", "p.qcow2", "16M"]);
    qemu_io(d, "qcow2", "p.qcow2", &["write -P 3 0 12M"]);
    qemu_ok(
        d,
        &[
            "create", "-f", "qcow2", "-b", "p.qcow2", "-F", "qcow2", "t.qcow2", "16M",
        ],
    );
    let q = QCOWX;
    let tty = on_a_terminal(d, &format!("{q} convert -O raw p.qcow2 a.raw"));
    assert!(tty.contains("converting"), "{tty:?}");
    assert!(tty.contains("MiB"), "{tty:?}");
    let tty = on_a_terminal(d, &format!("{q} export p.qcow2 b.raw"));
    assert!(tty.contains("exporting"), "{tty:?}");
    let tty = on_a_terminal(d, &format!("{q} import t.qcow2 i.qcow2"));
    assert!(tty.contains("importing"), "{tty:?}");
    assert!(tty.contains("Imported 2 layers"), "{tty:?}");
    // Not with -q, not with JSON: the terminal shows the JSON object alone.
    let tty = on_a_terminal(d, &format!("{q} -q convert -O raw p.qcow2 c.raw"));
    assert!(tty.is_empty(), "{tty:?}");
    let tty = on_a_terminal(d, &format!("{q} import --output=json t.qcow2 j.qcow2"));
    let v: Value = serde_json::from_str(&tty).unwrap_or_else(|e| panic!("{e}: {tty:?}"));
    assert_eq!(v["snapshots"], 1);
    // In a pipe nothing but the output (checked by `ok` for every command).
    let out = ok_quiet(d, &["convert", "-O", "raw", "p.qcow2", "d.raw"]);
    assert!(out.stdout.is_empty());
}

#[test]
fn a_closed_stdout_is_a_clean_exit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok_quiet(d, &["create", "p.qcow2", "4M"]);
    ok_quiet(
        d,
        &[
            "io",
            "p.qcow2",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 1M 64k",
        ],
    );
    ok_quiet(d, &["snapshot", "p.qcow2", "s"]);
    for args in [
        &["tree", "p.qcow2"][..],
        &["tree", "--dot", "p.qcow2"][..],
        &["tree", "--output=json", "p.qcow2"][..],
        &["map", "p.qcow2"][..],
        &["map", "--output=json", "p.qcow2"][..],
        &["compare", "p.qcow2", "p.qcow2"][..],
        &["completions", "bash"][..],
        &["man"][..],
    ] {
        ok_into_closed_stdout(d, args);
    }
}

// ---- JSON against spec/cli-json.md -------------------------------------------------

/// One documented key.
#[derive(Debug, Clone)]
struct KeySpec {
    ty: String,
    optional: bool,
    nullable: bool,
}

/// The key tables of spec/cli-json.md: command -> object path -> key -> spec.
type Schema = BTreeMap<String, BTreeMap<String, BTreeMap<String, KeySpec>>>;

fn parse_schema() -> Schema {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/cli-json.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut schema = Schema::new();
    let mut command: Option<String> = None;
    let mut object = String::new();
    let mut in_table = false;
    let mut tables_in_section = 0;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            // "## `qcowx CMD ...`" starts a command's section.
            command = h
                .strip_prefix("`qcowx ")
                .and_then(|r| r.split_whitespace().next())
                .map(String::from);
            tables_in_section = 0;
            in_table = false;
            object.clear();
            continue;
        }
        let Some(cmd) = &command else { continue };
        if let Some(rest) = line.strip_prefix("Keys of `") {
            object = rest.split('`').next().unwrap().to_string();
            continue;
        }
        if line.starts_with('|') {
            let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
            if cells[0] == "key" {
                in_table = true;
                if tables_in_section == 0 {
                    object.clear();
                }
                tables_in_section += 1;
                continue;
            }
            if !in_table || cells[0].starts_with("---") {
                continue;
            }
            let key = cells[0].trim_matches('`').to_string();
            let ty = cells[1];
            let base = ty.split([',', ' ']).next().unwrap().to_string();
            assert!(
                ["string", "integer", "boolean", "array", "object"].contains(&base.as_str()),
                "{cmd} {object} {key}: type {ty:?}"
            );
            let spec = KeySpec {
                ty: base,
                optional: ty.contains("*omitted"),
                nullable: ty.contains("*nullable*"),
            };
            schema
                .entry(cmd.clone())
                .or_default()
                .entry(object.clone())
                .or_default()
                .insert(key, spec);
        } else if !line.trim().is_empty() {
            in_table = false;
        }
    }
    schema
}

/// The values at `path` (`a.b`, `a[]`) of `v`.
fn at_path<'a>(v: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut cur = vec![v];
    if path.is_empty() {
        return cur;
    }
    for part in path.split('.') {
        let (name, array) = match part.strip_suffix("[]") {
            Some(n) => (n, true),
            None => (part, false),
        };
        let mut next = Vec::new();
        for c in cur {
            if let Some(x) = c.get(name) {
                if array {
                    next.extend(
                        x.as_array()
                            .unwrap_or_else(|| panic!("{name} is not an array")),
                    );
                } else {
                    next.push(x);
                }
            }
        }
        cur = next;
    }
    cur
}

fn type_ok(v: &Value, ty: &str) -> bool {
    match ty {
        "string" => v.is_string(),
        "integer" => v.is_u64() || v.is_i64(),
        "boolean" => v.is_boolean(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}

/// Checks `v` (an output of `cmd`) against the schema; records the keys seen.
fn check_against(
    schema: &Schema,
    cmd: &str,
    v: &Value,
    seen: &mut BTreeSet<(String, String, String)>,
) {
    let objects = schema
        .get(cmd)
        .unwrap_or_else(|| panic!("spec/cli-json.md documents no JSON for `{cmd}`"));
    for (path, keys) in objects {
        for obj in at_path(v, path) {
            let map = obj
                .as_object()
                .unwrap_or_else(|| panic!("{cmd} {path}: not an object: {obj}"));
            for k in map.keys() {
                assert!(
                    keys.contains_key(k),
                    "{cmd}: key `{k}` of `{path}` is not documented in spec/cli-json.md"
                );
            }
            for (k, spec) in keys {
                match map.get(k) {
                    None => assert!(spec.optional, "{cmd}: `{path}` lacks `{k}`: {obj}"),
                    Some(Value::Null) => {
                        assert!(spec.nullable, "{cmd}: `{path}.{k}` is null: {obj}");
                        seen.insert((cmd.into(), path.clone(), k.clone()));
                    }
                    Some(x) => {
                        assert!(
                            type_ok(x, &spec.ty),
                            "{cmd}: `{path}.{k}` is not a {}: {x}",
                            spec.ty
                        );
                        seen.insert((cmd.into(), path.clone(), k.clone()));
                    }
                }
            }
        }
    }
}

#[test]
fn every_commands_json_matches_the_documented_schema() {
    let schema = parse_schema();
    let documented: BTreeSet<&str> = schema.keys().map(String::as_str).collect();
    assert_eq!(
        documented,
        [
            "check", "compare", "diff", "fork", "gc", "import", "info", "list", "map", "receive",
            "measure", "resize", "snapshot", "tree"
        ]
        .into_iter()
        .collect(),
        "commands with key tables in spec/cli-json.md"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut seen = BTreeSet::new();
    let mut outputs: Vec<(&str, Value)> = Vec::new();
    let mut run_json = |cmd: &'static str, args: &[&str], code: i32| {
        let out = qcowx(d, args);
        assert_code(&out, code, &format!("{args:?}"));
        outputs.push((cmd, json(&out)));
    };

    // info: v3 with backing and snapshots, and v2 (no version-3-only keys).
    qemu_ok(d, &["create", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_io(d, "qcow2", "base.qcow2", &["write -P 1 0 128k"]);
    ok_quiet(
        d,
        &[
            "create",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "img.qcow2",
            "4M",
        ],
    );
    ok_quiet(d, &["io", "img.qcow2", "-c", "write -P 2 1M 64k"]);
    ok_quiet(d, &["snapshot", "img.qcow2", "s1"]);
    ok_quiet(d, &["io", "img.qcow2", "-c", "write -P 3 2M 64k"]);
    ok_quiet(d, &["snapshot", "img.qcow2", "s2"]);
    ok_quiet(d, &["fork", "img.qcow2", "s1", "dev"]);
    run_json("info", &["info", "--output=json", "img.qcow2"], 0);
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "1M",
        ],
    );
    run_json("info", &["info", "--output=json", "v2.qcow2"], 0);
    // An image with a persistent bitmap (the `bitmaps` key).
    ok_quiet(d, &["create", "bm.qcow2", "1M"]);
    ok_quiet(d, &["bitmap", "--add", "bm.qcow2", "b0"]);
    run_json("info", &["info", "--output=json", "bm.qcow2"], 0);
    // measure: of a qcow2 image with a bitmap (the `bitmaps` key), and of a size.
    run_json("measure", &["measure", "--output=json", "bm.qcow2"], 0);
    run_json("measure", &["measure", "--output=json", "--size", "1G"], 0);
    // An image whose base is a snapshot in an object store (the `remote-base` key;
    // info does not open the store): a plain image given the header extension.
    ok_quiet(d, &["create", "remote.qcow2", "1M"]);
    {
        use qcowx_core::format::extensions::Extension;
        use qcowx_core::format::header::Header;
        use qcowx_core::format::remote::{RemoteBase, EXT_REMOTE_BASE};
        let path = d.join("remote.qcow2");
        let bytes = std::fs::read(&path).unwrap();
        let mut h = Header::parse(&bytes[..65536], bytes.len() as u64).unwrap();
        let base = RemoteBase {
            url: "s3://bucket/prefix".into(),
            endpoint: String::new(),
            uid: 0xabc,
            cache_bytes: 1 << 30,
        };
        h.extensions.set(Extension {
            kind: EXT_REMOTE_BASE,
            data: base.encode(),
        });
        h.layout_backing();
        let mut out = bytes.clone();
        out[..65536].copy_from_slice(&h.to_cluster().unwrap());
        std::fs::write(&path, out).unwrap();
    }
    run_json("info", &["info", "--output=json", "remote.qcow2"], 0);

    // check: clean; leaked then repaired; corrupted then repaired; compressed and
    // fragmented clusters.
    qemu_ok(d, &["create", "-f", "qcow2", "c.qcow2", "16M"]);
    qemu_io(d, "qcow2", "c.qcow2", &["write -P 7 0 128k"]);
    std::fs::copy(d.join("c.qcow2"), d.join("leak.qcow2")).unwrap();
    std::fs::copy(d.join("c.qcow2"), d.join("bad.qcow2")).unwrap();
    {
        use std::os::unix::fs::FileExt;
        // 16-bit refcounts in the block at 0x20000: cluster 7 leaks, cluster 5 is
        // under-counted.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("leak.qcow2"))
            .unwrap();
        f.write_all_at(&[0, 1], 0x20000 + 2 * 7).unwrap();
        f.set_len(8 * CS).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("bad.qcow2"))
            .unwrap();
        f.write_all_at(&[0, 0], 0x20000 + 2 * 5).unwrap();
    }
    run_json("check", &["check", "--output=json", "c.qcow2"], 0);
    run_json("check", &["check", "--output=json", "leak.qcow2"], 3);
    run_json("check", &["check", "--output=json", "-r", "leak.qcow2"], 0);
    run_json("check", &["check", "--output=json", "bad.qcow2"], 2);
    run_json("check", &["check", "--output=json", "-r", "bad.qcow2"], 0);
    // A dirty image QEMU left behind (lazy refcounts, a crash): stale refcounts.
    qemu_ok(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "dirty.qcow2",
            "4M",
        ],
    );
    let crashed = qemu_io_crash(d, "dirty.qcow2");
    assert!(!crashed.status.success(), "qemu-io abort ends the process");
    run_json("check", &["check", "--output=json", "dirty.qcow2"], 2);
    qemu_ok(d, &["create", "-f", "qcow2", "frag.qcow2", "1M"]);
    qemu_io(
        d,
        "qcow2",
        "frag.qcow2",
        &["write -P 1 128k 64k", "write -P 2 0 64k"],
    );
    ok_quiet(
        d,
        &["convert", "-c", "-O", "qcow2", "frag.qcow2", "comp.qcow2"],
    );
    run_json("check", &["check", "--output=json", "comp.qcow2"], 0);
    run_json("check", &["check", "--output=json", "frag.qcow2"], 0);

    // receive: a full stream into a new image.
    ok_quiet(d, &["create", "src.qcow2", "1M"]);
    ok_quiet(d, &["io", "src.qcow2", "-c", "write -P 4 0 64k"]);
    ok_quiet(d, &["snapshot", "src.qcow2", "r1"]);
    ok(d, &["send", "-o", "r1.stream", "src.qcow2", "r1"]);
    run_json(
        "receive",
        &["receive", "--output=json", "-i", "r1.stream", "dst.qcow2"],
        0,
    );

    // list, diff, tree, map (a chain: offsets and no offsets), resize, compare.
    run_json("list", &["list", "--output=json", "img.qcow2"], 0);
    run_json(
        "diff",
        &["diff", "--output=json", "img.qcow2", "s1", "s2"],
        0,
    );
    run_json("tree", &["tree", "--output=json", "img.qcow2"], 0);
    run_json("map", &["map", "--output=json", "img.qcow2"], 0);
    run_json(
        "map",
        &["map", "--output=json", "--snapshot", "s1", "img.qcow2"],
        0,
    );
    run_json(
        "compare",
        &["compare", "--output=json", "img.qcow2", "base.qcow2"],
        1,
    );
    run_json(
        "compare",
        &["compare", "--output=json", "c.qcow2", "c.qcow2"],
        0,
    );
    run_json(
        "resize",
        &["resize", "--output=json", "img.qcow2", "+1M"],
        0,
    );
    // gc after deletes; import of a two-layer chain.
    ok_quiet(d, &["delete", "img.qcow2", "--snapshot", "s2"]);
    run_json("gc", &["gc", "--output=json", "img.qcow2"], 0);
    ok_quiet(
        d,
        &[
            "create",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "4M",
        ],
    );
    run_json(
        "import",
        &["import", "--output=json", "top.qcow2", "imp.qcowx"],
        0,
    );
    // snapshot and fork: the root created.
    run_json(
        "snapshot",
        &["snapshot", "--output=json", "img.qcow2", "s3"],
        0,
    );
    run_json(
        "fork",
        &["fork", "--output=json", "img.qcow2", "s3", "v3"],
        0,
    );

    for (cmd, v) in &outputs {
        check_against(&schema, cmd, v, &mut seen);
    }
    // Every documented key turned up in some output.
    for (cmd, objects) in &schema {
        for (path, keys) in objects {
            for k in keys.keys() {
                assert!(
                    seen.contains(&(cmd.clone(), path.clone(), k.clone())),
                    "`{cmd}`: documented key `{k}` of `{path}` never appeared in the \
                     outputs this test produced"
                );
            }
        }
    }
    // v2 info has none of the version-3-only keys.
    let v2 = &outputs[1].1;
    assert_eq!(v2["format-specific"]["data"]["compat"], "0.10");
    assert!(v2["format-specific"]["data"].get("extended-l2").is_none());
}

/// `qemu-io -c 'write 0 64k' -c abort FILE`: QEMU writes, then dies as in a crash.
fn qemu_io_crash(dir: &Path, file: &str) -> std::process::Output {
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 9 0 64k", "-c", "abort", file],
        dir,
    )
}
