//! Human and JSON output, in `qemu-img`'s formats.

use std::io::{self, Write};
use std::path::Path;

use qcowx_core::control::{RangesJson, RootJson};
use qcowx_core::convert::{CompareReport, Mismatch};
use qcowx_core::import::ImportReport;
use qcowx_core::{CheckReport, GcReport, ImageInfo, Preallocation, Range, RootInfo, RootKind};
use serde_json::{json, Map, Value};

use qcowx_core::size::size_to_str;

mod info;
use info::local_date;
pub use info::{
    file_child_human, file_child_json, info_human, info_json, raw_info_human, raw_info_json,
    snapshot_list,
};

/// Problems a repair fixed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fixed {
    /// Corruptions fixed.
    pub corruptions: u64,
    /// Leaked clusters fixed.
    pub leaks: u64,
}

/// Pretty-prints `v` with a four-space indent, as `qemu-img` does.
pub fn write_json(out: &mut dyn Write, v: &Value) -> io::Result<()> {
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut *out, fmt);
    serde::Serialize::serialize(v, &mut ser).map_err(io::Error::from)?;
    writeln!(out)
}

/// `qemu-img create`'s line (which names the preallocation only when there is one).
pub fn formatting_line(
    out: &mut dyn Write,
    file: &Path,
    info: &ImageInfo,
    prealloc: Preallocation,
) -> io::Result<()> {
    write!(
        out,
        "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={}",
        file.display(),
        info.cluster_size,
        on_off(info.extended_l2),
    )?;
    if prealloc != Preallocation::Off {
        write!(out, " preallocation={}", prealloc.name())?;
    }
    write!(
        out,
        " compression_type={} size={}",
        info.compression_type, info.virtual_size
    )?;
    if let Some(b) = &info.backing_file {
        write!(out, " backing_file={b}")?;
    }
    if let Some(f) = &info.backing_format {
        write!(out, " backing_fmt={f}")?;
    }
    writeln!(
        out,
        " lazy_refcounts={} refcount_bits={}",
        on_off(info.lazy_refcounts),
        info.refcount_bits
    )
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// `qemu-img check --output=json`'s object: zero counters are left out, except
/// `check-errors`.
pub fn check_json(filename: &str, r: &CheckReport, fixed: Option<&Fixed>) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!("qcow2"));
    m.insert("check-errors".into(), json!(r.check_errors));
    if r.dirty {
        // Not in qemu-img's object: present only when set, so a clean image's object
        // is exactly qemu-img's.
        m.insert("dirty-flag".into(), json!(true));
    }
    let fixed = fixed.copied().unwrap_or_default();
    for (key, v) in [
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", fixed.corruptions),
        ("leaks-fixed", fixed.leaks),
        ("image-end-offset", r.image_end_offset),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
        ("stale-corruptions", r.stale_corruptions),
    ] {
        if v != 0 {
            m.insert(key.into(), json!(v));
        }
    }
    Value::Object(m)
}

/// `qemu-img check`'s human output.
pub fn check_human(out: &mut dyn Write, r: &CheckReport, fixed: Option<&Fixed>) -> io::Result<()> {
    if let Some(f) = fixed.filter(|f| f.corruptions > 0 || f.leaks > 0) {
        writeln!(
            out,
            "The following inconsistencies were found and repaired:\n\n    \
             {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
            f.leaks, f.corruptions
        )?;
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        writeln!(out, "No errors were found on the image.")?;
    } else {
        if r.corruptions > 0 {
            writeln!(
                out,
                "\n{} errors were found on the image.\n\
                 Data may be corrupted, or further writes to the image may corrupt it.",
                r.corruptions
            )?;
        }
        if r.leaks > 0 {
            writeln!(
                out,
                "\n{} leaked clusters were found on the image.\n\
                 This means waste of disk space, but no harm to data.",
                r.leaks
            )?;
        }
        if r.check_errors > 0 {
            writeln!(
                out,
                "\n{} internal errors have occurred during the check.",
                r.check_errors
            )?;
        }
        if r.stale_corruptions > 0 {
            let why = if r.dirty {
                "The image was not closed cleanly (dirty bit set): "
            } else {
                ""
            };
            writeln!(
                out,
                "\n{why}{} of the errors are stale refcounts, which a repair rebuilds \
                 (`qcowx check --repair`, or opening the image for writing); {} damage the \
                 structure.",
                r.stale_corruptions,
                r.corruptions - r.stale_corruptions
            )?;
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let alloc = r.allocated_clusters as f64;
        writeln!(
            out,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            alloc * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / alloc,
            r.compressed_clusters as f64 * 100.0 / alloc
        )?;
    }
    if r.image_end_offset != 0 {
        writeln!(out, "Image end offset: {}", r.image_end_offset)?;
    }
    Ok(())
}

fn kind_name(k: RootKind) -> &'static str {
    match k {
        RootKind::Vdi => "vdi",
        RootKind::Snapshot => "snapshot",
    }
}

