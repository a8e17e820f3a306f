//! `qcowx send` / `qcowx receive`: round trips judged by `qemu-img`, every stream
//! fault refused with the receiving image as it was, and receives killed at random
//! points that resume to completion.

mod common;
use common::QCOWX;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use qcowx_tests::cli::*;
use qcowx_tests::Rng;

/// `qcowx io -c CMD... FILE`.
fn io(dir: &Path, file: &str, cmds: &[&str]) {
    let mut args = vec!["io"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(file);
    ok(dir, &args);
}

/// `qcowx send ARGS -o OUT`.
fn send(dir: &Path, args: &[&str], out: &str) {
    let mut a = vec!["send", "-q", "-o", out];
    a.extend_from_slice(args);
    ok(dir, &a);
}

/// The raw content, as `qemu-img convert` reads it, of each snapshot in `names`.
fn contents(dir: &Path, file: &str, names: &[&str]) -> Vec<Vec<u8>> {
    names.iter().map(|n| qemu_raw(dir, file, Some(n))).collect()
}

/// What must not change when a receive is refused: the roots qcowx lists and a
/// digest of the content of every snapshot and of the default VDI.
fn state(dir: &Path, file: &str) -> (String, Vec<u64>) {
    let list = ok(dir, &["list", "--output=json", file]);
    let names: Vec<String> = json(&list)["roots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "snapshot")
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    let mut c: Vec<u64> = names
        .iter()
        .map(|n| digest(&qemu_raw(dir, file, Some(n))))
        .collect();
    c.push(digest(&qemu_raw(dir, file, None)));
    (stdout(&list), c)
}

/// A 64-bit digest of `bytes` (FNV-1a), so a mismatch prints short.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[test]
fn full_and_three_incrementals_round_trip_judged_by_qemu() {
    let d = qcowx_tests::tempdir();
    let dir = d.path();
    ok(dir, &["create", "a.qcow2", "32M"]);
    let names = ["s0", "s1", "s2", "s3"];
    for (i, s) in names.iter().enumerate() {
        scribble(dir, "a.qcow2", i as u64 + 1, 40, 32);
        ok(dir, &["snapshot", "a.qcow2", s]);
    }
    // The full stream through a pipe, as over ssh.
    let pipe = format!("{QCOWX} send a.qcow2 s0 | {QCOWX} receive b.qcow2");
    let out = Command::new("sh")
        .args(["-c", &pipe])
        .current_dir(dir)
        .output()
        .unwrap();
    assert_ok(&out, "send | receive");
    for w in names.windows(2) {
        let (from, to) = (w[0], w[1]);
        send(dir, &["--from", from, "a.qcow2", to], "inc.stream");
        let out = ok(dir, &["receive", "-i", "inc.stream", "b.qcow2"]);
        assert!(stdout(&out).contains("incremental"), "{}", stdout(&out));
    }
    assert_eq!(qemu_snapshot_names(dir, "b.qcow2"), names);
    assert_qemu_check_clean(dir, "b.qcow2");
    assert!(
        contents(dir, "b.qcow2", &names) == contents(dir, "a.qcow2", &names),
        "received snapshots differ from the sent ones"
    );
    // An incremental stream is small: about what changed, not the disk.
    send(dir, &["--from", "s2", "a.qcow2", "s3"], "inc.stream");
    let inc = std::fs::metadata(dir.join("inc.stream")).unwrap().len();
    assert!(inc < 4 << 20, "incremental stream of {inc} bytes");
}

/// `send --no-sync -o OUT` (no fdatasync of OUT, as `qemu-img convert` by default)
/// writes the same stream: received, it reads as the snapshot; without `-o` there is
/// nothing to sync and the option is refused.
#[test]
fn send_no_sync_writes_the_same_stream() {
    let d = qcowx_tests::tempdir();
    let dir = d.path();
    ok(dir, &["create", "a.qcow2", "8M"]);
    scribble(dir, "a.qcow2", 7, 30, 8);
    ok(dir, &["snapshot", "a.qcow2", "s0"]);
    send(dir, &["a.qcow2", "s0"], "synced.stream");
    send(dir, &["--no-sync", "a.qcow2", "s0"], "unsynced.stream");
    assert_eq!(
        std::fs::read(dir.join("synced.stream")).unwrap(),
        std::fs::read(dir.join("unsynced.stream")).unwrap(),
        "--no-sync changed the stream"
    );
    ok(dir, &["receive", "-i", "unsynced.stream", "b.qcow2"]);
    assert_qemu_check_clean(dir, "b.qcow2");
    assert!(contents(dir, "b.qcow2", &["s0"]) == contents(dir, "a.qcow2", &["s0"]));
    let out = Command::new(QCOWX)
        .args(["send", "--no-sync", "a.qcow2", "s0"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "--no-sync without -o was accepted");
}

#[test]
fn identity_not_name_decides_the_base() {
    let d = qcowx_tests::tempdir();
    let dir = d.path();
    ok(dir, &["create", "a.qcow2", "8M"]);
    io(dir, "a.qcow2", &["write -P 1 0 1M"]);
    ok(dir, &["snapshot", "a.qcow2", "base"]);
    io(dir, "a.qcow2", &["write -P 2 64k 64k"]);
    ok(dir, &["snapshot", "a.qcow2", "next"]);
    send(dir, &["a.qcow2", "base"], "full.stream");
    send(dir, &["--from", "base", "a.qcow2", "next"], "inc.stream");

    // A renamed base still matches.
    ok(dir, &["receive", "-i", "full.stream", "b.qcow2"]);
    ok(dir, &["rename", "--snapshot", "b.qcow2", "base", "golden"]);
    ok(dir, &["receive", "-i", "inc.stream", "b.qcow2"]);
    assert!(qemu_raw(dir, "b.qcow2", Some("next")) == qemu_raw(dir, "a.qcow2", Some("next")));
    // The same stream again: it is there already.
    fails(
        dir,
        &["receive", "-i", "inc.stream", "b.qcow2"],
        &["is in this image already", "'next'"],
    );

    // Another image's snapshot named 'base' is not the base.
    ok(dir, &["create", "c.qcow2", "8M"]);
    io(dir, "c.qcow2", &["write -P 1 0 1M"]);
    ok(dir, &["snapshot", "c.qcow2", "base"]);
    let before = std::fs::read(dir.join("c.qcow2")).unwrap();
    fails(
        dir,
        &["receive", "-i", "inc.stream", "c.qcow2"],
        &["which this image does not have", "identity"],
    );
    assert_eq!(std::fs::read(dir.join("c.qcow2")).unwrap(), before);
    // Its full stream neither: the name is taken by another snapshot; under
    // another name it goes in.
    fails(
        dir,
        &["receive", "-i", "full.stream", "c.qcow2"],
        &["named 'base' exists already"],
    );
    assert_eq!(std::fs::read(dir.join("c.qcow2")).unwrap(), before);
    ok(
        dir,
        &["receive", "-i", "full.stream", "--name", "base2", "c.qcow2"],
    );
    ok(dir, &["receive", "-i", "inc.stream", "c.qcow2"]);
    assert!(qemu_raw(dir, "c.qcow2", Some("next")) == qemu_raw(dir, "a.qcow2", Some("next")));
    // A VDI is sent as a snapshot of it.
    fails(
        dir,
        &["send", "-o", "x.stream", "a.qcow2", "default"],
        &["is a VDI", "snapshot --vdi default"],
    );
    // An incremental stream cannot create an image.
    fails(
        dir,
        &["receive", "-i", "inc.stream", "new.qcow2"],
        &["does not have"],
    );
    assert!(!dir.join("new.qcow2").exists());
}

/// Record boundaries of a stream file: (start, length) of each record.
fn records(stream: &[u8]) -> Vec<(usize, usize)> {
    let mut at = 216;
    let mut out = Vec::new();
    while at < stream.len() {
        let payload = u32::from_be_bytes(stream[at + 4..at + 8].try_into().unwrap()) as usize;
        out.push((at, 40 + payload));
        at += 40 + payload;
    }
    out
}

/// Receives `bytes` into `file` and expects a refusal naming `needles`, with the
/// image's roots and content as they were and a clean check.
fn refused(dir: &Path, file: &str, bytes: &[u8], needles: &[&str], what: &str) {
    let before = state(dir, file);
    std::fs::write(dir.join("bad.stream"), bytes).unwrap();
    let err = fails(dir, &["receive", "-i", "bad.stream", file], needles);
    assert!(err.contains("b.qcow2"), "{what}: {err}");
    assert_eq!(state(dir, file), before, "{what}: the image changed");
    assert_qemu_check_clean(dir, file);
}

#[test]
fn every_stream_fault_is_refused_and_changes_nothing() {
    let d = qcowx_tests::tempdir();
    let dir = d.path();
    ok(dir, &["create", "a.qcow2", "16M"]);
    scribble(dir, "a.qcow2", 7, 30, 16);
    ok(dir, &["snapshot", "a.qcow2", "s0"]);
    scribble(dir, "a.qcow2", 8, 30, 16);
    ok(dir, &["snapshot", "a.qcow2", "s1"]);
    send(dir, &["a.qcow2", "s0"], "full.stream");
    send(dir, &["--from", "s0", "a.qcow2", "s1"], "inc.stream");
    ok(dir, &["receive", "-i", "full.stream", "b.qcow2"]);
    let good = std::fs::read(dir.join("inc.stream")).unwrap();
    let recs = records(&good);
    assert!(recs.len() >= 4, "{} records", recs.len());
    let file_before = std::fs::read(dir.join("b.qcow2")).unwrap();

    // Faults found before any record applies leave the file byte for byte as it was.
    let mut magic = good.clone();
    magic[0] = b'X';
    refused(dir, "b.qcow2", &magic, &["not a qcowx stream"], "magic");
    let mut version = good.clone();
    version[11] = 9;
    refused(dir, "b.qcow2", &version, &["stream version 9"], "version");
    let mut header = good.clone();
    header[60] ^= 1;
    refused(dir, "b.qcow2", &header, &["header is damaged"], "header");
    let first = recs[0];
    let mut rec0 = good.clone();
    rec0[first.0 + first.1 - 1] ^= 0x40;
    refused(
        dir,
        "b.qcow2",
        &rec0,
        &["record 0", "checksum mismatch"],
        "record 0",
    );
    refused(
        dir,
        "b.qcow2",
        &good[..100],
        &["truncated"],
        "cut in header",
    );
    refused(
        dir,
        "b.qcow2",
        &good[..first.0 + 10],
        &["truncated", "record header"],
        "cut in record 0",
    );
    assert_eq!(std::fs::read(dir.join("b.qcow2")).unwrap(), file_before);
    assert!(!dir.join("b.qcow2.qcowx-recv").exists());
    // A damaged full stream creates no image.
    let mut full = std::fs::read(dir.join("full.stream")).unwrap();
    let f0 = records(&full)[0];
    full[f0.0 + f0.1 - 1] ^= 0x40;
    std::fs::write(dir.join("bad.stream"), &full).unwrap();
    fails(
        dir,
        &["receive", "-i", "bad.stream", "new.qcow2"],
        &["checksum mismatch"],
    );
    assert!(!dir.join("new.qcow2").exists());

    // Faults after records applied: nothing visible changes; the verified part waits
    // hidden for a resume.
    let last = recs[recs.len() - 2];
    let mut late = good.clone();
    late[last.0 + last.1 - 1] ^= 0x01;
    refused(dir, "b.qcow2", &late, &["checksum mismatch"], "late byte");
    let cut = recs[recs.len() - 1].0 + 5;
    refused(dir, "b.qcow2", &good[..cut], &["truncated"], "truncated");
    let mut swapped = good[..recs[1].0].to_vec();
    swapped.extend_from_slice(&good[recs[2].0..recs[2].0 + recs[2].1]);
    swapped.extend_from_slice(&good[recs[1].0..recs[1].0 + recs[1].1]);
    swapped.extend_from_slice(&good[recs[3].0..]);
    refused(
        dir,
        "b.qcow2",
        &swapped,
        &["out of order", "sequence 2, expected 1"],
        "reordered",
    );
    let mut end = good.clone();
    let e = recs[recs.len() - 1].0;
    end[e + 32] ^= 1; // the whole-stream checksum, with the record's crc fixed up
    let crc = crc32c(&end[e..e + 36]);
    end[e + 36..e + 40].copy_from_slice(&crc.to_be_bytes());
    refused(
        dir,
        "b.qcow2",
        &end,
        &["stream checksum mismatch"],
        "stream crc",
    );
    let mut trailing = good.clone();
    trailing.push(0);
    refused(dir, "b.qcow2", &trailing, &["bytes follow"], "trailing");

    // --abort drops the hidden part: the snapshot table is as it was for QEMU too.
    ok(dir, &["receive", "--abort", "b.qcow2"]);
    assert_eq!(qemu_snapshot_names(dir, "b.qcow2"), ["s0"]);
    // The good stream still goes in, and a late fault then resumes.
    std::fs::write(dir.join("bad.stream"), &late).unwrap();
    fails(
        dir,
        &["receive", "-i", "bad.stream", "b.qcow2"],
        &["checksum"],
    );
    let out = ok(dir, &["receive", "-i", "inc.stream", "b.qcow2"]);
    assert!(stdout(&out).contains("already there"), "{}", stdout(&out));
    assert_eq!(qemu_snapshot_names(dir, "b.qcow2"), ["s0", "s1"]);
    assert!(
        contents(dir, "b.qcow2", &["s0", "s1"]) == contents(dir, "a.qcow2", &["s0", "s1"]),
        "received snapshots differ from the sent ones"
    );
    assert_qemu_check_clean(dir, "b.qcow2");
}

/// crc32c, as the stream uses it (Castagnoli, reflected).
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_receive_killed_at_random_points_resumes_to_completion() {
    let d = qcowx_tests::tempdir();
    let dir = d.path();
    ok(dir, &["create", "a.qcow2", "128M"]);
    ok(dir, &["snapshot", "a.qcow2", "empty"]);
    // Incompressible data, so the receive takes a while.
    let mut rng = Rng::new(42);
    let mut data = vec![0u8; 48 << 20];
    rng.fill(&mut data);
    std::fs::write(dir.join("data.raw"), &data).unwrap();
    let a = qcowx_core::OpenOptions::new()
        .write(true)
        .open(dir.join("a.qcow2"))
        .unwrap();
    a.write_at(&data, 8 << 20).unwrap();
    a.close().unwrap();
    ok(dir, &["snapshot", "a.qcow2", "full"]);
    send(dir, &["a.qcow2", "empty"], "base.stream");
    ok(dir, &["receive", "-i", "base.stream", "b.qcow2"]);
    send(dir, &["--from", "empty", "a.qcow2", "full"], "big.stream");

    // Kill on progress, not on a clock: a round is killed once the image has grown
    // by a random amount (0 to 4 MiB of the 48 MiB stream), so the kill lands inside
    // the receive however fast this machine is.
    let image = dir.join("b.qcow2");
    let mut rng = Rng::new(7);
    let mut kills = 0;
    for round in 0..12 {
        let before = std::fs::metadata(&image).unwrap().len();
        let grown = rng.range(0, 4 << 20);
        let mut child = Command::new(QCOWX)
            .args(["receive", "-q", "-i", "big.stream", "b.qcow2"])
            .env("QCOWX_RECEIVE_CHECKPOINT", "1048576")
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::fs::metadata(&image).unwrap().len() < before + grown
            && child.try_wait().unwrap().is_none()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_micros(200));
        }
        child.kill().unwrap_or(());
        // A receive that ended before the kill ran to completion (or failed: the
        // checks below then say how).
        if child.wait().unwrap().code().is_some() {
            break;
        }
        kills += 1;
        // The image opens, lists what it had, and is clean once repaired (as any
        // open for writing repairs it).
        let list = stdout(&ok(dir, &["list", "b.qcow2"]));
        assert!(!list.contains("full"), "round {round}: {list}");
        ok(dir, &["check", "--repair", "b.qcow2"]);
        assert_qemu_check_clean(dir, "b.qcow2");
        assert!(qemu_raw(dir, "b.qcow2", Some("empty"))
            .iter()
            .all(|&b| b == 0));
    }
    eprintln!("{kills} receives killed");
    assert!(kills > 0, "no receive was killed");
    // Resume through the sender: it starts where the receiver stopped.
    if let Some(token) = qcowx(dir, &["receive", "--token", "b.qcow2"])
        .status
        .success()
        .then(|| stdout(&ok(dir, &["receive", "--token", "b.qcow2"])))
    {
        let token = token.trim().to_string();
        send(
            dir,
            &[
                "--from",
                "empty",
                "--resume-from",
                &token,
                "a.qcow2",
                "full",
            ],
            "rest.stream",
        );
        let rest = std::fs::metadata(dir.join("rest.stream")).unwrap().len();
        let all = std::fs::metadata(dir.join("big.stream")).unwrap().len();
        assert!(rest <= all, "{rest} > {all}");
        ok(dir, &["receive", "-i", "rest.stream", "b.qcow2"]);
    }
    assert_eq!(qemu_snapshot_names(dir, "b.qcow2"), ["empty", "full"]);
    assert_qemu_check_clean(dir, "b.qcow2");
    let got = qemu_raw(dir, "b.qcow2", Some("full"));
    assert!(
        got[8 << 20..56 << 20] == data[..],
        "the received data differs"
    );
    assert!(got[..8 << 20].iter().all(|&b| b == 0));
    assert!(!dir.join("b.qcow2.qcowx-recv").exists());
}
