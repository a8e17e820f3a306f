//! The JSON of the read-only reports a server gives about its image: space use by
//! root (`usage`, what `qcowx tree` draws) and a check (`check`).

use serde::{Deserialize, Serialize};

use super::proto::RootKindJson;
use crate::vdi::usage::RootUsage;
use crate::CheckReport;

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

/// A check report as JSON: the answer to `check`, key for key the fields of
/// [`CheckReport`] in kebab-case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckJson {
    /// [`CheckReport::corruptions`].
    pub corruptions: u64,
    /// [`CheckReport::leaks`].
    pub leaks: u64,
    /// [`CheckReport::check_errors`].
    pub check_errors: u64,
    /// [`CheckReport::messages`].
    pub messages: Vec<String>,
    /// [`CheckReport::allocated_clusters`].
    pub allocated_clusters: u64,
    /// [`CheckReport::total_clusters`].
    pub total_clusters: u64,
    /// [`CheckReport::fragmented_clusters`].
    pub fragmented_clusters: u64,
    /// [`CheckReport::compressed_clusters`].
    pub compressed_clusters: u64,
    /// [`CheckReport::image_end_offset`].
    pub image_end_offset: u64,
    /// [`CheckReport::dirty`].
    pub dirty: bool,
    /// [`CheckReport::stale_corruptions`].
    pub stale_corruptions: u64,
    /// [`CheckReport::repaired`].
    pub repaired: bool,
    /// [`CheckReport::marked_corrupt`].
    pub marked_corrupt: bool,
}

impl From<&CheckReport> for CheckJson {
    fn from(r: &CheckReport) -> Self {
        CheckJson {
            corruptions: r.corruptions,
            leaks: r.leaks,
            check_errors: r.check_errors,
            messages: r.messages.clone(),
            allocated_clusters: r.allocated_clusters,
            total_clusters: r.total_clusters,
            fragmented_clusters: r.fragmented_clusters,
            compressed_clusters: r.compressed_clusters,
            image_end_offset: r.image_end_offset,
            dirty: r.dirty,
            stale_corruptions: r.stale_corruptions,
            repaired: r.repaired,
            marked_corrupt: r.marked_corrupt,
        }
    }
}

impl From<CheckJson> for CheckReport {
    fn from(r: CheckJson) -> Self {
        CheckReport {
            corruptions: r.corruptions,
            leaks: r.leaks,
            check_errors: r.check_errors,
            messages: r.messages,
            allocated_clusters: r.allocated_clusters,
            total_clusters: r.total_clusters,
            fragmented_clusters: r.fragmented_clusters,
            compressed_clusters: r.compressed_clusters,
            image_end_offset: r.image_end_offset,
            dirty: r.dirty,
            stale_corruptions: r.stale_corruptions,
            repaired: r.repaired,
            marked_corrupt: r.marked_corrupt,
        }
    }
}
