//! What is wrong with a header or its extensions.

/// What is wrong with a header. Every variant names the field and the value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The file is shorter than a header.
    #[error("file is too short for a QCOW2 header ({len} bytes)")]
    Truncated {
        /// File length.
        len: u64,
    },
    /// The magic is not `QFI\xfb`.
    #[error("not a QCOW2 image: magic is {0:#010x}, expected 0x514649fb")]
    BadMagic(u32),
    /// A header field has a value QCOW2 does not allow.
    #[error(
        "header field `{field}`{} has invalid value {}: {why}",
        offset.map_or(String::new(), |at| format!(" (header offset {at:#x})")),
        shown(*value)
    )]
    Field {
        /// Field name as the QCOW2 specification spells it.
        field: &'static str,
        /// The field's byte offset in the header.
        offset: Option<u64>,
        /// The value found.
        value: u64,
        /// What the value must be.
        why: &'static str,
    },
    /// Incompatible feature bits this implementation does not know.
    #[error("unsupported incompatible feature(s): {0}")]
    UnknownIncompatible(String),
    /// The image is encrypted.
    #[error("encrypted images are not supported (crypt_method {0})")]
    Encrypted(u32),
    /// A header extension is malformed.
    #[error("header extension {kind:#010x} at offset {offset:#x}: {why}")]
    Extension {
        /// Extension type.
        kind: u32,
        /// Byte offset of the extension in the file.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
}

/// A field's value as a message shows it: small counts in decimal, offsets, sizes and
/// masks (anything from 64 Ki up) in hex.
pub fn shown(value: u64) -> String {
    if value < 0x1_0000 {
        value.to_string()
    } else {
        format!("{value:#x}")
    }
}
