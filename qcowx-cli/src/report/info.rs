//! `info`'s outputs: the image, its snapshot table and its file, as `qemu-img info`
//! prints them.

use std::io::{self, Write};

use qcowx_core::size::size_to_str;
use qcowx_core::{ImageInfo, SnapshotInfo};
use serde_json::{json, Map, Value};

/// `qemu-img info --output=json`'s object for a qcow2 image.
pub fn info_json(filename: &str, info: &ImageInfo, actual_size: u64) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!("qcow2"));
    m.insert("virtual-size".into(), json!(info.virtual_size));
    m.insert("actual-size".into(), json!(actual_size));
    m.insert("cluster-size".into(), json!(info.cluster_size));
    m.insert("dirty-flag".into(), json!(info.dirty));
    if let Some(b) = &info.backing_file {
        m.insert("backing-filename".into(), json!(b));
    }
    if let Some(b) = &info.full_backing_filename {
        m.insert("full-backing-filename".into(), json!(b));
    }
    if let Some(f) = &info.backing_format {
        m.insert("backing-filename-format".into(), json!(f));
    }
    // A base in an object store (qcowx's own; QEMU sees none).
    match &info.remote_base {
        Some(Ok(b)) => {
            m.insert(
                "remote-base".into(),
                json!({ "url": b.url, "endpoint": b.endpoint, "uid": format!("{:x}", b.uid),
                        "cache-bytes": b.cache_bytes }),
            );
        }
        Some(Err(e)) => {
            m.insert("remote-base".into(), json!({ "error": e }));
        }
        None => {}
    }
    if !info.snapshots.is_empty() {
        let snaps: Vec<Value> = info.snapshots.iter().map(snapshot_json).collect();
        m.insert("snapshots".into(), Value::Array(snaps));
    }
    let mut data = Map::new();
    data.insert("compat".into(), json!(info.compat));
    data.insert("compression-type".into(), json!(info.compression_type));
    if info.version >= 3 {
        data.insert("lazy-refcounts".into(), json!(info.lazy_refcounts));
    }
    data.insert("refcount-bits".into(), json!(info.refcount_bits));
    if info.version >= 3 {
        data.insert("corrupt".into(), json!(info.corrupt));
        data.insert("extended-l2".into(), json!(info.extended_l2));
    }
    if !info.bitmaps.is_empty() {
        let list: Vec<Value> = info
            .bitmaps
            .iter()
            .map(|b| json!({ "flags": bitmap_flags(b), "name": b.name, "granularity": b.granularity }))
            .collect();
        data.insert("bitmaps".into(), Value::Array(list));
    }
    m.insert(
        "format-specific".into(),
        json!({ "type": "qcow2", "data": Value::Object(data) }),
    );
    Value::Object(m)
}

/// A bitmap's flags as QEMU names them, in QEMU's order.
fn bitmap_flags(b: &qcowx_core::BitmapInfo) -> Vec<&'static str> {
    let mut f = Vec::new();
    if b.in_use {
        f.push("in-use");
    }
    if b.enabled {
        f.push("auto");
    }
    f
}

fn snapshot_json(s: &SnapshotInfo) -> Value {
    let mut v = json!({
        "id": s.id,
        "name": s.name,
        "vm-state-size": s.vm_state_size,
        "date-sec": s.date_sec,
        "date-nsec": s.date_nsec,
        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
    });
    // As QEMU: the key only when the entry records a count.
    if let Some(n) = s.icount {
        v["icount"] = json!(n);
    }
    v
}

/// The snapshot table as `qemu-img info` and `qemu-img snapshot -l` print it (nothing
/// when there are no snapshots).
pub fn snapshot_list(out: &mut dyn Write, snapshots: &[SnapshotInfo]) -> io::Result<()> {
    if snapshots.is_empty() {
        return Ok(());
    }
    writeln!(out, "Snapshot list:")?;
    writeln!(
        out,
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    )?;
    for s in snapshots {
        writeln!(
            out,
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            s.id,
            s.name,
            size_to_str(s.vm_state_size),
            local_date(i64::from(s.date_sec)),
            vm_clock(s.vm_clock_nsec),
            s.icount.map(|n| n.to_string()).unwrap_or_default()
        )?;
    }
    Ok(())
}

/// `qemu-img info --output=json` of a raw file (a raw base of a backing chain).
pub fn raw_info_json(filename: &str, size: u64, actual_size: u64) -> Value {
    json!({
        "filename": filename,
        "format": "raw",
        "virtual-size": size,
        "actual-size": actual_size,
        "dirty-flag": false,
    })
}

