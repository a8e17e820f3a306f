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
    #[error("header field `{field}` has invalid value {value}: {why}")]
    Field {
        /// Field name as the QCOW2 specification spells it.
        field: &'static str,
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
    #[error("header extension {kind:#010x} at offset {offset}: {why}")]
    Extension {
        /// Extension type.
        kind: u32,
        /// Byte offset of the extension in the file.
        offset: u64,
        /// What is wrong.
        why: &'static str,
    },
}
