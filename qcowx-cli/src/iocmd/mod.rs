//! `qemu-io`-style I/O commands: a write path for tests and scripts.
//!
//! [`IoCommand::parse`] reads one command in `qemu-io -c` syntax, and
//! [`IoCommand::execute`] runs it on anything that implements [`BlockIo`] (an
//! [`Image`]'s default VDI, or any VDI or snapshot [`Disk`]). [`Outcome::lines`] gives
//! the lines `qemu-io` prints for it. The `qcowx io` command is a thin wrapper.
//!
//! Commands (`qemu-io`'s one-letter aliases in brackets):
//!
//! | command | meaning |
//! |---------|---------|
//! | `write [-q] [-P PATTERN] OFFSET LEN` (`w`) | write `LEN` bytes of `PATTERN` (default `0xcd`, as `qemu-io`) |
//! | `write [-q] -z [-u] OFFSET LEN` | make the range read as zeros; `-u` lets whole clusters be unmapped |
//! | `zero [-q] [-u] OFFSET LEN` | the same as `write -z` (a qcowx spelling) |
//! | `read [-q] [-P PATTERN] OFFSET LEN` (`r`) | read; with `-P`, verify every byte equals `PATTERN` |
//! | `discard [-q] OFFSET LEN` (`d`) | discard whole clusters of the range (they read as zeros) |
//! | `flush` (`f`) | make completed writes durable |
//!
//! Offsets and lengths are byte counts as `qemu-io` takes them: decimal or `0x` hex,
//! with an optional `B`, `K`, `M`, `G`, `T`, `P` or `E` suffix (powers of 1024; a
//! decimal fraction is allowed with a suffix). A pattern is a byte, `0`–`255`, in
//! decimal, `0x` hex or `0`-prefixed octal. Options may be combined (`-zu`) and a
//! pattern may be attached (`-P0x5a`).
//!
//! The unit test `the_module_example_runs` shows a session.

use std::time::{Duration, Instant};

use qcowx_core::Disk;
use qcowx_core::Image;
use qcowx_core::{Error, Result};

/// The pattern `qemu-io write` uses without `-P`.
pub const DEFAULT_WRITE_PATTERN: u8 = 0xcd;

/// The largest buffer a command reads or writes at once (longer requests are split).
pub const IO_CHUNK: usize = 4 << 20;

/// A virtual disk that [`IoCommand`]s run on.
pub trait BlockIo {
    /// The image file's name, for messages.
    fn file_name(&self) -> &str;
    /// Virtual size in bytes.
    fn disk_size(&self) -> Result<u64>;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes the range read as zeros, unmapping whole clusters if `may_unmap`.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;
    /// Discards whole clusters of the range.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<()>;
}

