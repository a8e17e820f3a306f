//! Persistent dirty bitmaps as QEMU's and libnbd's tools see them: the bitmaps
//! `qemu-img info` lists, and the dirty ranges an NBD server's `qemu:dirty-bitmap:NAME`
//! context reports (`nbdinfo --map`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{describe, nbdinfo, qemu_info, run, KillOnDrop};

/// One bitmap as `qemu-img info` lists it: name, flags (`auto`, `in-use`), granularity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBitmap {
    /// Its name.
    pub name: String,
    /// Its flags, as QEMU names them.
    pub flags: Vec<String>,
    /// Bytes per bit.
    pub granularity: u64,
}

/// The bitmaps `qemu-img info --output=json` lists for `path` (`-U` with
/// `force_share`), in order.
pub fn qemu_bitmaps(path: &Path, force_share: bool) -> Vec<QemuBitmap> {
    let info = qemu_info(path, force_share);
    let list = &info["format-specific"]["data"]["bitmaps"];
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|b| QemuBitmap {
                    name: b["name"].as_str().unwrap_or_default().to_string(),
                    flags: b["flags"]
                        .as_array()
                        .map(|f| {
                            f.iter()
                                .map(|x| x.as_str().unwrap_or_default().to_string())
                                .collect()
                        })
                        .unwrap_or_default(),
                    granularity: b["granularity"].as_u64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The dirty ranges (offset, length; adjacent ones merged) that `nbdinfo
/// --map=qemu:dirty-bitmap:NAME` reads from the export at `uri`.
pub fn nbdinfo_dirty(uri: &str, name: &str) -> Vec<(u64, u64)> {
    let out = run(nbdinfo()
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg("--json")
        .arg(uri));
    assert!(out.status.success(), "nbdinfo --map: {}", describe(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --json is not JSON ({e}): {}", describe(&out)));
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().into_iter().flatten() {
        if e["type"].as_u64().unwrap_or(0) & 1 == 0 {
            continue;
        }
        let (o, l) = (
            e["offset"].as_u64().unwrap_or(0),
            e["length"].as_u64().unwrap_or(0),
        );
        match ranges.last_mut() {
            Some((po, pl)) if *po + *pl == o => *pl += l,
            _ => ranges.push((o, l)),
        }
    }
    ranges
}

/// The dirty ranges of bitmap `name` of `image` as `qemu-nbd -r -B NAME` exports them
/// (read with [`nbdinfo_dirty`]); the server runs on a socket in `scratch` and is
/// stopped before this returns.
pub fn qemu_nbd_dirty(image: &Path, name: &str, scratch: &Path) -> Vec<(u64, u64)> {
    let sock = scratch.join(format!("qemu-nbd-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let mut server = KillOnDrop(
        Command::new("qemu-nbd")
            .args(["-r", "-t", "-f", "qcow2", "-B", name, "-k"])
            .arg(&sock)
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start qemu-nbd"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if let Ok(Some(status)) = server.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = server.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("qemu-nbd -B {name} exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "qemu-nbd did not listen in 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let ranges = nbdinfo_dirty(&uri, name);
    drop(server);
    let _ = std::fs::remove_file(&sock);
    ranges
}