/// `qcowx list --output=json`'s object: `{"filename", "roots": [...]}`, one element per
/// live root, the default VDI first (see `spec/cli-json.md`); a root has the keys of the
/// control protocol's roots.
pub fn list_json(filename: &str, roots: &[RootInfo]) -> Value {
    let roots: Vec<RootJson> = roots.iter().map(RootJson::from).collect();
    json!({ "filename": filename, "roots": roots })
}

/// What `qcowx snapshot` and `qcowx fork` print with `--output=json`: the new root,
/// with the keys of `list`'s roots.
pub fn created_json(filename: &str, root: &RootInfo) -> Value {
    json!({ "filename": filename, "root": RootJson::from(root) })
}

/// `qcowx list`'s table: one line per root, columns as wide as their contents.
pub fn list_human(out: &mut dyn Write, roots: &[RootInfo]) -> io::Result<()> {
    let header = ["KIND", "NAME", "VDI", "PARENT", "SIZE", "DATE", "ID"];
    let rows: Vec<[String; 7]> = roots
        .iter()
        .map(|r| {
            [
                kind_name(r.kind).to_string(),
                r.name.clone(),
                r.vdi.clone(),
                r.parent.clone().unwrap_or_else(|| "-".into()),
                size_to_str(r.size),
                if r.created_ns == 0 {
                    "-".into()
                } else {
                    local_date((r.created_ns / 1_000_000_000) as i64)
                },
                r.id.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |out: &mut dyn Write, cells: [&str; 7]| -> io::Result<()> {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            text.push_str(&format!("{cell:<w$}"));
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(out, header)?;
    for row in &rows {
        line(out, row.each_ref().map(String::as_str))?;
    }
    Ok(())
}

/// `qcowx gc --output=json`'s object (see `spec/cli-json.md`): the control protocol's
/// gc report and `filename`.
pub fn gc_json(filename: &str, r: &GcReport) -> Value {
    with_keys(r, [("filename", filename)])
}

/// `v`'s JSON object with the string keys `extra` added.
fn with_keys<const N: usize>(v: &impl serde::Serialize, extra: [(&str, &str); N]) -> Value {
    let mut v = serde_json::to_value(v).unwrap_or_else(|_| Value::Object(Map::new()));
    if let Value::Object(m) = &mut v {
        for (k, x) in extra {
            m.insert(k.into(), x.into());
        }
    }
    v
}

/// `qcowx gc`'s summary.
pub fn gc_human(out: &mut dyn Write, r: &GcReport) -> io::Result<()> {
    writeln!(out, "roots removed: {}", r.roots_removed)?;
    writeln!(
        out,
        "clusters freed: {} ({}, {} bytes)",
        r.clusters_freed,
        size_to_str(r.bytes_freed),
        r.bytes_freed
    )?;
    writeln!(
        out,
        "file size: {} -> {} bytes",
        r.file_size_before, r.file_size_after
    )?;
    if let (Some(before), Some(after)) = (r.allocated_before, r.allocated_after) {
        writeln!(
            out,
            "allocated on disk: {} -> {} ({before} -> {after} bytes)",
            size_to_str(before),
            size_to_str(after)
        )?;
    }
    if r.file_size_after > r.file_size_before {
        writeln!(
            out,
            "note: the file grew: the compacted snapshot table is written past the end, \
             and freed clusters are hole-punched in place, not cut off"
        )?;
    }
    if !r.refcounts_exact {
        writeln!(
            out,
            "refcounts: stale (the image was written during gc; exact after a clean close)"
        )?;
    }
    Ok(())
}

/// `qcowx diff --output=json`'s object (see `spec/cli-json.md`): the control
/// protocol's `ranges` and `bytes`, with `filename`, `from` and `to`.
pub fn diff_json(filename: &str, from: &str, to: &str, ranges: &[Range]) -> Value {
    with_keys(
        &RangesJson::from(ranges),
        [("filename", filename), ("from", from), ("to", to)],
    )
}

/// `qcowx diff`'s output: `OFFSET LENGTH` per range (bytes), then the total.
pub fn diff_human(out: &mut dyn Write, ranges: &[Range]) -> io::Result<()> {
    for r in ranges {
        writeln!(out, "{} {}", r.offset, r.length)?;
    }
    let total: u64 = ranges.iter().map(|r| r.length).sum();
    writeln!(out, "total: {total} bytes")
}

/// `qcowx import --output=json`'s object (see `spec/cli-json.md`).
pub fn import_json(top: &str, output: &str, r: &ImportReport) -> Value {
    let layers: Vec<Value> = r
        .layers
        .iter()
        .map(|l| {
            json!({
                "filename": l.path.display().to_string(),
                "format": l.format.name(),
                "virtual-size": l.virtual_size,
                "snapshot": l.snapshot,
                "data-bytes": l.data_bytes,
                "zero-bytes": l.zero_bytes,
            })
        })
        .collect();
    json!({
        "filename": output,
        "top": top,
        "virtual-size": r.virtual_size,
        "cluster-size": r.cluster_size,
        "snapshots": r.layers.iter().filter(|l| l.snapshot.is_some()).count(),
        "layers": layers,
    })
}

/// `qcowx import`'s summary: one line per layer, bottom first.
pub fn import_human(out: &mut dyn Write, output: &str, r: &ImportReport) -> io::Result<()> {
    for l in &r.layers {
        let role = match &l.snapshot {
            Some(s) => format!("snapshot '{s}'"),
            None => "default VDI".to_string(),
        };
        writeln!(
            out,
            "{} ({}, {}) -> {role}: {} of data, {} of zeros",
            l.path.display(),
            l.format.name(),
            size_to_str(l.virtual_size),
            size_to_str(l.data_bytes),
            size_to_str(l.zero_bytes)
        )?;
    }
    let snapshots = r.layers.iter().filter(|l| l.snapshot.is_some()).count();
    writeln!(
        out,
        "Imported {} layers into '{output}': {snapshots} snapshots and the default VDI.",
        r.layers.len()
    )
}

/// `qcowx resize --output=json`'s object.
pub fn resize_json(filename: &str, old: u64, new: u64) -> Value {
    json!({ "filename": filename, "old-size": old, "new-size": new })
}

/// `qcowx compare --output=json`'s object.
pub fn compare_json(a: &str, b: &str, r: &CompareReport) -> Value {
    json!({
        "filename-a": a,
        "filename-b": b,
        "size-a": r.size_a,
        "size-b": r.size_b,
        "identical": r.identical(),
        "mismatch-offset": r.mismatch_offset(),
        "mismatch-kind": match r.mismatch {
            None => Value::Null,
            Some(Mismatch::Content(_)) => json!("content"),
            Some(Mismatch::Size) => json!("size"),
            Some(Mismatch::Status(_)) => json!("block-status"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(kind: RootKind, name: &str, parent: Option<&str>) -> RootInfo {
        RootInfo {
            kind,
            name: name.into(),
            uid: 0xabc,
            vdi: "default".into(),
            parent: parent.map(String::from),
            created_ns: 1_700_000_000_123_456_789,
            size: 1 << 20,
            id: Some("3".into()),
        }
    }

    #[test]
    fn list_json_has_the_documented_keys() {
        let v = list_json(
            "a.qcow2",
            &[
                root(RootKind::Snapshot, "s", None),
                root(RootKind::Vdi, "v", Some("s")),
            ],
        );
        let r = &v["roots"][0];
        let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "date-nsec",
                "date-sec",
                "id",
                "kind",
                "name",
                "parent",
                "uid",
                "vdi",
                "virtual-size"
            ]
        );
        assert_eq!(r["uid"], "abc");
        assert_eq!(r["parent"], Value::Null);
        assert_eq!(r["date-sec"], 1_700_000_000u64);
        assert_eq!(r["date-nsec"], 123_456_789);
        assert_eq!(v["roots"][1]["kind"], "vdi");
        assert_eq!(v["roots"][1]["parent"], "s");
    }

    #[test]
    fn list_human_aligns_columns() {
        let mut buf = Vec::new();
        let mut long = root(RootKind::Snapshot, "a-much-longer-name", None);
        long.created_ns = 0;
        long.id = None;
        list_human(&mut buf, &[root(RootKind::Vdi, "v", Some("s")), long]).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = |l: &str| l.find("default").unwrap();
        assert_eq!(col(lines[1]), col(lines[2]), "{text}");
        assert!(lines[0].starts_with("KIND      NAME"), "{text}");
        let cells: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(cells[cells.len() - 2..], ["-", "-"], "{text}");
        assert_eq!(lines[1].find("2023"), lines[0].find("DATE"), "{text}");
    }

    #[test]
    fn diff_human_ends_with_the_total() {
        let mut buf = Vec::new();
        let ranges = [
            Range {
                offset: 0,
                length: 65536,
            },
            Range {
                offset: 1 << 20,
                length: 131072,
            },
        ];
        diff_human(&mut buf, &ranges).unwrap();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "0 65536\n1048576 131072\ntotal: 196608 bytes\n"
        );
        assert_eq!(diff_json("f", "a", "b", &ranges)["bytes"], 196608);
    }

    #[test]
    fn check_json_leaves_out_zero_counters_but_check_errors() {
        let r = CheckReport {
            leaks: 2,
            total_clusters: 16,
            image_end_offset: 4096,
            ..CheckReport::default()
        };
        let v = check_json("x", &r, None);
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "check-errors",
                "filename",
                "format",
                "image-end-offset",
                "leaks",
                "total-clusters"
            ]
        );
    }
}
