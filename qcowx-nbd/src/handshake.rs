//! The fixed newstyle handshake: greeting, client flags, and option haggling until
//! the client enters transmission (`NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`) or leaves.
//!
//! Supported options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (contexts
//! `base:allocation`, `qemu:allocation-depth`, and `qemu:dirty-bitmap:SNAPSHOT` for
//! every snapshot of the image: the clusters where the export may differ from that
//! snapshot, from the tree diff — no bitmap is ever stored), and `STARTTLS` when the
//! server has TLS settings. Every other option (`EXTENDED_HEADERS`, unknown numbers)
//! is answered with `NBD_REP_ERR_UNSUP` and the negotiation goes on. Malformed option
//! data gets `NBD_REP_ERR_INVALID`; option data longer than [`MAX_OPTION_DATA`] is
//! skipped and answered with `NBD_REP_ERR_TOO_BIG`.
//!
//! TLS follows the protocol's modes: with [`TlsMode::Require`] (FORCEDTLS) every
//! option before `STARTTLS` other than `ABORT` gets `NBD_REP_ERR_TLS_REQD`, and
//! `EXPORT_NAME` (which cannot be refused) closes the connection; with
//! [`TlsMode::Allow`] (SELECTIVETLS with no export requiring TLS) clients may go on
//! in clear or upgrade. [`haggle`] returns [`Outcome::StartTls`] after acknowledging
//! `STARTTLS`; the caller runs the TLS handshake and calls [`haggle`] again over the
//! encrypted stream with `tls_active`, which starts from a fresh negotiation state
//! (no structured replies, no metadata contexts), as the protocol requires. A second
//! `STARTTLS` gets `NBD_REP_ERR_INVALID`.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use zerocopy::IntoBytes;

use crate::config::{Settings, TlsMode};
use crate::error::{Error, Result};
use crate::exports::{Export, ExportInfo, Exports};
use crate::wire::*;

/// The longest option data read into memory; longer options are skipped.
pub const MAX_OPTION_DATA: u32 = 64 << 10;
/// Option data beyond this is not even skipped: the connection is closed.
pub const MAX_SKIPPED_OPTION_DATA: u32 = 16 << 20;

/// The prefix of the dirty-bitmap contexts (QEMU's namespace).
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// A metadata context this server provides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: hole and zero flags.
    BaseAllocation,
    /// `qemu:allocation-depth`: 0 unallocated, 1 this image, 2 its backing file, …
    AllocationDepth,
    /// `qemu:dirty-bitmap:SNAPSHOT`: bit 0 set where the export may differ from the
    /// snapshot (whole clusters).
    DirtyBitmap(String),
    /// `qemu:dirty-bitmap:NAME` of a persistent bitmap exported with `-B NAME`: bit 0
    /// set where the bitmap is dirty (whole granules), as qemu-nbd reports it.
    PersistentBitmap(String),
}

impl MetaContext {
    /// The context's name.
    pub fn name(&self) -> String {
        match self {
            MetaContext::BaseAllocation => "base:allocation".into(),
            MetaContext::AllocationDepth => "qemu:allocation-depth".into(),
            MetaContext::DirtyBitmap(s) | MetaContext::PersistentBitmap(s) => {
                format!("{DIRTY_BITMAP_PREFIX}{s}")
            }
        }
    }

    /// Every context available when the image holds `snapshots` and the export
    /// carries the persistent `bitmaps`. A name in `bitmaps` is the persistent
    /// bitmap: a snapshot of the same name has no diff context then (one name, one
    /// context).
    pub fn available(snapshots: &[String], bitmaps: &[String]) -> Vec<MetaContext> {
        let mut v = vec![MetaContext::BaseAllocation, MetaContext::AllocationDepth];
        v.extend(bitmaps.iter().cloned().map(MetaContext::PersistentBitmap));
        v.extend(
            snapshots
                .iter()
                .filter(|s| !bitmaps.contains(s))
                .cloned()
                .map(MetaContext::DirtyBitmap),
        );
        v
    }
}

