//! The `nbd_handshake` and `nbd_transmission` targets: hostile bytes as the client's
//! side of an NBD connection to a server exporting the [fixture](crate::fixture)
//! image (`default`, `default@s1`, `web`, `web@w1`).
//!
//! The connection is an in-memory stream: reads come from the input, writes go to a
//! buffer. The server side is the library's own code, composed as the server's
//! connection thread composes it: [`handshake::greet`], [`handshake::haggle`], then
//! [`transmission::serve`].
//!
//! * [`handshake`]: the input is everything the client sends — a recorded session of
//!   a real client is a valid input. When the handshake reaches transmission, the rest
//!   of the input is the transmission phase.
//! * [`transmission`]: the first byte chooses a valid handshake (see [`Config`]),
//!   which must succeed; the rest of the input is the transmission phase.
//!
//! What must hold: nothing panics, hangs or allocates without bound; the server's
//! replies are well formed (option replies during the handshake; simple replies and
//! structured reply chunks during transmission); every request the server read is
//! answered exactly once (checked when the client's cookies are unambiguous).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::AtomicBool;

use qcowx_nbd::config::{DetectZeroes, DiscardMode, Settings};
use qcowx_nbd::handshake::{self, HandshakeContext, Negotiated, Outcome};
use qcowx_nbd::transmission::{self, MAX_SKIPPED_WRITE};
use qcowx_nbd::wire::*;
use qcowx_nbd::{ExportPlan, Exports};

use crate::fixture;

/// Worker threads per connection (fewer than the server's default: inputs are small).
pub const WORKERS: usize = 2;

/// The client end of an in-memory connection: reads from the input, writes to a
/// buffer.
#[derive(Debug)]
pub struct Wire<'a> {
    input: &'a [u8],
    pos: usize,
    /// Everything the server sent.
    pub sent: Vec<u8>,
}

impl<'a> Wire<'a> {
    /// A connection whose client sends `input` and then closes.
    pub fn new(input: &'a [u8]) -> Wire<'a> {
        Wire {
            input,
            pos: 0,
            sent: Vec::new(),
        }
    }

    /// What the client has sent that the server did not read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.input[self.pos.min(self.input.len())..]
    }
}

impl transmission::RequestStream for Wire<'_> {}

impl Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = self.rest();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sent.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The reply side of the transmission phase: a buffer the workers share.
#[derive(Debug, Default)]
struct Replies(Vec<u8>);

impl transmission::ReplyWriter for &mut Replies {}

impl Write for &mut Replies {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Server settings and export for one transmission input, from its first byte:
///
/// | bits | meaning |
/// | --- | --- |
/// | 0 | negotiate structured replies |
/// | 1–2 | metadata contexts: none, `base:allocation`, + `qemu:allocation-depth`, + `qemu:dirty-bitmap:s1` (with structured replies only) |
/// | 3–4 | export: `default`, `web`, `default@s1` (read-only), `""` (the default) |
/// | 5 | minimum block size 512 (else 1) |
/// | 6 | `--discard=unmap --detect-zeroes=unmap`, cache `unsafe` |
/// | 7 | every export read-only (`-r`) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config(pub u8);

impl Config {
    /// Whether structured replies are negotiated.
    pub fn structured(self) -> bool {
        self.0 & 1 != 0
    }

    /// The metadata contexts asked for with `SET_META_CONTEXT`.
    pub fn contexts(self) -> Vec<&'static str> {
        if !self.structured() {
            return Vec::new();
        }
        let all = [
            "base:allocation",
            "qemu:allocation-depth",
            "qemu:dirty-bitmap:s1",
        ];
        all[..usize::from((self.0 >> 1) & 3)].to_vec()
    }

