//! Header extensions: typed views of the ones qcowx reads, byte-for-byte preservation of
//! the rest.
//!
//! Each extension is `type: u32, length: u32, data, padding to 8 bytes` (big-endian),
//! following the fixed header; type 0 ends the list.

use zerocopy::big_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::format::header_error::HeaderError;

/// End of the extension list.
pub const EXT_END: u32 = 0x0000_0000;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_ENCRYPTION: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The header of one extension.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawExtensionHeader {
    /// Extension type.
    pub kind: U32,
    /// Length of the data, without padding.
    pub length: U32,
}

/// One entry of the feature name table (48 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawFeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number within that feature field.
    pub bit: u8,
    /// NUL-padded name.
    pub name: [u8; 46],
}

/// Which feature field a feature bit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// Incompatible features.
    Incompatible = 0,
    /// Compatible features.
    Compatible = 1,
    /// Auto-clear features.
    Autoclear = 2,
}

/// One header extension, kept as its raw bytes.
///
/// ```
/// use qcowx_core::format::extensions::{Extension, FeatureKind, EXT_END, EXT_FEATURE_NAMES};
///
/// let mut out = Vec::new();
/// Extension { kind: 0x1234_5678, data: vec![1, 2, 3] }.write_to(&mut out);
/// assert_eq!(out.len(), 8 + 8, "header, data, padding to 8 bytes");
/// let names = Extension::feature_names(&[(FeatureKind::Compatible, 0, "lazy refcounts")]);
/// assert_eq!((names.kind, names.data.len()), (EXT_FEATURE_NAMES, 48));
/// assert_eq!(Extension::end().kind, EXT_END);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type.
    pub kind: u32,
    /// Its data, without padding.
    pub data: Vec<u8>,
}

impl Extension {
    /// The end-of-list marker.
    pub fn end() -> Extension {
        Extension {
            kind: EXT_END,
            data: Vec::new(),
        }
    }

    /// Appends the serialized extension (header, data, padding) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let hdr = RawExtensionHeader {
            kind: self.kind.into(),
            length: (self.data.len() as u32).into(),
        };
        out.extend_from_slice(hdr.as_bytes());
        out.extend_from_slice(&self.data);
        let pad = self.data.len().next_multiple_of(8) - self.data.len();
        out.extend(std::iter::repeat_n(0u8, pad));
    }

    /// A feature name table holding `names`.
    pub fn feature_names(names: &[(FeatureKind, u8, &str)]) -> Extension {
        let mut data = Vec::with_capacity(names.len() * 48);
        for (kind, bit, name) in names {
            let mut entry = RawFeatureName {
                kind: *kind as u8,
                bit: *bit,
                name: [0; 46],
            };
            let n = name.len().min(46);
            entry.name[..n].copy_from_slice(&name.as_bytes()[..n]);
            data.extend_from_slice(entry.as_bytes());
        }
        Extension {
            kind: EXT_FEATURE_NAMES,
            data,
        }
    }
}

/// The header extensions of an image, in file order.
///
/// ```
/// use qcowx_core::format::extensions::{
///     Extension, Extensions, FeatureKind, EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_FEATURE_NAMES,
/// };
///
/// let mut bytes = Vec::new();
/// Extension { kind: EXT_BACKING_FORMAT, data: b"raw".to_vec() }.write_to(&mut bytes);
/// Extension::feature_names(&[(FeatureKind::Incompatible, 0, "dirty bit")]).write_to(&mut bytes);
/// Extension::end().write_to(&mut bytes);
/// assert_eq!(bytes.len() % 8, 0, "each padded to 8 bytes");
///
/// let mut exts = Extensions::parse(&bytes, 0, bytes.len() as u64).unwrap();
/// assert_eq!(exts.iter().count(), 2);
/// assert_eq!(exts.backing_format(), Some("raw"));
/// assert_eq!(exts.feature_name(FeatureKind::Incompatible, 0).as_deref(), Some("dirty bit"));
/// assert!(exts.has(EXT_FEATURE_NAMES) && exts.data_file().is_none());
/// exts.set(Extension { kind: EXT_DATA_FILE, data: b"data.raw".to_vec() });
/// assert_eq!(exts.data_file().as_deref(), Some("data.raw"));
/// assert_eq!(exts.get(EXT_DATA_FILE).map(|e| e.data.len()), Some(8));
/// exts.remove(EXT_BACKING_FORMAT);
/// assert_eq!(exts.backing_format(), None);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    list: Vec<Extension>,
}