/// The id of the `i`-th selected context.
pub fn context_id(i: usize) -> u32 {
    i as u32 + 1
}

/// What a successful handshake agreed on.
#[derive(Debug)]
pub struct Negotiated {
    /// The export, opened.
    pub export: Export,
    /// The transmission flags sent.
    pub flags: u16,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// The selected metadata contexts (empty: block status is refused).
    pub contexts: Vec<MetaContext>,
}

/// What the handshake needs from the server.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeContext<'a> {
    /// The exports.
    pub exports: &'a Exports,
    /// Server settings.
    pub settings: &'a Settings,
    /// Set while the server shuts down: options get `NBD_REP_ERR_SHUTDOWN`.
    pub shutting_down: &'a AtomicBool,
}

/// The transmission flags for an export.
pub fn transmission_flags(export: &Export, structured: bool, settings: &Settings) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
    if export.writable {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    } else {
        f |= TFLAG_READ_ONLY;
    }
    if structured {
        f |= TFLAG_SEND_DF;
    }
    if settings.multi_conn {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    f
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::io(context, e)
}

/// Sends one option reply.
fn reply<S: Write>(s: &mut S, option: u32, reply_type: u32, data: &[u8]) -> Result<()> {
    let h = OptionReplyHeader {
        magic: OPTION_REPLY_MAGIC.into(),
        option: option.into(),
        reply_type: reply_type.into(),
        length: (data.len() as u32).into(),
    };
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(h.as_bytes());
    buf.extend_from_slice(data);
    s.write_all(&buf).map_err(io_err("send option reply"))
}

/// Sends an error reply with a message (truncated to the protocol's string limit).
fn reply_err<S: Write>(s: &mut S, option: u32, reply_type: u32, msg: &str) -> Result<()> {
    reply(
        s,
        option,
        reply_type,
        truncate_str(msg, MAX_STRING).as_bytes(),
    )
}

/// The parsed option data, or `None` after answering the option with
/// `NBD_REP_ERR_INVALID` and what is wrong with it.
fn valid<S: Write, T>(
    s: &mut S,
    option: u32,
    parsed: std::result::Result<T, String>,
) -> Result<Option<T>> {
    match parsed {
        Ok(r) => Ok(Some(r)),
        Err(why) => {
            reply_err(s, option, REP_ERR_INVALID, &why)?;
            Ok(None)
        }
    }
}

/// The export named `name`, or `None` after answering the option with
/// `NBD_REP_ERR_UNKNOWN` and the names there are.
fn known_export<S: Write>(
    s: &mut S,
    option: u32,
    exports: &Exports,
    name: &str,
) -> Result<Option<ExportInfo>> {
    let info = exports.find(name)?;
    if info.is_none() {
        let msg = unknown_export_message(exports, name);
        reply_err(s, option, REP_ERR_UNKNOWN, &msg)?;
    }
    Ok(info)
}