    /// The export name sent with `GO`.
    pub fn export(self) -> &'static str {
        ["default", "web", "default@s1", ""][usize::from((self.0 >> 3) & 3)]
    }

    /// The server settings.
    pub fn settings(self) -> Settings {
        let mut s = Settings {
            workers: WORKERS,
            ..Settings::default()
        };
        if self.0 & (1 << 5) != 0 {
            s.min_block_size = 512;
        }
        if self.0 & (1 << 6) != 0 {
            s.discard = DiscardMode::Unmap;
            s.detect_zeroes = DetectZeroes::Unmap;
            s.cache = qcowx_nbd::config::CacheMode::Unsafe;
        }
        s
    }

    /// Whether the server serves every export read-only.
    pub fn read_only(self) -> bool {
        self.0 & (1 << 7) != 0
    }

    /// The client's handshake bytes for this configuration.
    pub fn client_handshake(self) -> Vec<u8> {
        let mut out = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        let mut option = |opt: u32, data: &[u8]| {
            out.extend_from_slice(&IHAVEOPT.to_be_bytes());
            out.extend_from_slice(&opt.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
        };
        let name = self.export().as_bytes();
        if self.structured() {
            option(OPT_STRUCTURED_REPLY, &[]);
            let contexts = self.contexts();
            if !contexts.is_empty() {
                let mut d = (name.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(name);
                d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
                for c in contexts {
                    d.extend_from_slice(&(c.len() as u32).to_be_bytes());
                    d.extend_from_slice(c.as_bytes());
                }
                option(OPT_SET_META_CONTEXT, &d);
            }
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&0u16.to_be_bytes());
        option(OPT_GO, &d);
        out
    }
}

/// A `nbd_transmission` input from a recorded client session (everything the client
/// sent): the handshake is parsed to find where transmission begins and which
/// [`Config`] matches what the client negotiated. `None` when the session never
/// reached transmission or negotiated something no [`Config`] expresses.
pub fn transmission_seed(session: &[u8]) -> Option<Vec<u8>> {
    let mut s = session;
    take(&mut s, 4)?;
    let mut structured = false;
    let mut contexts: Vec<String> = Vec::new();
    loop {
        if s.len() >= 4 && be32(s) == REQUEST_MAGIC {
            return None; // transmission without GO / EXPORT_NAME
        }
        let h = take(&mut s, 16)?;
        if be64(h) != IHAVEOPT {
            return None;
        }
        let opt = be32(&h[8..]);
        let data = take(&mut s, be32(&h[12..]) as usize)?;
        match opt {
            OPT_STRUCTURED_REPLY => structured = true,
            OPT_SET_META_CONTEXT => {
                contexts.clear();
                let mut d = data;
                let name_len = be32(take(&mut d, 4)?) as usize;
                take(&mut d, name_len)?;
                let n = be32(take(&mut d, 4)?);
                for _ in 0..n {
                    let len = be32(take(&mut d, 4)?) as usize;
                    contexts.push(String::from_utf8_lossy(take(&mut d, len)?).into_owned());
                }
            }
            OPT_GO | OPT_EXPORT_NAME => {
                let name = if opt == OPT_GO {
                    let len = be32(data.get(..4)?) as usize;
                    data.get(4..4 + len)?
                } else {
                    data
                };
                let export = ["default", "web", "default@s1", ""]
                    .iter()
                    .position(|e| e.as_bytes() == name)? as u8;
                let wanted = [
                    "base:allocation",
                    "qemu:allocation-depth",
                    "qemu:dirty-bitmap:s1",
                ];
                let n = wanted
                    .iter()
                    .take_while(|w| contexts.iter().any(|c| c == *w))
                    .count() as u8;
                let config = u8::from(structured) | (n << 1) | (export << 3);
                let mut out = vec![config];
                out.extend_from_slice(s);
                return Some(out);
            }
            _ => {}
        }
    }
}

/// The exports of a fresh in-memory copy of the fixture image.
fn exports(read_only: bool) -> Exports {
    let img = fixture::open(fixture::image_bytes(), true).expect("open the fixture image");
    let plan = ExportPlan::Auto {
        main_name: "default".into(),
        main_description: None,
    };
    Exports::new(img, plan, read_only).expect("export the fixture image")
}

/// Runs one `nbd_handshake` input (see the [module documentation](self)).
pub fn handshake(data: &[u8]) {
    let exports = exports(false);
    let settings = Settings {
        workers: WORKERS,
        ..Settings::default()
    };
    let stop = AtomicBool::new(false);
    let ctx = HandshakeContext {
        exports: &exports,
        settings: &settings,
        shutting_down: &stop,
    };
    let mut wire = Wire::new(data);
    let outcome = handshake::greet(&mut wire).and_then(|no_zeroes| {
        handshake::haggle(
            &mut wire,
            ctx,
            no_zeroes,
            false,
            None,
            settings.handshake_timeout,
        )
    });
    check_option_replies(&wire.sent, matches!(outcome, Ok(Outcome::Transmission(_))));
    if let Ok(Outcome::Transmission(n)) = outcome {
        serve_and_check(wire.rest(), &n, &settings);
    }
    let _ = exports.image().close();
}

/// Runs one `nbd_transmission` input (see the [module documentation](self)).
pub fn transmission(data: &[u8]) {
    let Some((&config, requests)) = data.split_first() else {
        return;
    };
    let config = Config(config);
    let exports = exports(config.read_only());
    let settings = config.settings();
    let stop = AtomicBool::new(false);
    let ctx = HandshakeContext {
        exports: &exports,
        settings: &settings,
        shutting_down: &stop,
    };
    let hello = config.client_handshake();
    let mut wire = Wire::new(&hello);
    let outcome = handshake::greet(&mut wire).and_then(|no_zeroes| {
        handshake::haggle(
            &mut wire,
            ctx,
            no_zeroes,
            false,
            None,
            settings.handshake_timeout,
        )
    });
    let n = match outcome {
        Ok(Outcome::Transmission(n)) => n,
        other => panic!("a valid handshake ({config:?}) did not reach transmission: {other:?}"),
    };
    assert!(
        wire.rest().is_empty(),
        "the handshake left client bytes unread"
    );
    assert_eq!(
        n.contexts.len(),
        config.contexts().len(),
        "SET_META_CONTEXT selected other contexts than asked for"
    );
    serve_and_check(requests, &n, &settings);
    let _ = exports.image().close();
}

/// Serves `requests` as the transmission phase and checks the replies.
fn serve_and_check(requests: &[u8], n: &Negotiated, settings: &Settings) {
    let mut replies = Replies::default();
    let reader = Wire::new(requests);
    let _ = transmission::serve(reader, &mut replies, n, settings, &|| {}, "fuzz");
    check_replies(requests, &replies.0, n, settings);
}

/// Takes `n` bytes from the front of `buf`.
fn take<'a>(buf: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if buf.len() < n {
        return None;
    }
    let (a, b) = buf.split_at(n);
    *buf = b;
    Some(a)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// The server's side of the handshake: the greeting, then option replies, then (when