/// `qemu-img info` of a raw file up to the protocol child node.
pub fn raw_info_human(
    out: &mut dyn Write,
    filename: &str,
    size: u64,
    actual_size: u64,
) -> io::Result<()> {
    writeln!(out, "image: {filename}")?;
    writeln!(out, "file format: raw")?;
    writeln!(out, "virtual size: {} ({size} bytes)", size_to_str(size))?;
    writeln!(out, "disk size: {}", size_to_str(actual_size))
}

/// `qemu-img info`'s human output up to the protocol child node
/// ([`file_child_human`]).
pub fn info_human(
    out: &mut dyn Write,
    filename: &str,
    info: &ImageInfo,
    actual_size: u64,
) -> io::Result<()> {
    writeln!(out, "image: {filename}")?;
    writeln!(out, "file format: qcow2")?;
    writeln!(
        out,
        "virtual size: {} ({} bytes)",
        size_to_str(info.virtual_size),
        info.virtual_size
    )?;
    writeln!(out, "disk size: {}", size_to_str(actual_size))?;
    writeln!(out, "cluster_size: {}", info.cluster_size)?;
    if info.dirty {
        writeln!(out, "cleanly shut down: no")?;
    }
    if let Some(b) = &info.backing_file {
        write!(out, "backing file: {b}")?;
        if let Some(full) = info.full_backing_filename.as_ref().filter(|f| *f != b) {
            write!(out, " (actual path: {full})")?;
        }
        writeln!(out)?;
    }
    if let Some(f) = &info.backing_format {
        writeln!(out, "backing file format: {f}")?;
    }
    match &info.remote_base {
        Some(Ok(b)) => writeln!(
            out,
            "remote base: {} snapshot uid {:x} (cache at most {} bytes)",
            b.url, b.uid, b.cache_bytes
        )?,
        Some(Err(e)) => writeln!(out, "remote base: {e}")?,
        None => {}
    }
    snapshot_list(out, &info.snapshots)?;
    writeln!(out, "Format specific information:")?;
    writeln!(out, "    compat: {}", info.compat)?;
    writeln!(out, "    compression type: {}", info.compression_type)?;
    if info.version >= 3 {
        writeln!(out, "    lazy refcounts: {}", info.lazy_refcounts)?;
    }
    if !info.bitmaps.is_empty() {
        writeln!(out, "    bitmaps:")?;
        for (i, b) in info.bitmaps.iter().enumerate() {
            writeln!(out, "        [{i}]:")?;
            writeln!(out, "            flags:")?;
            for (j, f) in bitmap_flags(b).iter().enumerate() {
                writeln!(out, "                [{j}]: {f}")?;
            }
            writeln!(out, "            name: {}", b.name)?;
            writeln!(out, "            granularity: {}", b.granularity)?;
        }
    }
    writeln!(out, "    refcount bits: {}", info.refcount_bits)?;
    if info.version >= 3 {
        writeln!(out, "    corrupt: {}", info.corrupt)?;
        writeln!(out, "    extended l2: {}", info.extended_l2)?;
    }
    Ok(())
}

/// `qemu-img info --output=json`'s `children` of an image stored in a file: the file
/// (`file_len` bytes long, `actual_size` on its file system) as the protocol node.
pub fn file_child_json(filename: &str, file_len: u64, actual_size: u64) -> Value {
    json!([{
        "name": "file",
        "info": {
            "children": [],
            "virtual-size": file_len,
            "filename": filename,
            "format": "file",
            "actual-size": actual_size,
            "format-specific": { "type": "file", "data": {} },
            "dirty-flag": false,
        },
    }])
}

/// `qemu-img info`'s human section of the protocol node ([`file_child_json`]).
pub fn file_child_human(
    out: &mut dyn Write,
    filename: &str,
    file_len: u64,
    actual_size: u64,
) -> io::Result<()> {
    writeln!(out, "Child node '/file':")?;
    writeln!(out, "    filename: {filename}")?;
    writeln!(out, "    protocol type: file")?;
    writeln!(
        out,
        "    file length: {} ({file_len} bytes)",
        size_to_str(file_len)
    )?;
    writeln!(out, "    disk size: {}", size_to_str(actual_size))
}

/// A snapshot's guest clock as `HHHH:MM:SS.mmm`.
fn vm_clock(nsec: u64) -> String {
    let secs = nsec / 1_000_000_000;
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (nsec / 1_000_000) % 1000
    )
}

/// `YYYY-MM-DD HH:MM:SS` in the local time zone, as `qemu-img` prints snapshot dates.
pub(super) fn local_date(secs: i64) -> String {
    let t: libc::time_t = secs as libc::time_t;
    // SAFETY: `tm` is a plain C struct for which all-zero bytes are a valid value, and
    // localtime_r only writes into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_clock_is_formatted_like_qemu() {
        assert_eq!(vm_clock(0), "0000:00:00.000");
        assert_eq!(vm_clock(3_723_456_000_000), "0001:02:03.456");
    }
}
