//! `qcowx tree`: the DOT output parsed back to the lineage and checked against the
//! JSON (with exclusive and mapped sizes), the human tree, SVG through the built-in
//! renderer or a `dot` program, and errors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use qcowx_tests::cli::*;
use serde_json::Value;

mod common;
use common::{CS, QCOWX};

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
