//! The NBD wire format: magic numbers, flag and type values, and every fixed-size
//! message as a big-endian zerocopy struct.
//!
//! Values and layouts are the NBD protocol's. Everything on the wire is big-endian
//! ("network byte order").

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

// ---- magic numbers ------------------------------------------------------------------

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---- handshake flags ----------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be omitted.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server knows.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---- transmission flags ---------------------------------------------------------------

/// Always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported (structured replies only).
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Flush and FUA are coherent across connections.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_CACHE` is understood.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- options --------------------------------------------------------------------------

/// Choose an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// End the negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Use 64-bit extended headers (not supported here: answered with `ERR_UNSUP`).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---- option replies -------------------------------------------------------------------

/// Success / end of a list.
pub const REP_ACK: u32 = 1;
/// One export of `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One information item of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
/// Forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
/// Syntactically or semantically invalid option.
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
/// TLS required first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
/// The request or the reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

// ---- information types ----------------------------------------------------------------

/// Size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- commands -------------------------------------------------------------------------

/// Read.
pub const CMD_READ: u16 = 0;
/// Write (with payload).
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Cache (prefetch hint).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: at most one content chunk in a read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent per context in a block status reply.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: write zeroes only if it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---- structured replies ---------------------------------------------------------------

/// Structured reply flag: the final chunk.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Empty final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A range that reads as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Block status descriptors of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// An error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// An error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// ---- errors ---------------------------------------------------------------------------

/// Operation not permitted.
pub const EPERM: u32 = 1;
/// Input/output error.
pub const EIO: u32 = 5;
/// Cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left on device.
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Operation not supported.
pub const ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const ESHUTDOWN: u32 = 108;

// ---- metadata contexts ----------------------------------------------------------------

/// `base:allocation` flag: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// The longest string (export name, description, query) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// The longest prefix of `s` that is at most `max` bytes long and ends on a character
/// boundary: how strings are cut to fit the protocol's limits.
pub fn truncate_str(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---- fixed-size messages --------------------------------------------------------------

/// The server's first message of the newstyle handshake.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Greeting {
    /// [`NBDMAGIC`].
    pub nbdmagic: U64,
    /// [`IHAVEOPT`].
    pub ihaveopt: U64,
    /// Handshake flags.
    pub flags: U16,
}

/// An option request header (followed by `length` bytes of data).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionHeader {
    /// [`IHAVEOPT`].
    pub magic: U64,
    /// The option.
    pub option: U32,
    /// Length of the option data.
    pub length: U32,
}

/// An option reply header (followed by `length` bytes of data).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionReplyHeader {
    /// [`OPTION_REPLY_MAGIC`].
    pub magic: U64,
    /// The option this replies to.
    pub option: U32,
    /// Reply type (`REP_*`).
    pub reply_type: U32,
    /// Length of the reply data.
    pub length: U32,
}

/// The reply to `NBD_OPT_EXPORT_NAME` (followed by 124 zero bytes unless
/// `NO_ZEROES` was negotiated).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: U64,
    /// Transmission flags.
    pub flags: U16,
}

/// `NBD_INFO_EXPORT` payload.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoExport {
    /// [`INFO_EXPORT`].
    pub info_type: U16,
    /// Export size in bytes.
    pub size: U64,
    /// Transmission flags.
    pub flags: U16,
}

/// `NBD_INFO_BLOCK_SIZE` payload.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoBlockSize {
    /// [`INFO_BLOCK_SIZE`].
    pub info_type: U16,
    /// Minimum block size.
    pub minimum: U32,
    /// Preferred block size.
    pub preferred: U32,
    /// Maximum block size.
    pub maximum: U32,
}

/// A transmission request header (a write is followed by `length` bytes of data).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestHeader {
    /// [`REQUEST_MAGIC`].
    pub magic: U32,
    /// Command flags.
    pub flags: U16,
    /// Command (`CMD_*`).
    pub command: U16,
    /// Opaque cookie ("handle") echoed in the reply.
    pub cookie: U64,
    /// Byte offset.
    pub offset: U64,
    /// Length in bytes.
    pub length: U32,
}

/// A simple reply (a successful read is followed by the data).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SimpleReply {
    /// [`SIMPLE_REPLY_MAGIC`].
    pub magic: U32,
    /// Error (0 = success).
    pub error: U32,
    /// The request's cookie.
    pub cookie: U64,
}

/// A structured reply chunk header (followed by `length` bytes of payload).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChunkHeader {
    /// [`STRUCTURED_REPLY_MAGIC`].
    pub magic: U32,
    /// Reply flags ([`REPLY_FLAG_DONE`]).
    pub flags: U16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub chunk_type: U16,
    /// The request's cookie.
    pub cookie: U64,
    /// Payload length.
    pub length: U32,
}

/// `NBD_REPLY_TYPE_OFFSET_HOLE` payload.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct HolePayload {
    /// Offset of the hole.
    pub offset: U64,
    /// Its length.
    pub length: U32,
}