impl BlockIo for Image {
    fn file_name(&self) -> &str {
        Image::file_name(self)
    }
    fn disk_size(&self) -> Result<u64> {
        Ok(self.size())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Image::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Image::write_at(self, buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        Image::write_zeroes(self, offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Image::discard(self, offset, len)
    }
    fn flush(&self) -> Result<()> {
        Image::flush(self)
    }
}

impl BlockIo for Disk {
    fn file_name(&self) -> &str {
        self.image().file_name()
    }
    fn disk_size(&self) -> Result<u64> {
        Ok(self.size())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Disk::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Disk::write_at(self, buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        Disk::write_zeroes(self, offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Disk::discard(self, offset, len)
    }
    fn flush(&self) -> Result<()> {
        Disk::flush(self)
    }
}

/// One parsed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoCommand {
    /// `read [-q] [-P PATTERN] OFFSET LEN`.
    Read {
        /// Guest offset.
        offset: u64,
        /// Bytes to read.
        len: u64,
        /// The byte every read byte must equal (`-P`).
        pattern: Option<u8>,
        /// Print nothing on success (`-q`).
        quiet: bool,
    },
    /// `write [-q] [-P PATTERN] OFFSET LEN`.
    Write {
        /// Guest offset.
        offset: u64,
        /// Bytes to write.
        len: u64,
        /// The byte written ([`DEFAULT_WRITE_PATTERN`] without `-P`).
        pattern: u8,
        /// Print nothing (`-q`).
        quiet: bool,
    },
    /// `write -z [-u] OFFSET LEN` or `zero [-u] OFFSET LEN`.
    WriteZeroes {
        /// Guest offset.
        offset: u64,
        /// Bytes to zero.
        len: u64,
        /// Whole clusters may be unmapped (`-u`).
        unmap: bool,
        /// Print nothing (`-q`).
        quiet: bool,
    },
    /// `discard [-q] OFFSET LEN`.
    Discard {
        /// Guest offset.
        offset: u64,
        /// Bytes to discard.
        len: u64,
        /// Print nothing (`-q`).
        quiet: bool,
    },
    /// `flush`.
    Flush,
}

/// What one command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The command.
    pub command: IoCommand,
    /// How long it took.
    pub elapsed: Duration,
    /// For `read -P`: the guest offset of the first byte that differs from the
    /// pattern, if any.
    pub mismatch: Option<u64>,
}

impl Outcome {
    /// Whether the command failed (a `read -P` found other bytes), as `qemu-io`
    /// counts it for its exit code.
    pub fn failed(&self) -> bool {
        self.mismatch.is_some()
    }

    /// The lines `qemu-io` prints for the command: a pattern failure first, then (unless
    /// `-q`) `"wrote N/N bytes at offset O"` (or `read`, `discard`) and its timing line.
    /// `flush` prints nothing.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        let (verb, offset, len, quiet) = match self.command {
            IoCommand::Read {
                offset, len, quiet, ..
            } => ("read", offset, len, quiet),
            IoCommand::Write {
                offset, len, quiet, ..
            }
            | IoCommand::WriteZeroes {
                offset, len, quiet, ..
            } => ("wrote", offset, len, quiet),
            IoCommand::Discard { offset, len, quiet } => ("discard", offset, len, quiet),
            IoCommand::Flush => return out,
        };
        if self.mismatch.is_some() {
            out.push(format!(
                "Pattern verification failed at offset {offset}, {len} bytes"
            ));
        }
        if !quiet {
            out.push(format!("{verb} {len}/{len} bytes at offset {offset}"));
            out.push(timing_line(len, 1, self.elapsed));
        }
        out
    }
}

fn bad(cmd: &str, why: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{cmd}: {why}"))
}

/// Which options a command takes.
struct Spec {
    name: &'static str,
    flags: &'static str,
    usage: &'static str,
}

const SPECS: &[(&[&str], Spec)] = &[
    (
        &["read", "r"],
        Spec {
            name: "read",
            flags: "qP",
            usage: "read [-q] [-P PATTERN] OFFSET LEN",
        },
    ),
    (
        &["write", "w"],
        Spec {
            name: "write",
            flags: "qPzu",
            usage: "write [-q] [-P PATTERN | -z [-u]] OFFSET LEN",
        },
    ),
    (
        &["zero"],
        Spec {
            name: "zero",
            flags: "qu",
            usage: "zero [-q] [-u] OFFSET LEN",
        },
    ),
    (
        &["discard", "d"],
        Spec {
            name: "discard",
            flags: "q",
            usage: "discard [-q] OFFSET LEN",
        },
    ),
    (
        &["flush", "f"],
        Spec {
            name: "flush",
            flags: "",
            usage: "flush",
        },
    ),
];

/// The options and operands of one command line.
#[derive(Default)]
struct Parsed<'a> {
    quiet: bool,
    zero: bool,
    unmap: bool,
    pattern: Option<u8>,
    operands: Vec<&'a str>,
}