/// transmission began) nothing or, after `EXPORT_NAME`, its fixed reply.
fn check_option_replies(sent: &[u8], transmission: bool) {
    let mut s = sent;
    let greeting = take(&mut s, 18).expect("the server sends an 18-byte greeting");
    assert_eq!(be64(greeting), NBDMAGIC, "greeting magic");
    assert_eq!(be64(&greeting[8..]), IHAVEOPT, "greeting option magic");
    while s.len() >= 8 && be64(s) == OPTION_REPLY_MAGIC {
        let h = take(&mut s, 20).expect("a 20-byte option reply header");
        let len = be32(&h[16..]) as usize;
        let reply_type = be32(&h[12..]);
        assert!(
            take(&mut s, len).is_some(),
            "option reply of type {reply_type:#x} announces {len} bytes, fewer were sent"
        );
        if reply_type & (1 << 31) != 0 {
            assert!(len <= MAX_STRING, "error message of {len} bytes");
        }
    }
    if transmission {
        // The reply to EXPORT_NAME: size, flags, and 124 zeroes unless NO_ZEROES.
        assert!(
            s.is_empty() || s.len() == 10 || s.len() == 134,
            "{} unexpected bytes after the option replies",
            s.len()
        );
    } else {
        assert!(
            s.is_empty(),
            "{} bytes after the option replies are not an option reply",
            s.len()
        );
    }
}

/// One request the server reads, as its reader reads it.
#[derive(Debug, Clone, Copy)]
struct Req {
    command: u16,
    length: u32,
}

