//! `qcowx-nbd`'s protocol edge cases, driven with `nbdsh` (libnbd from Python) and a
//! hand-made client: structured and simple replies, flags, out-of-range and oversized
//! requests, read-only exports, options before GO, a minimum block size, and a client
//! that disconnects in the middle of a write's payload.
//!
//! Every test starts its own server process and checks the image afterwards with
//! qcowx and `qemu-img check`; the shared helpers and the conventions (tools, the
//! server binary, `QCOWX_NBD`) are in `qcowx_tests::nbd_tools` (tests/src/nbd_tools.rs).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

use qcowx_tests::nbd_tools::*;
use qcowx_tests::*;

// ---- protocol edge cases with nbdsh ---------------------------------------------------------

#[test]
fn nbdsh_edge_cases_with_structured_replies() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    image_with_vdis(&img);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t", "-v"]);
    let script = format!(
        r#"
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.set_strict_mode(0)
h.connect_uri("{uri}")
size = h.get_size()
assert size == 4 << 20
assert h.get_structured_replies_negotiated()
assert h.can_df() and h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero()
assert h.can_fast_zero() and h.can_cache() and h.can_multi_conn()
assert h.can_meta_context("base:allocation") and h.can_meta_context("qemu:allocation-depth")
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20

# Sparse read: a data chunk for the written cluster, holes for the rest.
chunks = []
def cb(sub, off, status, err):
    chunks.append((off, len(sub), status))
    return 0
buf = h.pread_structured(3 * 65536, 0, cb)
assert buf[:65536] == b"\x02" * 65536 and buf[65536:] == bytes(2 * 65536), "content"
assert (0, 65536, nbd.READ_DATA) in chunks, chunks
assert any(s == nbd.READ_HOLE for (_, _, s) in chunks), chunks
# DF: one content chunk.
chunks.clear()
h.pread_structured(3 * 65536, 0, cb, nbd.CMD_FLAG_DF)
assert len(chunks) == 1 and chunks[0] == (0, 3 * 65536, nbd.READ_DATA), chunks

# FUA writes, unaligned, read back.
h.pwrite(b"fua!" * 300, 1000001, nbd.CMD_FLAG_FUA)
assert h.pread(1200, 1000001) == b"fua!" * 300
h.zero(4096, 70000, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 70000) == bytes(4096)
h.flush()
h.cache(1 << 20, 0)

# Fast zero: a partial cluster holding data cannot be zeroed by metadata alone.
h.pwrite(b"x" * 512, 2 * 65536 + 512)
expect_err("ENOTSUP", h.zero, 512, 2 * 65536 + 512, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(512, 2 * 65536 + 512) == b"x" * 512
h.zero(65536, 2 * 65536, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 2 * 65536) == bytes(65536)

# Block status: two contexts, REQ_ONE gives one extent each.
seen = {{}}
def bs(ctx, off, entries, err):
    seen[ctx] = list(entries)
    return 0
h.block_status(size, 0, bs)
assert seen["base:allocation"][1] == 0, seen
assert seen["qemu:allocation-depth"][1] == 1, seen
h.block_status(size, 0, bs, nbd.CMD_FLAG_REQ_ONE)
assert len(seen["base:allocation"]) == 2 and len(seen["qemu:allocation-depth"]) == 2, seen

# Out of range: EINVAL for reads, trims and block status; ENOSPC for writes.
expect_err("EINVAL", h.pread, 512, size - 256)
expect_err("ENOSPC", h.pwrite, b"y" * 512, size - 256)
expect_err("ENOSPC", h.zero, 512, size)
expect_err("EINVAL", h.trim, 512, size)
expect_err("EINVAL", h.block_status, 512, size, bs)
expect_err("EINVAL", h.pread, 512, 1 << 62)
# Oversized requests get EINVAL and the connection goes on.
expect_err("EINVAL", h.pread, 48 << 20, 0)
expect_err("EINVAL", h.pwrite, bytes(48 << 20), 0)
# Unknown flags and flags of another command.
expect_err("EINVAL", h.pread, 512, 0, 1 << 7)
expect_err("EINVAL", h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
expect_err("EINVAL", h.pwrite, b"z" * 512, 0, nbd.CMD_FLAG_NO_HOLE)
expect_err("EINVAL", h.flush, nbd.CMD_FLAG_DF)
assert h.pread(4, 1000001) == b"fua!"
h.shutdown()

# A snapshot export is read-only: writes get EPERM.
r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri("{snap}")
assert r.is_read_only()
assert not r.can_trim() and not r.can_zero()
expect_err("EPERM", r.pwrite, b"w" * 512, 0)
expect_err("EPERM", r.trim, 65536, 0)
expect_err("EPERM", r.zero, 65536, 0)
assert r.pread(4, 0) == b"\x01" * 4
r.shutdown()

# Repeated and informational options before GO.
o = nbd.NBD()
o.set_opt_mode(True)
o.connect_uri("{uri}")
names = []
o.opt_list(lambda n, d: names.append(n) or 0)
o.opt_list(lambda n, d: names.append(n) or 0)
assert sorted(names) == sorted(["default", "default@s1", "web", "web@w1"] * 2), names
ctxs = []
o.opt_list_meta_context(lambda c: ctxs.append(c) or 0)
o.opt_list_meta_context(lambda c: ctxs.append(c) or 0)
want = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:w1"]
assert sorted(ctxs) == sorted(want * 2), ctxs
o.set_export_name("web")
o.opt_info()
o.opt_info()
assert o.get_size() == 4 << 20
o.set_export_name("nope")
expect_err("ENOENT", o.opt_info)
o.set_export_name("web@w1")
o.opt_go()
assert o.is_read_only() and o.pread(4, 1 << 20) == b"\x03" * 4
o.shutdown()
print("ok")
"#,
        uri = server.uri("default"),
        snap = server.uri("default@s1"),
    );
    assert!(nbdsh_ok(&script).contains("ok"));
    // The errors came from the server, not from libnbd's own checks.
    for want in [
        "READ offset 4194048 length 512: error 22",
        "WRITE offset 4194048 length 512: error 28",
        "READ offset 0 length 50331648: error 22",
        "WRITE offset 0 length 50331648: error 22",
        "flags 0x80 are not valid for READ",
        "flags 0x8 are not valid for READ",
        "flags 0x2 are not valid for WRITE",
        "flags 0x4 are not valid for FLUSH",
        "WRITE on a read-only export",
        "TRIM on a read-only export",
        "WRITE_ZEROES on a read-only export",
        "error 95",
    ] {
        assert!(
            server.stderr_shows(want),
            "server log lacks {want:?}:\n{}",
            server.stderr()
        );
    }
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn nbdsh_edge_cases_with_simple_replies_and_a_minimum_block_size() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock_in(&dir)),
        &["-t", "-v", "--min-block-size", "4096"],
    );
    let script = format!(
        r#"
h.set_request_structured_replies(False)
h.add_meta_context("base:allocation")
h.set_strict_mode(0)
h.connect_uri("{uri}")
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
assert not h.can_meta_context("base:allocation")
assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096
h.pwrite(b"s" * 8192, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(8192, 4096) == b"s" * 8192
# Errors come as simple replies and leave the connection usable.
expect_err("EINVAL", h.pread, 4096, 512)
expect_err("EINVAL", h.pwrite, b"m" * 512, 4096)
expect_err("EINVAL", h.pread, 4096, 8 << 20)
expect_err("ENOSPC", h.pwrite, b"n" * 4096, 8 << 20)
expect_err("EINVAL", h.pread, 4096, 0, nbd.CMD_FLAG_DF)
expect_err("EINVAL", h.pread, 40 << 20, 0)
assert h.pread(4096, 4096)[:4] == b"ssss"
h.shutdown()
print("ok")
"#,
        uri = server.uri(""),
    );
    assert!(nbdsh_ok(&script).contains("ok"));
    for want in [
        "READ offset 512 length 4096: error 22: READ at offset 512 length 4096 is not aligned",
        "WRITE offset 4096 length 512: error 22",
        "WRITE offset 8388608 length 4096: error 28",
        "flags 0x4 are not valid for READ",
        "READ offset 0 length 41943040: error 22",
    ] {
        assert!(
            server.stderr_shows(want),
            "server log lacks {want:?}:\n{}",
            server.stderr()
        );
    }
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn an_abrupt_disconnect_mid_write_leaves_the_server_serving_others() {
    let dir = tempdir();
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let server = QcowxNbd::listen(&img, Listen::Unix(&sock_in(&dir)), &["-t"]);
    // A client connected throughout: one checked write per line on its stdin.
    let script = format!(
        r#"
import sys
h.connect_uri("{uri}")
print("ready", flush=True)
for line in sys.stdin:
    i = int(line)
    h.pwrite(bytes([i]) * 4096, 3 << 20)
    assert h.pread(4096, 3 << 20) == bytes([i]) * 4096
    print("ok", i, flush=True)
"#,
        uri = server.uri("default")
    );
    let mut keeper = nbdsh()
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nbdsh");
    let mut keeper_in = keeper.stdin.take().unwrap();
    let mut keeper_out = BufReader::new(keeper.stdout.take().unwrap());
    let mut line = String::new();
    keeper_out.read_line(&mut line).expect("nbdsh output");
    assert_eq!(line.trim(), "ready");
    for round in 0..3u8 {
        // A client that goes away in the middle of a write's payload.
        let mut s = UnixStream::connect(server.sock().unwrap()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(b"default");
        s.write_all(&opt).unwrap();
        let mut reply = [0u8; 10];
        s.read_exact(&mut reply).unwrap();
        let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
        req.extend_from_slice(&9u64.to_be_bytes());
        req.extend_from_slice(&(1u64 << 20).to_be_bytes());
        req.extend_from_slice(&(1u32 << 20).to_be_bytes());
        req.extend_from_slice(&vec![0xeeu8; 300_000]);
        s.write_all(&req).unwrap();
        drop(s);
        // The server goes on serving.
        qemu_io_nbd(
            &server.uri("default"),
            &[
                &format!("write -P {} 0 64k", 0x40 + round),
                &format!("read -P {} 0 64k", 0x40 + round),
                "read -P 0 1M 1M",
            ],
        );
        writeln!(keeper_in, "{}", 0x50 + round).unwrap();
        line.clear();
        keeper_out.read_line(&mut line).expect("nbdsh output");
        assert_eq!(
            line.trim(),
            format!("ok {}", 0x50 + round),
            "the long-lived client"
        );
    }
    drop(keeper_in);
    let status = keeper.wait().expect("nbdsh");
    assert!(status.success(), "long-lived nbdsh client failed");
    let out = run_ok(nbdinfo().arg(server.uri("")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("export-size: 8388608"));
    server.stop();
    let image = open_ro(&img);
    let mut b = vec![0u8; 2 << 20];
    image.read_at(&mut b, 0).unwrap();
    assert!(b[..65536].iter().all(|&x| x == 0x42));
    assert!(
        b[1 << 20..].iter().all(|&x| x == 0),
        "a torn write was applied"
    );
    let mut k = vec![0u8; 4096];
    image.read_at(&mut k, 3 << 20).unwrap();
    assert!(k.iter().all(|&x| x == 0x52));
    drop(image);
    assert_qemu_check_clean(&img);
}