impl IoCommand {
    /// Parses one command in `qemu-io -c` syntax (see the module documentation).
    /// Errors are [`Error::InvalidArgument`] naming the command and its usage.
    pub fn parse(line: &str) -> Result<IoCommand> {
        let mut words = line.split_whitespace();
        let Some(cmd) = words.next() else {
            return Err(Error::InvalidArgument(
                "empty command (use read, write, zero, discard or flush)".into(),
            ));
        };
        let Some((_, spec)) = SPECS.iter().find(|(names, _)| names.contains(&cmd)) else {
            return Err(Error::InvalidArgument(format!(
                "unknown command '{cmd}' (use read, write, zero, discard or flush)"
            )));
        };
        let usage = |why: String| bad(spec.name, format!("{why} (usage: {})", spec.usage));
        let mut p = Parsed::default();
        let mut only_operands = false;
        let mut words = words.peekable();
        while let Some(w) = words.next() {
            if only_operands || !w.starts_with('-') || w == "-" {
                p.operands.push(w);
                continue;
            }
            if w == "--" {
                only_operands = true;
                continue;
            }
            let opts = &w[1..];
            for (i, c) in opts.char_indices() {
                if !spec.flags.contains(c) {
                    return Err(usage(format!("option -{c} is not supported")));
                }
                match c {
                    'q' => p.quiet = true,
                    'z' => p.zero = true,
                    'u' => p.unmap = true,
                    'P' => {
                        let rest = &opts[i + 1..];
                        let value = if rest.is_empty() {
                            words
                                .next()
                                .ok_or_else(|| usage("-P needs a pattern byte".into()))?
                        } else {
                            rest
                        };
                        p.pattern = Some(parse_pattern(value).map_err(|e| bad(spec.name, e))?);
                        break;
                    }
                    _ => return Err(usage(format!("option -{c} is not supported"))),
                }
            }
        }
        if spec.name == "flush" {
            if !p.operands.is_empty() {
                return Err(usage("flush takes no arguments".into()));
            }
            return Ok(IoCommand::Flush);
        }
        let [offset, len] = p.operands[..] else {
            return Err(usage(format!(
                "expected OFFSET and LEN, got {} argument(s)",
                p.operands.len()
            )));
        };
        let offset = parse_num(offset).map_err(|e| bad(spec.name, e))?;
        let len = parse_num(len).map_err(|e| bad(spec.name, e))?;
        if offset.checked_add(len).is_none() {
            return Err(bad(spec.name, "offset + length overflows"));
        }
        let quiet = p.quiet;
        Ok(match spec.name {
            "read" => IoCommand::Read {
                offset,
                len,
                pattern: p.pattern,
                quiet,
            },
            "write" if p.zero => {
                if p.pattern.is_some() {
                    return Err(usage("-z and -P cannot be given together".into()));
                }
                IoCommand::WriteZeroes {
                    offset,
                    len,
                    unmap: p.unmap,
                    quiet,
                }
            }
            "write" => {
                if p.unmap {
                    return Err(usage("-u needs -z".into()));
                }
                IoCommand::Write {
                    offset,
                    len,
                    pattern: p.pattern.unwrap_or(DEFAULT_WRITE_PATTERN),
                    quiet,
                }
            }
            "zero" => IoCommand::WriteZeroes {
                offset,
                len,
                unmap: p.unmap,
                quiet,
            },
            _ => IoCommand::Discard { offset, len, quiet },
        })
    }

    /// Whether the command changes the disk (everything but `read`; `flush` counts as
    /// a write: it needs a writable image).
    pub fn writes(&self) -> bool {
        !matches!(self, IoCommand::Read { .. })
    }

    /// Runs the command on `dev`. A request past the end of the disk fails before
    /// anything is read or written; long requests are split into [`IO_CHUNK`]-sized
    /// pieces. A `read -P` that finds other bytes is not an error: the [`Outcome`]
    /// reports it (see [`Outcome::failed`]).
    pub fn execute(&self, dev: &dyn BlockIo) -> Result<Outcome> {
        let start = Instant::now();
        let mut mismatch = None;
        let range = match *self {
            IoCommand::Read { offset, len, .. }
            | IoCommand::Write { offset, len, .. }
            | IoCommand::WriteZeroes { offset, len, .. }
            | IoCommand::Discard { offset, len, .. } => Some((offset, len)),
            IoCommand::Flush => None,
        };
        if let Some((offset, len)) = range {
            let size = dev.disk_size()?;
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(Error::OutOfRange {
                    file: dev.file_name().to_string(),
                    offset,
                    len,
                    size,
                });
            }
        }
        match *self {
            IoCommand::Read {
                offset,
                len,
                pattern,
                ..
            } => {
                let mut buf = vec![0u8; chunk_len(len)];
                let mut pos = 0u64;
                while pos < len {
                    let n = (len - pos).min(buf.len() as u64) as usize;
                    dev.read_at(&mut buf[..n], offset + pos)?;
                    if let (Some(p), None) = (pattern, mismatch) {
                        if let Some(i) = buf[..n].iter().position(|&b| b != p) {
                            mismatch = Some(offset + pos + i as u64);
                        }
                    }
                    pos += n as u64;
                }
            }
            IoCommand::Write {
                offset,
                len,
                pattern,
                ..
            } => {
                let buf = vec![pattern; chunk_len(len)];
                let mut pos = 0u64;
                while pos < len {
                    let n = (len - pos).min(buf.len() as u64) as usize;
                    dev.write_at(&buf[..n], offset + pos)?;
                    pos += n as u64;
                }
            }
            IoCommand::WriteZeroes {
                offset, len, unmap, ..
            } => {
                if len > 0 {
                    dev.write_zeroes(offset, len, unmap)?;
                }
            }
            IoCommand::Discard { offset, len, .. } => {
                if len > 0 {
                    dev.discard(offset, len)?;
                }
            }
            IoCommand::Flush => dev.flush()?,
        }
        Ok(Outcome {
            command: *self,
            elapsed: start.elapsed(),
            mismatch,
        })
    }
}

