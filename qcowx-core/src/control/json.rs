//! The JSON of roots, gc reports and ranges in control answers (the keys of
//! `qcowx list|gc|diff --output=json`, `spec/cli-json.md`), and their conversions to and
//! from the library's types.

use serde::{Deserialize, Serialize};

use crate::vdi::usage::RootUsage;
use crate::{Range, RootInfo, RootKind};

/// A root's kind as JSON: `"vdi"` or `"snapshot"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootKindJson {
    /// A VDI head.
    Vdi,
    /// A snapshot.
    Snapshot,
}

impl From<RootKind> for RootKindJson {
    fn from(k: RootKind) -> Self {
        match k {
            RootKind::Vdi => RootKindJson::Vdi,
            RootKind::Snapshot => RootKindJson::Snapshot,
        }
    }
}

/// One root's space use as JSON: an element of `usage` in the answer to `usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct UsageJson {
    /// The root's name.
    pub name: String,
    /// Snapshot or VDI.
    pub kind: RootKindJson,
    /// Its unique id, lower-case hexadecimal.
    pub uid: String,
    /// Guest bytes it maps to clusters of the image.
    pub mapped_bytes: u64,
    /// Bytes of host clusters only it references.
    pub exclusive_bytes: u64,
}

impl From<&RootUsage> for UsageJson {
    fn from(u: &RootUsage) -> Self {
        UsageJson {
            name: u.name.clone(),
            kind: u.kind.into(),
            uid: format!("{:x}", u.uid),
            mapped_bytes: u.mapped_bytes,
            exclusive_bytes: u.exclusive_bytes,
        }
    }
}

impl TryFrom<UsageJson> for RootUsage {
    type Error = String;

    fn try_from(u: UsageJson) -> Result<Self, String> {
        let uid = u64::from_str_radix(&u.uid, 16)
            .map_err(|_| format!("\"uid\" {:?} is not hexadecimal", u.uid))?;
        Ok(RootUsage {
            name: u.name,
            kind: u.kind.into(),
            uid,
            mapped_bytes: u.mapped_bytes,
            exclusive_bytes: u.exclusive_bytes,
        })
    }
}

impl From<RootKindJson> for RootKind {
    fn from(k: RootKindJson) -> Self {
        match k {
            RootKindJson::Vdi => RootKind::Vdi,
            RootKindJson::Snapshot => RootKind::Snapshot,
        }
    }
}

/// A root as JSON: an element of `roots` in `qcowx list --output=json` and in the
/// control protocol's answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RootJson {
    /// Its name.
    pub name: String,
    /// Snapshot or VDI.
    pub kind: RootKindJson,
    /// Its unique id, lower-case hexadecimal.
    pub uid: String,
    /// The VDI it belongs to.
    pub vdi: String,
    /// The root its content came from.
    pub parent: Option<String>,
    /// Creation time: seconds since the Unix epoch.
    pub date_sec: u64,
    /// Creation time: nanoseconds within that second.
    pub date_nsec: u64,
    /// Virtual disk size.
    pub virtual_size: u64,
    /// The QCOW2 snapshot ID.
    pub id: Option<String>,
}

impl From<&RootInfo> for RootJson {
    fn from(r: &RootInfo) -> Self {
        RootJson {
            name: r.name.clone(),
            kind: r.kind.into(),
            uid: format!("{:x}", r.uid),
            vdi: r.vdi.clone(),
            parent: r.parent.clone(),
            date_sec: r.created_ns / 1_000_000_000,
            date_nsec: r.created_ns % 1_000_000_000,
            virtual_size: r.size,
            id: r.id.clone(),
        }
    }
}

impl TryFrom<RootJson> for RootInfo {
    type Error = String;

    fn try_from(r: RootJson) -> Result<Self, String> {
        let uid = u64::from_str_radix(&r.uid, 16)
            .map_err(|_| format!("\"uid\" {:?} is not hexadecimal", r.uid))?;
        Ok(RootInfo {
            kind: r.kind.into(),
            name: r.name,
            uid,
            vdi: r.vdi,
            parent: r.parent,
            created_ns: r
                .date_sec
                .saturating_mul(1_000_000_000)
                .saturating_add(r.date_nsec),
            size: r.virtual_size,
            id: r.id,
        })
    }
}

/// A guest range as JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeJson {
    /// Start (bytes).
    pub offset: u64,
    /// Length (bytes).
    pub length: u64,
}

/// The ranges two roots may differ in, as JSON: `{"ranges": [...], "bytes": TOTAL}`
/// (`qcowx diff --output=json` adds `filename`, `from` and `to`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangesJson {
    /// The ranges.
    pub ranges: Vec<RangeJson>,
    /// The sum of their lengths.
    pub bytes: u64,
}

impl From<&[Range]> for RangesJson {
    fn from(r: &[Range]) -> Self {
        RangesJson {
            ranges: r
                .iter()
                .map(|x| RangeJson {
                    offset: x.offset,
                    length: x.length,
                })
                .collect(),
            bytes: r.iter().map(|x| x.length).sum(),
        }
    }
}

impl From<RangesJson> for Vec<Range> {
    fn from(r: RangesJson) -> Self {
        r.ranges
            .into_iter()
            .map(|x| Range {
                offset: x.offset,
                length: x.length,
            })
            .collect()
    }
}