/// Reads a big-endian u32 at `at` of `data`, if there.
fn be32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn be16(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

/// A parsed `NBD_OPT_INFO` / `NBD_OPT_GO` request.
struct InfoRequest {
    name: String,
    requests: Vec<u16>,
}

fn parse_info(data: &[u8]) -> std::result::Result<InfoRequest, String> {
    let name_len = be32(data, 0).ok_or("option data shorter than 6 bytes")? as usize;
    if data.len() < 6 || name_len > data.len() - 6 {
        return Err(format!(
            "export name length {name_len} does not fit in {} bytes of option data",
            data.len()
        ));
    }
    let name = parse_string(&data[4..4 + name_len])?;
    let n = be16(data, 4 + name_len).ok_or("missing request count")? as usize;
    let rest = &data[6 + name_len..];
    if rest.len() != 2 * n {
        return Err(format!(
            "{n} information requests need {} bytes, got {}",
            2 * n,
            rest.len()
        ));
    }
    let requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

fn parse_string(bytes: &[u8]) -> std::result::Result<String, String> {
    if bytes.len() > MAX_STRING {
        return Err(format!(
            "string of {} bytes is longer than 4096",
            bytes.len()
        ));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| "string is not UTF-8".to_string())?;
    if s.contains('\0') {
        return Err("string contains NUL".into());
    }
    Ok(s.to_string())
}

/// A parsed `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` request.
struct MetaRequest {
    export: String,
    queries: Vec<String>,
}

fn parse_meta(data: &[u8]) -> std::result::Result<MetaRequest, String> {
    let name_len = be32(data, 0).ok_or("option data shorter than 4 bytes")? as usize;
    if name_len > data.len().saturating_sub(8) {
        return Err(format!(
            "export name length {name_len} does not fit in {} bytes of option data",
            data.len()
        ));
    }
    let export = parse_string(&data[4..4 + name_len])?;
    let mut at = 4 + name_len;
    let count = be32(data, at).ok_or("missing query count")? as usize;
    at += 4;
    let mut queries = Vec::new();
    for i in 0..count {
        let len =
            be32(data, at).ok_or_else(|| format!("query {i} runs past the option data"))? as usize;
        at += 4;
        let q = data
            .get(at..at.saturating_add(len))
            .ok_or_else(|| format!("query {i} of {len} bytes runs past the option data"))?;
        at += len;
        let q = parse_string(q)?;
        if !q.contains(':') {
            return Err(format!("query '{q}' has no namespace"));
        }
        queries.push(q);
    }
    if at != data.len() {
        return Err(format!(
            "{} bytes of option data after the last query",
            data.len() - at
        ));
    }
    Ok(MetaRequest { export, queries })
}

/// The contexts of `available` matching `queries`: for LIST, empty queries and the
/// wildcards `base:`, `qemu:` and `qemu:dirty-bitmap:` match; for SET, only exact
/// names select. Unknown namespaces and leaves are ignored.
fn match_contexts(queries: &[String], list: bool, available: &[MetaContext]) -> Vec<MetaContext> {
    if queries.is_empty() {
        return if list { available.to_vec() } else { Vec::new() };
    }
    let mut out: Vec<MetaContext> = Vec::new();
    for q in queries {
        for c in available {
            let name = c.name();
            let namespace = name.split_once(':').map(|(ns, _)| ns).unwrap_or_default();
            let wildcard = list
                && (*q == format!("{namespace}:")
                    || (q == DIRTY_BITMAP_PREFIX && name.starts_with(DIRTY_BITMAP_PREFIX)));
            if (*q == name || wildcard) && !out.contains(c) {
                out.push(c.clone());
            }
        }
    }
    out
}

/// How option haggling ended.
#[derive(Debug)]
pub enum Outcome {
    /// Transmission begins.
    Transmission(Box<Negotiated>),
    /// The client aborted (or left cleanly).
    Closed,
    /// `STARTTLS` was acknowledged: the TLS handshake comes next, then [`haggle`]
    /// again over the encrypted stream.
    StartTls,
}

/// Runs the handshake on `s` without TLS (a server with TLS settings uses [`greet`]
/// and [`haggle`]). Returns `Ok(None)` when the client aborts (or the negotiation
/// ends without an export), `Ok(Some(..))` when transmission begins. Protocol
/// violations that leave no way to answer end with an error; the caller closes the
/// connection.
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    ctx: HandshakeContext<'_>,
    deadline: Option<Instant>,
    timeout: Duration,
) -> Result<Option<Negotiated>> {
    let no_zeroes = greet(s)?;
    match haggle(s, ctx, no_zeroes, false, deadline, timeout)? {
        Outcome::Transmission(n) => Ok(Some(*n)),
        Outcome::Closed => Ok(None),
        Outcome::StartTls => Err(Error::Protocol(
            "STARTTLS needs a TLS-capable connection handler".into(),
        )),
    }
}

/// Sends the greeting and reads the client flags; returns whether the client asked
/// for `NO_ZEROES`.
pub fn greet<S: Read + Write>(s: &mut S) -> Result<bool> {
    let greeting = Greeting {
        nbdmagic: NBDMAGIC.into(),
        ihaveopt: IHAVEOPT.into(),
        flags: (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).into(),
    };
    s.write_all(greeting.as_bytes())
        .map_err(io_err("send greeting"))?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).map_err(io_err("read client flags"))?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(Error::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(client_flags & FLAG_C_NO_ZEROES != 0)
}

/// Option haggling, from the first option (or the first after `STARTTLS`, with
/// `tls_active`) until transmission, abort, or `STARTTLS`.
pub fn haggle<S: Read + Write>(
    s: &mut S,
    ctx: HandshakeContext<'_>,
    no_zeroes: bool,
    tls_active: bool,
    deadline: Option<Instant>,
    timeout: Duration,
) -> Result<Outcome> {
    let tls_mode = ctx.settings.tls.as_ref().map(|t| t.mode);
    let mut structured = false;
    // The last SET_META_CONTEXT: canonical export name and the contexts selected.
    let mut meta: Option<(String, Vec<MetaContext>)> = None;

    loop {
        if deadline.is_some_and(|d| Instant::now() > d) {
            return Err(Error::HandshakeTimeout(timeout));
        }
        let mut hb = [0u8; 16];
        s.read_exact(&mut hb).map_err(io_err("read option"))?;
        let h: OptionHeader = read_header(&hb).map_err(Error::Protocol)?;
        let opt = h.option.get();
        let len = h.length.get();
        if len > MAX_OPTION_DATA {
            if opt == OPT_EXPORT_NAME || len > MAX_SKIPPED_OPTION_DATA {
                return Err(Error::Protocol(format!(
                    "option {opt} with {len} bytes of data"
                )));
            }
            io::copy(&mut Read::by_ref(s).take(u64::from(len)), &mut io::sink())
                .map_err(io_err("skip option data"))?;
            reply_err(
                s,
                opt,
                REP_ERR_TOO_BIG,
                &format!("option data of {len} bytes is larger than {MAX_OPTION_DATA}"),
            )?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)
            .map_err(io_err("read option data"))?;

        if ctx.shutting_down.load(Ordering::SeqCst) && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Err(Error::Protocol("server is shutting down".into()));
            }
            reply_err(s, opt, REP_ERR_SHUTDOWN, "the server is shutting down")?;
            continue;
        }

        if opt == OPT_STARTTLS {
            if tls_mode.is_none() {
                reply_err(s, opt, REP_ERR_UNSUP, "TLS is not enabled on this server")?;
            } else if !data.is_empty() {
                reply_err(s, opt, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?;
            } else if tls_active {
                reply_err(s, opt, REP_ERR_INVALID, "TLS is already negotiated")?;
            } else {
                reply(s, opt, REP_ACK, &[])?;
                s.flush().map_err(io_err("send option reply"))?;
                return Ok(Outcome::StartTls);
            }
            continue;
        }
        if tls_mode == Some(TlsMode::Require) && !tls_active && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Err(Error::Protocol(
                    "NBD_OPT_EXPORT_NAME before STARTTLS, and this server requires TLS".into(),
                ));
            }
            reply_err(
                s,
                opt,
                REP_ERR_TLS_REQD,
                "this server requires TLS: negotiate NBD_OPT_STARTTLS first",
            )?;
            continue;
        }

        match opt {
            OPT_EXPORT_NAME => {
                let name = parse_string(&data).map_err(Error::Protocol)?;
                let Some(info) = ctx.exports.find(&name)? else {
                    return Err(Error::UnknownExport(name));
                };
                let export = ctx.exports.open(&info)?;
                let flags = transmission_flags(&export, structured, ctx.settings);
                let r = ExportNameReply {
                    size: export.size.into(),
                    flags: flags.into(),
                };
                let mut buf = r.as_bytes().to_vec();
                if !no_zeroes {
                    buf.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&buf)
                    .and_then(|_| s.flush())
                    .map_err(io_err("send export reply"))?;
                return Ok(transmission(export, flags, structured, &meta));
            }
            OPT_ABORT => {
                // The client may already have gone: a failed ACK is not an error.
                let _ = reply(s, opt, REP_ACK, &[])
                    .and_then(|_| s.flush().map_err(io_err("send option reply")));
                return Ok(Outcome::Closed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_err(s, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in ctx.exports.list()? {
                    let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    reply(s, opt, REP_SERVER, &d)?;
                }
                reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some(req) = valid(s, opt, parse_info(&data))? else {
                    continue;
                };
                let Some(info) = known_export(s, opt, ctx.exports, &req.name)? else {
                    continue;
                };
                let export = match ctx.exports.open(&info) {
                    Ok(e) => e,
                    Err(e) => {
                        reply_err(s, opt, REP_ERR_UNKNOWN, &e.to_string())?;
                        continue;
                    }
                };
                let flags = transmission_flags(&export, structured, ctx.settings);
                send_info(s, opt, &export, flags, &req.requests, ctx.settings)?;
                reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    s.flush().map_err(io_err("send option reply"))?;
                    return Ok(transmission(export, flags, structured, &meta));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(
                        s,
                        opt,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else if structured {
                    reply_err(
                        s,
                        opt,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    )?;
                } else {
                    structured = true;
                    reply(s, opt, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // Replaced even when the option fails.
                    meta = None;
                }
                if set && !structured {
                    reply_err(
                        s,
                        opt,
                        REP_ERR_INVALID,
                        "negotiate structured replies before metadata contexts",
                    )?;
                    continue;
                }
                let Some(req) = valid(s, opt, parse_meta(&data))? else {
                    continue;
                };
                let Some(info) = known_export(s, opt, ctx.exports, &req.export)? else {
                    continue;
                };
                // Persistent bitmaps describe the default VDI (QCOW2's active layer).
                let bitmaps = if info.root == qcowx_core::vdi::DEFAULT_VDI {
                    ctx.exports.bitmaps()
                } else {
                    &[]
                };
                let available = MetaContext::available(&ctx.exports.snapshots()?, bitmaps);
                let contexts = match_contexts(&req.queries, !set, &available);
                for (i, c) in contexts.iter().enumerate() {
                    let id = if set { context_id(i) } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(c.name().as_bytes());
                    reply(s, opt, REP_META_CONTEXT, &d)?;
                }
                reply(s, opt, REP_ACK, &[])?;
                if set {
                    meta = Some((info.name, contexts));
                }
            }
            _ => {
                let what = match opt {
                    OPT_EXTENDED_HEADERS => "extended headers are not supported".to_string(),
                    _ => format!("option {opt} is not supported"),
                };
                reply_err(s, opt, REP_ERR_UNSUP, &what)?;
            }
        }
    }
}

/// Transmission begins on `export`, with the contexts the last SET_META_CONTEXT
/// (`meta`) selected if it named this export.
fn transmission(
    export: Export,
    flags: u16,
    structured: bool,
    meta: &Option<(String, Vec<MetaContext>)>,
) -> Outcome {
    let contexts = match meta {
        Some((name, c)) if *name == export.info.name => c.clone(),
        _ => Vec::new(),
    };
    Outcome::Transmission(Box::new(Negotiated {
        export,
        flags,
        structured,
        contexts,
    }))
}

fn unknown_export_message(exports: &Exports, name: &str) -> String {
    let names: Vec<String> = exports
        .list()
        .map(|l| l.into_iter().map(|e| e.name).collect())
        .unwrap_or_default();
    let mut msg = format!("no export named '{name}'; exports: {}", names.join(", "));
    if msg.len() > 1024 {
        msg.truncate(truncate_str(&msg, 1021).len());
        msg.push_str("...");
    }
    msg
}

/// Sends the `NBD_REP_INFO` replies of an INFO / GO.
fn send_info<S: Write>(
    s: &mut S,
    opt: u32,
    export: &Export,
    flags: u16,
    requests: &[u16],
    settings: &Settings,
) -> Result<()> {
    let e = InfoExport {
        info_type: INFO_EXPORT.into(),
        size: export.size.into(),
        flags: flags.into(),
    };
    reply(s, opt, REP_INFO, e.as_bytes())?;
    // Always sent: the constraints are enforced whether or not the client asked.
    let preferred = (export
        .cluster_size
        .clamp(512, u64::from(settings.max_block_size)) as u32)
        .max(settings.min_block_size);
    let b = InfoBlockSize {
        info_type: INFO_BLOCK_SIZE.into(),
        minimum: settings.min_block_size.into(),
        preferred: preferred.into(),
        maximum: settings.max_block_size.into(),
    };
    reply(s, opt, REP_INFO, b.as_bytes())?;
    if requests.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(export.info.name.as_bytes());
        reply(s, opt, REP_INFO, &d)?;
    }
    if requests.contains(&INFO_DESCRIPTION) && !export.info.description.is_empty() {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(truncate_str(&export.info.description, MAX_STRING).as_bytes());
        reply(s, opt, REP_INFO, &d)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_requests_parse_and_reject_bad_lengths() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let r = parse_info(&d).expect("valid");
        assert_eq!(r.name, "abc");
        assert_eq!(r.requests, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        // One request byte short, one long, a name length past the end.
        assert!(parse_info(&d[..d.len() - 1]).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(parse_info(&long).is_err());
        let mut bad = d.clone();
        bad[3] = 200;
        assert!(parse_info(&bad).is_err());
        assert!(parse_info(&[0, 0]).is_err());
    }

    #[test]
    fn meta_requests_parse_and_match() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:", "qemu:allocation-depth"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        let r = parse_meta(&d).expect("valid");
        assert_eq!(r.export, "");
        let all = MetaContext::available(&["s1".to_string(), "s2".to_string()], &[]);
        let shadowed = MetaContext::available(&["s1".to_string()], &["s1".to_string()]);
        assert_eq!(
            match_contexts(&["qemu:dirty-bitmap:s1".into()], false, &shadowed),
            vec![MetaContext::PersistentBitmap("s1".into())]
        );
        assert_eq!(match_contexts(&r.queries, true, &all), all[..2].to_vec());
        assert_eq!(match_contexts(&[], true, &all), all);
        assert_eq!(
            match_contexts(&["qemu:".into()], true, &all),
            all[1..].to_vec()
        );
        assert_eq!(
            match_contexts(&r.queries, false, &all),
            vec![MetaContext::AllocationDepth]
        );
        assert!(match_contexts(&[], false, &all).is_empty());
        assert!(match_contexts(&["x-foo:bar".into()], true, &all).is_empty());
        let bitmaps = match_contexts(&["qemu:dirty-bitmap:".into()], true, &all);
        assert_eq!(bitmaps, all[2..].to_vec());
        assert!(match_contexts(&["qemu:dirty-bitmap:".into()], false, &all).is_empty());
        assert_eq!(
            match_contexts(&["qemu:dirty-bitmap:s2".into()], false, &all),
            vec![MetaContext::DirtyBitmap("s2".into())]
        );
        assert!(match_contexts(&["qemu:dirty-bitmap:nope".into()], false, &all).is_empty());
        assert!(parse_meta(&d[..d.len() - 1]).is_err());
        let mut extra = d.clone();
        extra.push(1);
        assert!(parse_meta(&extra).is_err());
        let mut nocolon = 0u32.to_be_bytes().to_vec();
        nocolon.extend_from_slice(&1u32.to_be_bytes());
        nocolon.extend_from_slice(&4u32.to_be_bytes());
        nocolon.extend_from_slice(b"base");
        assert!(parse_meta(&nocolon).is_err());
    }
}