fn chunk_len(len: u64) -> usize {
    len.min(IO_CHUNK as u64) as usize
}

/// Parses a byte count as `qemu-io` does: decimal or `0x` hex, with an optional
/// `B`/`K`/`M`/`G`/`T`/`P`/`E` suffix (either case, powers of 1024); a decimal
/// fraction needs a suffix larger than bytes and is rounded down to a byte.
pub fn parse_num(s: &str) -> std::result::Result<u64, String> {
    let err =
        || format!("invalid number '{s}' (use bytes, 0x hex, or a K, M, G, T, P or E suffix)");
    let too_large = || format!("'{s}' is too large");
    let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"));
    // The number ends where its digits do; what follows is the suffix.
    let (body, suffix) = match hex {
        Some(h) => {
            let end = h.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(h.len());
            h.split_at(end)
        }
        None => {
            let end = s
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(s.len());
            s.split_at(end)
        }
    };
    let mul: u64 = match suffix {
        "" | "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return Err(err()),
    };
    if hex.is_some() {
        if body.is_empty() {
            return Err(err());
        }
        let v = u64::from_str_radix(body, 16).map_err(|_| too_large())?;
        return v.checked_mul(mul).ok_or_else(too_large);
    }
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(err());
    }
    let whole: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_large())?
    };
    let mut total = whole * u128::from(mul);
    if !frac.is_empty() {
        if mul == 1 {
            return Err(format!("'{s}': a fraction needs a suffix (K, M, G, ...)"));
        }
        let f = &frac[..frac.len().min(18)];
        let num: u128 = f.parse().map_err(|_| too_large())?;
        total += num * u128::from(mul) / 10u128.pow(f.len() as u32);
    }
    u64::try_from(total).map_err(|_| too_large())
}

/// Parses a pattern byte as `qemu-io` does (`strtol` base 0): decimal, `0x` hex or
/// `0`-prefixed octal, `0`–`255`.
pub fn parse_pattern(s: &str) -> std::result::Result<u8, String> {
    let bad = || format!("{s} is not a valid pattern byte (0 to 255)");
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8)
    } else {
        s.parse::<u64>()
    }
    .map_err(|_| bad())?;
    u8::try_from(v).map_err(|_| bad())
}

/// `qemu-io`'s `cvtstr`: a byte count with three decimals in the largest binary unit
/// it reaches, `.000` dropped (`4 KiB`, `1.500 KiB`, `512 bytes`).
fn cvtstr(value: f64) -> String {
    const UNITS: [(&str, u32); 6] = [
        (" EiB", 60),
        (" PiB", 50),
        (" TiB", 40),
        (" GiB", 30),
        (" MiB", 20),
        (" KiB", 10),
    ];
    let (mut s, suffix) = UNITS
        .iter()
        .find(|(_, shift)| value >= (1u64 << shift) as f64)
        .map_or_else(
            || (format!("{value:.6}"), " bytes"),
            |(suffix, shift)| (format!("{:.3}", value / (1u64 << shift) as f64), *suffix),
        );
    match s.find(".000") {
        Some(i) => s.replace_range(i.., suffix),
        None => s.push_str(suffix),
    }
    s
}

/// `qemu-io`'s timing line: `4 KiB, 1 ops; 00.00 sec (2.330 MiB/sec and 596.4758
/// ops/sec)`.
fn timing_line(bytes: u64, ops: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs();
    let frac = f64::from(elapsed.subsec_nanos()) / 1e9;
    let ts = if secs > 0 {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs / 60) % 60,
            (secs % 60) as f64 + frac
        )
    } else {
        format!("{frac:05.2} sec")
    };
    let t = elapsed.as_secs_f64().max(1e-9);
    format!(
        "{}, {ops} ops; {ts} ({}/sec and {:.4} ops/sec)",
        cvtstr(bytes as f64),
        cvtstr(bytes as f64 / t),
        ops as f64 / t
    )
}

#[cfg(test)]
mod tests;
