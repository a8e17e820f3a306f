//! Damaged images in the manner of QEMU's qcow2 iotests (060, 080, 261, 271, …): a
//! [`Case`] is an image built with `qemu-img` / `qemu-io` and byte pokes, and the
//! assertions that compare what qcowx does with it to what QEMU does.
//!
//! Offsets that an iotest assumes (the L1 table at 0x30000, the first L2 table at
//! 0x40000, …) are read from the image's header instead ([`Case::l1_offset`],
//! [`Case::l2_offset`], [`Case::refblock_offset`]).
//!
//! When `QCOWX_DAMAGED_SEEDS=DIR` is set, [`Case::damaged`] saves each damaged image
//! (before any repair) as `DIR/iotests-<case>`, for the fuzz seeds (`fuzz/make-seeds`).

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::cli::{self, stderr, stdout};
use crate::TempDir;
use crate::{be64, patch, qemu_check, qemu_img_create, qemu_info, qemu_io_ok, run, tempdir};

/// The offset mask of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The file name of a case's image in its directory.
pub const IMAGE: &str = "t.qcow2";
/// The largest seed file saved (the fuzz corpus stays small).
pub const MAX_SEED: u64 = 1 << 20;

/// One damaged-image case in its own temporary directory.
pub struct Case {
    /// The temporary directory (removed when dropped).
    pub dir: TempDir,
    /// The case name (`060-l2-into-l1`), used for seeds and messages.
    pub name: String,
    /// The image.
    pub img: PathBuf,
}

/// What `qcowx check` said: exit code and everything it printed.
#[derive(Debug)]
pub struct CheckOutcome {
    /// Exit code.
    pub code: i32,
    /// Stdout and stderr, concatenated.
    pub text: String,
}

impl Case {
    /// A fresh case with `qemu-img create -f qcow2 [-o opts] t.qcow2 size` (a missing
    /// QEMU tool fails the test, naming the package).
    pub fn create(name: &str, size: u64, opts: &str) -> Case {
        crate::require_qemu_tools();
        let dir = tempdir();
        let img = dir.path().join(IMAGE);
        qemu_img_create(&img, size, opts);
        Case {
            dir,
            name: name.to_string(),
            img,
        }
    }

    /// The case directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `qemu-io -f qcow2 -c CMD…` on the image, asserting success.
    pub fn qemu_io(&self, cmds: &[&str]) {
        qemu_io_ok("qcow2", &self.img, cmds);
    }

    /// Overwrites bytes of the image at `offset`.
    pub fn poke(&self, offset: u64, bytes: &[u8]) {
        patch(&self.img, offset, bytes);
    }

    /// Writes the big-endian u64 `v` at `offset`.
    pub fn poke64(&self, offset: u64, v: u64) {
        self.poke(offset, &v.to_be_bytes());
    }

    /// Writes the big-endian u32 `v` at `offset`.
    pub fn poke32(&self, offset: u64, v: u32) {
        self.poke(offset, &v.to_be_bytes());
    }

    /// The big-endian u64 at `offset`.
    pub fn peek64(&self, offset: u64) -> u64 {
        be64(&self.img, offset)
    }

    /// The big-endian u32 at `offset`.
    pub fn peek32(&self, offset: u64) -> u32 {
        crate::be32(&self.img, offset)
    }

    /// The cluster size (`1 << cluster_bits`, header offset 20).
    pub fn cluster_size(&self) -> u64 {
        1 << self.peek32(20)
    }

    /// The image file's length.
    pub fn len(&self) -> u64 {
        std::fs::metadata(&self.img)
            .expect("stat the case image")
            .len()
    }