/// The requests the server's reader accepts from `input` (an independent reading of
/// the protocol's framing: header, write payload, `DISC`, end of input).
fn requests(mut input: &[u8], max: u32) -> Vec<(u64, Req)> {
    let mut out = Vec::new();
    while let Some(h) = take(&mut input, 28) {
        if be32(h) != REQUEST_MAGIC {
            break;
        }
        let command = be16(&h[6..]);
        let cookie = be64(&h[8..]);
        let length = be32(&h[24..]);
        if command == CMD_DISC {
            break;
        }
        if command == CMD_WRITE {
            if length > max {
                if length > MAX_SKIPPED_WRITE {
                    break;
                }
                // Skipped up to the end of the input; the request is answered anyway.
                let n = (length as usize).min(input.len());
                take(&mut input, n);
            } else if take(&mut input, length as usize).is_none() {
                break;
            }
        }
        out.push((cookie, Req { command, length }));
    }
    out
}

/// Checks the transmission replies: well-formed, and, when the cookies make it
/// unambiguous, exactly one final reply per request read.
fn check_replies(input: &[u8], sent: &[u8], n: &Negotiated, settings: &Settings) {
    let reqs = requests(input, settings.max_block_size);
    let mut by_cookie: HashMap<u64, Vec<Req>> = HashMap::new();
    for (c, r) in &reqs {
        by_cookie.entry(*c).or_default().push(*r);
    }
    // A cookie whose requests are all reads of one length, or all non-reads, tells
    // whether a simple reply to it carries data.
    let data_len = |cookie: u64| -> Option<Option<u32>> {
        let rs = by_cookie.get(&cookie)?;
        let reads: Vec<u32> = rs
            .iter()
            .filter(|r| r.command == CMD_READ)
            .map(|r| r.length)
            .collect();
        if reads.is_empty() {
            Some(None)
        } else if reads.len() == rs.len() && reads.iter().all(|&l| l == reads[0]) {
            Some(Some(reads[0]))
        } else {
            None
        }
    };
    let mut finals: HashMap<u64, usize> = HashMap::new();
    let mut s = sent;
    while !s.is_empty() {
        let magic = s
            .get(..4)
            .map(be32)
            .unwrap_or_else(|| panic!("{} bytes of a truncated reply", s.len()));
        if magic == SIMPLE_REPLY_MAGIC {
            let h = take(&mut s, 16).expect("a 16-byte simple reply");
            let error = be32(&h[4..]);
            let cookie = be64(&h[8..]);
            let Some(len) = data_len(cookie) else {
                return; // ambiguous cookie: framing past here is unknown
            };
            if error == 0 {
                if let Some(len) = len {
                    assert!(
                        take(&mut s, len as usize).is_some(),
                        "simple read reply for cookie {cookie:#x} is missing data"
                    );
                }
            }
            *finals.entry(cookie).or_default() += 1;
        } else if magic == STRUCTURED_REPLY_MAGIC {
            assert!(n.structured, "structured reply without structured replies");
            let h = take(&mut s, 20).expect("a 20-byte chunk header");
            let flags = be16(&h[4..]);
            let chunk_type = be16(&h[6..]);
            let cookie = be64(&h[8..]);
            let len = be32(&h[16..]) as usize;
            let payload = take(&mut s, len).unwrap_or_else(|| {
                panic!("chunk of type {chunk_type} announces {len} bytes, fewer were sent")
            });
            check_chunk(chunk_type, payload, n);
            assert!(
                by_cookie.contains_key(&cookie),
                "reply chunk for cookie {cookie:#x}, which no request carried"
            );
            if flags & REPLY_FLAG_DONE != 0 {
                *finals.entry(cookie).or_default() += 1;
            }
        } else {
            panic!("reply magic {magic:#x} is neither simple nor structured");
        }
    }
    for (cookie, rs) in &by_cookie {
        let got = finals.get(cookie).copied().unwrap_or(0);
        assert_eq!(
            got,
            rs.len(),
            "cookie {cookie:#x}: {} requests, {got} final replies",
            rs.len()
        );
    }
    for cookie in finals.keys() {
        assert!(
            by_cookie.contains_key(cookie),
            "a reply for cookie {cookie:#x}, which no request carried"
        );
    }
}