impl Extensions {
    /// Parses extensions from `first[start..end]`.
    pub fn parse(first: &[u8], start: u64, end: u64) -> Result<Extensions, HeaderError> {
        let mut list = Vec::new();
        let end = end.min(first.len() as u64);
        let mut pos = start;
        loop {
            if pos + 8 > end {
                // QEMU tolerates a missing end marker when the area ends; an
                // extension header cut by the end is an error (zeros aside).
                let cut = &first[pos.min(end) as usize..end as usize];
                if cut.iter().any(|&b| b != 0) {
                    let mut kind = [0u8; 4];
                    for (k, b) in kind.iter_mut().zip(cut) {
                        *k = *b;
                    }
                    return Err(HeaderError::Extension {
                        kind: u32::from_be_bytes(kind),
                        offset: pos,
                        why: "its header runs past the end of the extension area",
                    });
                }
                break;
            }
            let (hdr, _) = RawExtensionHeader::read_from_prefix(&first[pos as usize..])
                .map_err(|_| HeaderError::Truncated { len: end })?;
            let kind = hdr.kind.get();
            let len = u64::from(hdr.length.get());
            if kind == EXT_END {
                break;
            }
            let data_start = pos + 8;
            if data_start + len > end {
                return Err(HeaderError::Extension {
                    kind,
                    offset: pos,
                    why: "extends past the end of the first cluster",
                });
            }
            let data = first[data_start as usize..(data_start + len) as usize].to_vec();
            if list.len() >= 4096 {
                return Err(HeaderError::Extension {
                    kind,
                    offset: pos,
                    why: "too many header extensions",
                });
            }
            validate(kind, &data, pos)?;
            list.push(Extension { kind, data });
            pos = data_start + len.next_multiple_of(8);
        }
        Ok(Extensions { list })
    }

    /// Iterates over the extensions in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Extension> {
        self.list.iter()
    }

    /// The extension of type `kind`, if present.
    pub fn get(&self, kind: u32) -> Option<&Extension> {
        self.list.iter().find(|e| e.kind == kind)
    }

    /// Whether an extension of type `kind` is present.
    pub fn has(&self, kind: u32) -> bool {
        self.get(kind).is_some()
    }

    /// Replaces (or adds, at the front) the extension of the same type.
    pub fn set(&mut self, ext: Extension) {
        if let Some(e) = self.list.iter_mut().find(|e| e.kind == ext.kind) {
            *e = ext;
        } else {
            self.list.insert(0, ext);
        }
    }

    /// Removes every extension of type `kind`.
    pub fn remove(&mut self, kind: u32) {
        self.list.retain(|e| e.kind != kind);
    }

    /// The backing file format (`qcow2`, `raw`, …) if the extension is present.
    pub fn backing_format(&self) -> Option<&str> {
        self.get(EXT_BACKING_FORMAT)
            .and_then(|e| std::str::from_utf8(&e.data).ok())
            .map(|s| s.trim_end_matches('\0'))
    }

    /// The external data file name, if the extension is present.
    pub fn data_file(&self) -> Option<String> {
        self.get(EXT_DATA_FILE).map(|e| {
            String::from_utf8_lossy(&e.data)
                .trim_end_matches('\0')
                .to_string()
        })
    }

    /// The name the feature name table gives to `bit` of `kind`, if any.
    pub fn feature_name(&self, kind: FeatureKind, bit: u8) -> Option<String> {
        let ext = self.get(EXT_FEATURE_NAMES)?;
        ext.data
            .chunks_exact(48)
            .filter_map(|c| RawFeatureName::read_from_bytes(c).ok())
            .find(|f| f.kind == kind as u8 && f.bit == bit)
            .map(|f| {
                let end = f.name.iter().position(|&b| b == 0).unwrap_or(46);
                String::from_utf8_lossy(&f.name[..end]).into_owned()
            })
    }
}

fn validate(kind: u32, data: &[u8], offset: u64) -> Result<(), HeaderError> {
    let bad = |why| Err(HeaderError::Extension { kind, offset, why });
    match kind {
        EXT_FEATURE_NAMES if !data.len().is_multiple_of(48) => {
            bad("feature name table length is not a multiple of 48")
        }
        EXT_BITMAPS if data.len() < 24 => bad("bitmaps extension shorter than 24 bytes"),
        EXT_ENCRYPTION if data.len() < 16 => bad("encryption extension shorter than 16 bytes"),
        EXT_BACKING_FORMAT if std::str::from_utf8(data).is_err() => {
            bad("backing format is not UTF-8")
        }
        _ => Ok(()),
    }
}