    /// Whether the image file is empty (never, for a qcow2 image).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Truncates or extends the image file to `len` bytes (as the iotests' `truncate`).
    pub fn set_len(&self, len: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.img)
            .expect("open the case image")
            .set_len(len)
            .expect("set the case image's length");
    }

    /// The header's `l1_table_offset`.
    pub fn l1_offset(&self) -> u64 {
        self.peek64(40)
    }

    /// The header's `refcount_table_offset`.
    pub fn reftable_offset(&self) -> u64 {
        self.peek64(48)
    }

    /// The offset of refcount block 0 (refcount table entry 0).
    pub fn refblock_offset(&self) -> u64 {
        self.peek64(self.reftable_offset())
    }

    /// The offset of the L2 table of active L1 entry `i`.
    pub fn l2_offset(&self, i: u64) -> u64 {
        self.peek64(self.l1_offset() + 8 * i) & OFFSET_MASK
    }

    /// The header's `snapshots_offset`.
    pub fn snapshots_offset(&self) -> u64 {
        self.peek64(64)
    }

    /// iotest 261's image: a version 2 image of `size` bytes with three snapshots
    /// (`sn0`, `sn1`, `sn2`, each followed by a 4 KiB write) whose entries carry no
    /// extra data, 42 bytes of it (QEMU's 16, then "very important data" and zeros)
    /// and 8 bytes (valid in version 2; version 3 wants 16).
    pub fn v2_uneven_snapshot_extra(name: &str, size: u64) -> Case {
        let c = Case::create(name, size, "compat=0.10");
        c.qemu_io(&["write -P 0x05 0 64k"]);
        for (i, s) in ["sn0", "sn1", "sn2"].iter().enumerate() {
            c.qemu_img(&["snapshot", "-c", s, IMAGE]);
            c.qemu_io(&[&format!("write -P {} {}k 4k", 0x30 + i, 4 * i)]);
        }
        let (start, mut entries) = c.snapshot_table();
        entries[0].extra.clear();
        entries[1].extra.resize(16, 0);
        entries[1].extra.extend_from_slice(b"very important data");
        entries[1].extra.resize(42, 0);
        entries[2].extra.truncate(8);
        c.write_snapshot_table(start, &entries);
        c
    }

    /// The image's snapshot table: where it starts and its entries.
    pub fn snapshot_table(&self) -> (u64, Vec<SnapEntry>) {
        snapshot_table(&self.img)
    }

    /// Writes `entries` as the image's snapshot table at `start` (sizes recomputed
    /// from the parts; the header is not touched).
    pub fn write_snapshot_table(&self, start: u64, entries: &[SnapEntry]) {
        let mut out = Vec::new();
        for e in entries {
            let mut fixed = e.fixed.clone();
            fixed[36..40].copy_from_slice(&(e.extra.len() as u32).to_be_bytes());
            out.extend_from_slice(&fixed);
            out.extend_from_slice(&e.extra);
            out.extend_from_slice(&e.id_name);
            out.resize(out.len().div_ceil(8) * 8, 0);
        }
        self.poke(start, &out);
    }

    /// The image file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.img).expect("read the case image")
    }

    /// Marks the end of the damage: saves the image as a fuzz seed when
    /// `QCOWX_DAMAGED_SEEDS` is set (images over [`MAX_SEED`] are not saved).
    pub fn damaged(self) -> Case {
        if let Some(dir) = std::env::var_os("QCOWX_DAMAGED_SEEDS").filter(|d| !d.is_empty()) {
            let len = std::fs::metadata(&self.img).expect("stat").len();
            if len <= MAX_SEED {
                let dir = PathBuf::from(dir);
                std::fs::create_dir_all(&dir).expect("create the seed directory");
                std::fs::copy(&self.img, dir.join(format!("iotests-{}", self.name)))
                    .expect("save the seed");
            } else {
                eprintln!("{}: {len} bytes, not saved as a seed", self.name);
            }
        }
        self
    }

    /// A copy of the image named `tag.qcow2`; returns its file name (relative to the
    /// case directory).
    pub fn copy(&self, tag: &str) -> String {
        let name = format!("{tag}.qcow2");
        std::fs::copy(&self.img, self.path().join(&name)).expect("copy the case image");
        name
    }

    /// Runs `qcowx ARGS` in the case directory.
    pub fn qcowx(&self, args: &[&str]) -> Output {
        cli::qcowx(self.path(), args)
    }

    /// `qcowx io -c CMD… FILE` in the case directory.
    pub fn qcowx_io(&self, file: &str, cmds: &[&str]) -> Output {
        let mut args = vec!["io"];
        for cmd in cmds {
            args.extend(["-c", cmd]);
        }
        args.push(file);
        self.qcowx(&args)
    }

    /// `qcowx io -c 'read -P …'` of `file` succeeds: qcowx reads the pattern QEMU reads.
    pub fn qcowx_reads_pattern(&self, file: &str, cmd: &str) {
        let out = self.qcowx_io(file, &[cmd]);
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            out.status.success() && !text.contains("failed") && !text.contains("panicked"),
            "{}: qcowx io -c '{cmd}' {file} (QEMU reads it so):\n{text}",
            self.name
        );
    }

    /// Runs `qemu-img ARGS` in the case directory.
    pub fn qemu_img(&self, args: &[&str]) -> Output {
        cli::qemu_img(self.path(), args)
    }

    /// Runs `qemu-io` with `args` in the case directory, whatever its exit status.
    pub fn qemu_io_raw(&self, args: &[&str]) -> Output {
        run(crate::qemu_io().args(args).current_dir(self.path()))
    }

    /// `qcowx check --output json FILE` and `qcowx check FILE`: the exit code (both
    /// must agree) and the human report with its stderr.
    pub fn qcowx_check(&self, file: &str) -> CheckOutcome {
        let human = self.qcowx(&["check", file]);
        let json = self.qcowx(&["check", "--output", "json", file]);
        for o in [&human, &json] {
            assert!(
                !stderr(o).contains("panicked"),
                "{}: qcowx check panicked: {}",
                self.name,
                stderr(o)
            );
        }
        let code = human.status.code().unwrap_or(-1);
        assert_eq!(
            json.status.code(),
            Some(code),
            "{}: `qcowx check` and `qcowx check --output json` disagree",
            self.name
        );
        CheckOutcome {
            code,
            text: format!("{}{}", stdout(&human), stderr(&human)),
        }
    }

    /// `qcowx check` exits as `qemu-img check` does on the image and names the damage
    /// (every `needles`); returns the exit code.
    pub fn check_like_qemu(&self, needles: &[&str]) -> i32 {
        let q = qemu_check(&self.img);
        self.check_exits(q.code, needles, &format!("qemu-img check: {}", q.json));
        q.code
    }

    /// `qcowx check` exits with `code` and names the damage (every `needles`; the
    /// report gives offsets in hex). `why` is added to the failure message.
    pub fn check_exits(&self, code: i32, needles: &[&str], why: &str) {
        let x = self.qcowx_check(IMAGE);
        assert_eq!(
            x.code, code,
            "{}: qcowx check exits {} where {code} is wanted ({why})\nqcowx said:\n{}",
            self.name, x.code, x.text
        );
        for n in needles {
            assert!(
                x.text.contains(n),
                "{}: qcowx check does not name the damage ({n:?}):\n{}",
                self.name,
                x.text
            );
        }
        if code == 1 || code == 2 {
            assert!(
                x.text.contains("0x"),
                "{}: no hex offset in:\n{}",
                self.name,
                x.text
            );
        }
        assert_hex_only(&self.name, &x.text);
    }

    /// QEMU refuses to open the image (even read-only); qcowx refuses too, for reading
    /// and for writing, with a message naming every `needles` with hex offsets, and
    /// leaves the file as it was.
    pub fn open_refused_like_qemu(&self, needles: &[&str]) {
        let q = self.qemu_io_raw(&["-r", "-f", "qcow2", "-c", "read 0 512", IMAGE]);
        assert!(
            !q.status.success(),
            "{}: oracle: QEMU opened the image: {}",
            self.name,
            stdout(&q)
        );
        let before = self.bytes();
        for cmd in ["read 0 512", "write -P 0x2a 0 512"] {
            let out = self.qcowx(&["io", "-c", cmd, IMAGE]);
            let err = stderr(&out);
            assert!(
                !out.status.success(),
                "{}: qcowx io -c '{cmd}' opened the image QEMU refuses ({}):\n{}",
                self.name,
                stderr(&q).trim(),
                stdout(&out)
            );
            assert_message(&self.name, &err, needles);
        }
        assert!(
            self.bytes() == before,
            "{}: a refused open changed the file",
            self.name
        );
    }

    /// QEMU refuses the write `cmd` ("Preventing invalid write on metadata") and marks
    /// the image corrupt. qcowx must too: the write fails naming `structure` with hex
    /// offsets, `qemu-img info` then shows `corrupt: true`, the bytes of
    /// `[start, start + len)` (the metadata the write would have hit) are unchanged,
    /// and a later writable open is refused (a read-only one still reads, as QEMU's).
    pub fn write_refused_like_qemu(&self, cmd: &str, region: (u64, u64), structure: &str) {
        let qf = self.copy("qemu-write");
        let open = format!("open -o overlap-check=all {qf}");
        let q = self.qemu_io_raw(&["-c", &open, "-c", cmd]);
        let said = format!("{}{}", stdout(&q), stderr(&q));
        assert!(
            said.contains("Preventing invalid write on metadata"),
            "{}: oracle: QEMU did not refuse the write: {said}",
            self.name
        );
        assert_eq!(
            qemu_info(&self.path().join(&qf), true)["format-specific"]["data"]["corrupt"],
            true,
            "{}: oracle: QEMU did not mark the image corrupt",
            self.name
        );

        let (start, len) = region;
        let before = crate::read_at(&self.img, start, len as usize);
        let whole = std::fs::read(&self.img).unwrap();
        let out = self.qcowx(&["io", "-c", cmd, IMAGE]);
        assert!(
            !out.status.success(),
            "{}: qcowx io -c '{cmd}' succeeded where QEMU says: {}",
            self.name,
            said.trim()
        );
        assert!(
            crate::read_at(&self.img, start, len as usize) == before,
            "{}: the {structure} at {start:#x} was overwritten by a refused write",
            self.name
        );
        // On purpose unlike QEMU: an image qcowx did not close cleanly is scanned at a
        // writable open, which refuses a cluster claimed twice before any write (QEMU
        // opens it and marks it corrupt at the first write onto metadata). Then the
        // file is untouched — not even the corrupt bit — and the message says why.
        // (qcowx-core/tests/overlap.rs covers the refused write and the corrupt bit on
        // images qcowx opens without a scan.)
        if stderr(&out).contains("cannot open for writing until it is repaired") {
            assert!(
                std::fs::read(&self.img).unwrap() == whole,
                "{}: a refused open changed the file",
                self.name
            );
            assert_message(&self.name, &stderr(&out), &[structure]);
            let ro = self.qcowx(&["io", "-c", "read 0 512", IMAGE]);
            cli::assert_ok(
                &ro,
                &format!("{}: qcowx io read of the damaged image", self.name),
            );
            return;
        }
        let info = qemu_info(&self.img, true);
        assert_eq!(
            info["format-specific"]["data"]["corrupt"],
            true,
            "{}: after the refused write, qemu-img info does not show `corrupt: true` \
             (qcowx said: {})",
            self.name,
            stderr(&out).trim()
        );
        assert_message(&self.name, &stderr(&out), &[structure]);
        let again = self.qcowx(&["io", "-c", "write -P 0x11 0 512", IMAGE]);
        assert!(
            !again.status.success(),
            "{}: an image marked corrupt was opened for writing",
            self.name
        );
        assert_message(&self.name, &stderr(&again), &[]);
        let ro = self.qcowx(&["io", "-c", "read 0 512", IMAGE]);
        cli::assert_ok(
            &ro,
            &format!("{}: qcowx io read of the corrupt image", self.name),
        );
    }

    /// The image's damage is in the refcounts only. QEMU refuses the write `cmd`
    /// (marking the image corrupt); qcowx deliberately differs: a writable open
    /// rebuilds the refcounts from a reachability scan (they are derived data), so the
    /// write may succeed — then the image must check clean with `qemu-img check` and
    /// QEMU must read back what was written (`verify`, a `read -P …` command). If
    /// qcowx refuses it instead, the message names the damage with hex offsets and
    /// the file is unchanged but for the corrupt bit.
    pub fn write_after_refcount_damage(&self, cmd: &str, verify: &str) {
        let xf = self.copy("qcowx-write");
        let before = std::fs::read(self.path().join(&xf)).unwrap();
        let out = self.qcowx(&["io", "-c", cmd, &xf]);
        let path = self.path().join(&xf);
        if out.status.success() {
            qemu_check(&path).assert_clean(&format!("{}: after `qcowx io -c '{cmd}'`", self.name));
            qemu_io_ok("qcow2", &path, &[verify]);
        } else {
            assert_message(&self.name, &stderr(&out), &[]);
            let mut after = std::fs::read(&path).unwrap();
            after[72..80].copy_from_slice(&before[72..80]);
            assert!(
                after == before,
                "{}: a refused write changed the file",
                self.name
            );
        }
    }

    /// What `qemu-img convert` reads from `file` (the active layer or `snapshot`).
    pub fn qemu_reads(&self, file: &str, snapshot: Option<&str>) -> Vec<u8> {
        cli::qemu_raw(self.path(), file, snapshot)
    }

    /// What `qcowx export` reads from `file` (the default VDI or `snapshot`).
    pub fn qcowx_reads(&self, file: &str, snapshot: Option<&str>) -> Result<Vec<u8>, String> {
        let out_name = format!("qcowx-{}.raw", snapshot.unwrap_or("active"));
        let mut args = vec!["-q", "export"];
        if let Some(s) = snapshot {
            args.extend(["--snapshot", s]);
        }
        args.extend([file, &out_name]);
        let out = self.qcowx(&args);
        if !out.status.success() || stderr(&out).contains("panicked") {
            return Err(stderr(&out));
        }
        let bytes = std::fs::read(self.path().join(&out_name)).unwrap();
        std::fs::remove_file(self.path().join(&out_name)).unwrap();
        Ok(bytes)
    }

    /// qcowx reads `file` (the active layer and each of `snapshots`) as QEMU reads it.
    pub fn reads_like_qemu(&self, file: &str, snapshots: &[&str]) {
        let layers = std::iter::once(None).chain(snapshots.iter().map(|s| Some(*s)));
        for layer in layers {
            let q = self.qemu_reads(file, layer);
            let x = self.qcowx_reads(file, layer).unwrap_or_else(|e| {
                panic!(
                    "{}: qcowx cannot read {file} ({}) that QEMU reads: {e}",
                    self.name,
                    layer.unwrap_or("active layer")
                )
            });
            assert!(
                x == q,
                "{}: qcowx reads {file} ({}) differently from QEMU (first difference at \
                 {:#x})",
                self.name,
                layer.unwrap_or("active layer"),
                x.iter()
                    .zip(&q)
                    .position(|(a, b)| a != b)
                    .unwrap_or(x.len().min(q.len()))
            );
        }
    }

    /// Repair: `qcowx check --repair` on a copy either exits 0, leaving an image
    /// `qemu-img check` finds clean and that reads as QEMU reads its own repair
    /// (`qemu-img check -r all` on another copy) — or, where QEMU cannot repair it,
    /// as QEMU reads the damaged image when `qemu_reads_damaged` — or it fails naming
    /// the damage in hex and the file is byte-for-byte unchanged.
    pub fn repair_like_qemu(&self, snapshots: &[&str], qemu_reads_damaged: bool) {
        let orig = self.bytes();
        let qf = self.copy("qemu-repair");
        let q = self.qemu_img(&["check", "-r", "all", &qf]);
        let qemu_fixed = q.status.success() && qemu_check(&self.path().join(&qf)).code == 0;

        let xf = self.copy("qcowx-repair");
        let out = self.qcowx(&["check", "--repair", &xf]);
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(
            !text.contains("panicked"),
            "{}: repair panicked: {text}",
            self.name
        );
        let xpath = self.path().join(&xf);
        if !out.status.success() {
            assert!(
                std::fs::read(&xpath).unwrap() == orig,
                "{}: `qcowx check --repair` failed (exit {:?}) and left the file changed:\n{text}",
                self.name,
                out.status.code()
            );
            assert_message(&self.name, &stderr(&out), &[]);
            return;
        }
        qemu_check(&xpath).assert_clean(&format!(
            "{}: after `qcowx check --repair` exited 0 ({})",
            self.name,
            text.trim()
        ));
        let x = self.qcowx_check(&xf);
        assert_eq!(
            x.code, 0,
            "{}: qcowx check after its repair:\n{}",
            self.name, x.text
        );
        let reference = if qemu_fixed {
            Some(qf.as_str())
        } else if qemu_reads_damaged {
            Some(IMAGE)
        } else {
            None
        };
        if let Some(r) = reference {
            let layers = std::iter::once(None).chain(snapshots.iter().map(|s| Some(*s)));
            for layer in layers {
                let want = self.qemu_reads(r, layer);
                let got = self.qcowx_reads(&xf, layer).unwrap_or_else(|e| {
                    panic!("{}: qcowx cannot read its repaired image: {e}", self.name)
                });
                assert!(
                    got == want,
                    "{}: after repair qcowx reads {} differently from QEMU's {}",
                    self.name,
                    layer.unwrap_or("the active layer"),
                    if qemu_fixed {
                        "repair"
                    } else {
                        "read of the damaged image"
                    }
                );
            }
        }
    }
}

