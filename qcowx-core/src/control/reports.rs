//! The JSON of the read-only reports a server gives about its image: space use by
//! root (`usage`, what `qcowx tree` draws). A check's answer is
//! [`crate::CheckReport`] itself.

use serde::{Deserialize, Serialize};

use super::proto::RootKindJson;
use crate::vdi::usage::RootUsage;

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