/// The start of every error chunk payload (followed by the message, then, for
/// `ERROR_OFFSET`, a 64-bit offset).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ErrorPayload {
    /// Error value (nonzero).
    pub error: U32,
    /// Length of the message that follows.
    pub message_length: U16,
}

/// One block status descriptor.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BlockDescriptor {
    /// Extent length (nonzero).
    pub length: U32,
    /// Status flags of the context.
    pub status: U32,
}

/// A fixed-size message that opens with a magic number: read with [`read_header`].
pub trait Header: FromBytes {
    /// What the message is, in errors.
    const WHAT: &'static str;
    /// The magic it must carry.
    const MAGIC: u64;
    /// How errors name the magic (its value in hex unless set).
    const MAGIC_NAME: Option<&'static str> = None;
    /// The magic it carries.
    fn magic(&self) -> u64;
}

impl Header for OptionHeader {
    const WHAT: &'static str = "option";
    const MAGIC: u64 = IHAVEOPT;
    const MAGIC_NAME: Option<&'static str> = Some("IHAVEOPT");
    fn magic(&self) -> u64 {
        self.magic.get()
    }
}

impl Header for RequestHeader {
    const WHAT: &'static str = "request";
    const MAGIC: u64 = REQUEST_MAGIC as u64;
    fn magic(&self) -> u64 {
        self.magic.get().into()
    }
}

/// Reads a message `T` from `bytes` (exactly its size) and checks its magic; the error
/// says what is wrong.
pub fn read_header<T: Header>(bytes: &[u8]) -> Result<T, String> {
    let h = T::read_from_bytes(bytes).map_err(|_| format!("short {} header", T::WHAT))?;
    if h.magic() != T::MAGIC {
        let expected = T::MAGIC_NAME.map_or_else(|| format!("{:#x}", T::MAGIC), str::to_string);
        return Err(format!(
            "{} magic {:#x} is not {expected}",
            T::WHAT,
            h.magic()
        ));
    }
    Ok(h)
}

impl ChunkHeader {
    /// A chunk header for `cookie`.
    pub fn new(cookie: u64, chunk_type: u16, flags: u16, length: u32) -> ChunkHeader {
        ChunkHeader {
            magic: STRUCTURED_REPLY_MAGIC.into(),
            flags: flags.into(),
            chunk_type: chunk_type.into(),
            cookie: cookie.into(),
            length: length.into(),
        }
    }
}

impl SimpleReply {
    /// A simple reply for `cookie` with `error` (0 for success).
    pub fn new(cookie: u64, error: u32) -> SimpleReply {
        SimpleReply {
            magic: SIMPLE_REPLY_MAGIC.into(),
            error: error.into(),
            cookie: cookie.into(),
        }
    }
}

/// The name of a command, for messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_protocol() {
        assert_eq!(size_of::<Greeting>(), 18);
        assert_eq!(size_of::<OptionHeader>(), 16);
        assert_eq!(size_of::<OptionReplyHeader>(), 20);
        assert_eq!(size_of::<ExportNameReply>(), 10);
        assert_eq!(size_of::<InfoExport>(), 12);
        assert_eq!(size_of::<InfoBlockSize>(), 14);
        assert_eq!(size_of::<RequestHeader>(), 28);
        assert_eq!(size_of::<SimpleReply>(), 16);
        assert_eq!(size_of::<ChunkHeader>(), 20);
        assert_eq!(size_of::<HolePayload>(), 12);
        assert_eq!(size_of::<ErrorPayload>(), 6);
        assert_eq!(size_of::<BlockDescriptor>(), 8);
    }

    #[test]
    fn magic_bytes_spell_their_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn headers_are_checked_for_their_magic() {
        let mut bytes = IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 0]);
        let h: OptionHeader = read_header(&bytes).expect("valid");
        assert_eq!(h.option.get(), OPT_GO);
        assert_eq!(
            read_header::<OptionHeader>(&bytes[..15]).map(|_| ()),
            Err("short option header".to_string())
        );
        bytes[0] = 0;
        assert_eq!(
            read_header::<OptionHeader>(&bytes).map(|_| ()),
            Err("option magic 0x484156454f5054 is not IHAVEOPT".to_string())
        );
        let r = [0u8; 28];
        assert_eq!(
            read_header::<RequestHeader>(&r).map(|_| ()),
            Err("request magic 0x0 is not 0x25609513".to_string())
        );
    }

    #[test]
    fn strings_are_cut_on_character_boundaries() {
        assert_eq!(truncate_str("abc", 5), "abc");
        assert_eq!(truncate_str("abc", 2), "ab");
        // "é" is two bytes: a cut through it keeps neither.
        assert_eq!(truncate_str("aé", 2), "a");
        assert_eq!(truncate_str("aé", 3), "aé");
        assert_eq!(truncate_str("", 0), "");
    }
}