/// An error message about a damaged image: a `qcowx: ` line, no panic, every
/// `needles`, and offsets in hex (see [`assert_hex_only`]).
pub fn assert_message(case: &str, err: &str, needles: &[&str]) {
    assert!(!err.contains("panicked"), "{case}: qcowx panicked: {err}");
    // A check or repair lists the problems it found before its own error line.
    assert!(
        err.lines().any(|l| l.starts_with("qcowx: ")),
        "{case}: not a qcowx error: {err}"
    );
    for n in needles {
        assert!(
            err.contains(n),
            "{case}: the error does not name {n:?}: {err}"
        );
    }
    assert!(
        err.contains("0x"),
        "{case}: no hex offset in the error: {err}"
    );
    assert_hex_only(case, err);
}

/// Offsets and huge values in `text` are in hex: no `offset N` with a decimal N (and
/// so no meaningless "at offset 0"), and no decimal number of 10 digits or more.
pub fn assert_hex_only(case: &str, text: &str) {
    // `qemu-img check`'s summary line is decimal, and qcowx prints it as QEMU does
    // (scripts parse it): it is a length, not the place of damage.
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("Image end offset: "))
        .collect();
    let text = &kept.join("\n");
    for (i, _) in text.match_indices("offset ") {
        let rest = &text[i + 7..];
        if rest.starts_with(|c: char| c.is_ascii_digit()) {
            assert!(
                rest.starts_with("0x"),
                "{case}: an offset in decimal: {:?} in\n{text}",
                &rest[..rest.len().min(24)]
            );
        }
    }
    // Tokens of letters and digits; an all-digit one of 10 or more is a huge decimal
    // value (QEMU's `l2_entry=8000000000040000` style, hex after `=`, is allowed).
    let mut start = 0;
    for (i, c) in text
        .char_indices()
        .chain(std::iter::once((text.len(), ' ')))
    {
        if c.is_ascii_alphanumeric() {
            continue;
        }
        let token = &text[start..i];
        let after_eq = text[..start].ends_with('=');
        assert!(
            token.len() < 10 || !token.bytes().all(|b| b.is_ascii_digit()) || after_eq,
            "{case}: a huge value in decimal ({token}) in:\n{text}"
        );
        start = i + c.len_utf8();
    }
}