/// Checks the payload of one structured reply chunk against its type.
fn check_chunk(chunk_type: u16, p: &[u8], n: &Negotiated) {
    match chunk_type {
        REPLY_TYPE_NONE => assert!(p.is_empty(), "NONE chunk with a payload"),
        REPLY_TYPE_OFFSET_DATA => {
            assert!(p.len() > 8, "OFFSET_DATA chunk of {} bytes", p.len());
            let off = be64(p);
            let end = off + (p.len() - 8) as u64;
            assert!(
                end <= n.export.size,
                "OFFSET_DATA past the end of the export"
            );
        }
        REPLY_TYPE_OFFSET_HOLE => {
            assert_eq!(p.len(), 12, "OFFSET_HOLE chunk of {} bytes", p.len());
            let len = be32(&p[8..]);
            assert!(len > 0, "OFFSET_HOLE of length 0");
            assert!(
                be64(p) + u64::from(len) <= n.export.size,
                "OFFSET_HOLE past the end of the export"
            );
        }
        REPLY_TYPE_BLOCK_STATUS => {
            assert!(
                p.len() >= 12 && (p.len() - 4).is_multiple_of(8),
                "BLOCK_STATUS chunk of {} bytes",
                p.len()
            );
            let id = be32(p) as usize;
            assert!(
                (1..=n.contexts.len()).contains(&id),
                "BLOCK_STATUS for context id {id} of {}",
                n.contexts.len()
            );
            for d in p[4..].chunks_exact(8) {
                assert!(be32(d) > 0, "block status descriptor of length 0");
            }
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            assert!(p.len() >= 6, "error chunk of {} bytes", p.len());
            let error = be32(p);
            let msg = usize::from(be16(&p[4..]));
            let extra = if chunk_type == REPLY_TYPE_ERROR { 0 } else { 8 };
            assert!(error != 0, "error chunk with error 0");
            assert_eq!(p.len(), 6 + msg + extra, "error chunk length");
        }
        t => panic!("unknown reply chunk type {t}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&command.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&length.to_be_bytes());
        r
    }

    #[test]
    fn every_configuration_negotiates_and_serves() {
        let mut reqs = request(CMD_WRITE, 0, 1, 4096, 512);
        reqs.extend_from_slice(&[7u8; 512]);
        reqs.extend(request(CMD_READ, 0, 2, 0, 8192));
        reqs.extend(request(CMD_BLOCK_STATUS, 0, 3, 0, 1 << 20));
        reqs.extend(request(CMD_WRITE_ZEROES, 0, 4, 1 << 20, 1 << 20));
        reqs.extend(request(CMD_FLUSH, 0, 5, 0, 0));
        reqs.extend(request(99, 0, 6, 0, 0));
        reqs.extend(request(CMD_DISC, 0, 7, 0, 0));
        for c in 0..=255u8 {
            let mut input = vec![c];
            input.extend_from_slice(&reqs);
            transmission(&input);
        }
    }

    #[test]
    fn a_full_client_session_runs_through_the_handshake_target() {
        let mut input = Config(0b0000_0111).client_handshake();
        input.extend(request(CMD_READ, 0, 1, 0, 4096));
        input.extend(request(CMD_BLOCK_STATUS, 0, 2, 0, 65536));
        handshake(&input);
        // Truncated anywhere: still no panic.
        for cut in 0..input.len() {
            handshake(&input[..cut]);
        }
    }

    #[test]
    fn request_framing_follows_the_server() {
        let mut reqs = request(CMD_WRITE, 0, 1, 0, 4);
        reqs.extend_from_slice(&[1, 2, 3, 4]);
        reqs.extend(request(CMD_READ, 0, 2, 0, 4));
        reqs.extend(request(CMD_WRITE, 0, 3, 0, 100));
        let r = requests(&reqs, 1 << 20);
        assert_eq!(r.len(), 2, "the write with a short payload is not read");
        let r = requests(&reqs, 50);
        assert_eq!(
            r.len(),
            3,
            "an oversized write is answered even when cut short"
        );
    }
}
