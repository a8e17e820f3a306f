//! Every command's JSON against the key tables of `spec/cli-json.md`: no undocumented
//! key, the documented types and nullability, and every documented key seen in some
//! output. QEMU's `qemu-img` and `qemu-io` build the images.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use qcowx_tests::cli::*;
use serde_json::Value;

mod common;
use common::CS;

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