/// One snapshot table entry, in its parts: the 40-byte fixed part, the extra data, the
/// ID and name.
pub struct SnapEntry {
    /// The fixed part (its `extra_data_size` is rewritten from `extra` on writing).
    pub fixed: Vec<u8>,
    /// The extra data.
    pub extra: Vec<u8>,
    /// The ID string and the name, as stored.
    pub id_name: Vec<u8>,
}

/// The snapshot table of the qcow2 image at `path`, read straight from its bytes: where
/// it starts and its entries.
pub fn snapshot_table(path: &Path) -> (u64, Vec<SnapEntry>) {
    let bytes = std::fs::read(path).expect("read the image");
    let be = |o: usize, n: usize| {
        bytes[o..o + n]
            .iter()
            .fold(0u64, |a, &b| a << 8 | u64::from(b))
    };
    let n = be(60, 4);
    let start = be(64, 8);
    let mut pos = start as usize;
    let mut entries = Vec::new();
    for _ in 0..n {
        let ids = (be(pos + 12, 2) + be(pos + 14, 2)) as usize;
        let extra = be(pos + 36, 4) as usize;
        entries.push(SnapEntry {
            fixed: bytes[pos..pos + 40].to_vec(),
            extra: bytes[pos + 40..pos + 40 + extra].to_vec(),
            id_name: bytes[pos + 40 + extra..pos + 40 + extra + ids].to_vec(),
        });
        pos += (40 + extra + ids).div_ceil(8) * 8;
    }
    (start, entries)
}
