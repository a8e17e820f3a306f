//! The protocol's messages and their JSON, defined once with serde.
//!
//! Every line goes out through a [`serde_json::Value`], whose objects keep their keys
//! sorted: the bytes on the wire (and in `qcowx --output=json`) do not depend on the
//! order fields are declared in.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::json::{RangesJson, RootJson, UsageJson};
use crate::vdi::usage::RootUsage;
use crate::vdi::DEFAULT_VDI;
use crate::{CheckReport, GcReport, Range, RootInfo};

/// One control request: `{"op": OP, ...}` on the wire.
///
/// Adding an operation is a variant here and its handler in the executor
/// ([`crate::control::execute`]). The enum is `#[non_exhaustive]`: new operations
/// are added without breaking code outside the crate, whose matches keep a `_` arm:
/// a match that lists every operation of today does not compile.
///
/// ```compile_fail
/// use qcowx_core::control::Request;
///
/// fn name(req: &Request) -> &'static str {
///     match req {
///         Request::Snapshot { .. } => "snapshot",
///         Request::Fork { .. } => "fork",
///         Request::Delete(_) => "delete",
///         Request::Revert { .. } => "revert",
///         Request::Gc => "gc",
///         Request::List => "list",
///         Request::Diff { .. } => "diff",
///         Request::Usage => "usage",
///         Request::Check => "check",
///         Request::Bitmap { .. } => "bitmap",
///     }
/// }
/// # fn main() { let _ = name(&Request::Gc); }
/// ```
///
/// ```
/// use qcowx_core::control::{parse_request, Request};
///
/// let req = Request::Fork { snapshot: "golden".into(), name: "web-1".into() };
/// assert_eq!(req.op(), "fork");
/// assert!(req.modifies());
/// assert!(!Request::List.modifies());
/// let line = req.to_json(None);
/// assert_eq!(line["op"], "fork");
/// assert_eq!(parse_request(&line).unwrap().0, req);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
#[non_exhaustive]
pub enum Request {
    /// Take snapshot `name` of VDI `vdi`.
    Snapshot {
        /// The VDI (`"default"` for the default VDI; the default when left out).
        #[serde(default = "default_vdi")]
        vdi: String,
        /// The new snapshot's name.
        name: String,
    },
    /// Create VDI `name` from snapshot `snapshot`.
    Fork {
        /// The snapshot.
        snapshot: String,
        /// The new VDI's name.
        name: String,
    },
    /// Delete a snapshot or a VDI (not the default one).
    Delete(DeleteTarget),
    /// Make VDI `vdi`'s content that of snapshot `snapshot`.
    Revert {
        /// The VDI.
        vdi: String,
        /// The snapshot.
        snapshot: String,
    },
    /// Reclaim the space of deleted roots and write exact refcounts.
    Gc,
    /// List the live roots.
    List,
    /// The guest ranges where two roots may differ.
    Diff {
        /// One root.
        from: String,
        /// The other.
        to: String,
    },
    /// The live roots and the space each uses (what `qcowx tree` draws).
    Usage,
    /// Check the image's metadata and refcounts, as the server sees them (its own
    /// changes written out first, so only damage is reported).
    Check,
    /// Change persistent dirty bitmap `bitmap` as `qemu-img bitmap` does, in the
    /// order add, clear, merge, enable/disable, remove (every key but `bitmap` may be
    /// left out).
    Bitmap {
        /// The bitmap.
        bitmap: String,
        /// Add it (empty; enabled unless `disable`).
        #[serde(default)]
        add: bool,
        /// Bytes per bit of the added bitmap (default: the cluster size).
        #[serde(default)]
        granularity: Option<u64>,
        /// Clear every bit.
        #[serde(default)]
        clear: bool,
        /// Bitmaps whose dirty ranges are marked in this one.
        #[serde(default)]
        merge: Vec<String>,
        /// The image file the `merge` bitmaps are in, when not this image
        /// (`qemu-img bitmap --merge SOURCE -b SRC_FILE`); opened read-only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        merge_file: Option<String>,
        /// Enable it.
        #[serde(default)]
        enable: bool,
        /// Disable it.
        #[serde(default)]
        disable: bool,
        /// Remove it.
        #[serde(default)]
        remove: bool,
    },
}

fn default_vdi() -> String {
    DEFAULT_VDI.to_string()
}

/// What `delete` deletes: `{"snapshot": NAME}` or `{"vdi": NAME}`, exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "EitherName")]
pub enum DeleteTarget {
    /// A snapshot.
    Snapshot(String),
    /// A VDI.
    Vdi(String),
}

/// `delete`'s keys as they come, before checking that exactly one is there.
#[derive(Deserialize)]
struct EitherName {
    snapshot: Option<String>,
    vdi: Option<String>,
}

impl TryFrom<EitherName> for DeleteTarget {
    type Error = &'static str;

    fn try_from(e: EitherName) -> Result<Self, Self::Error> {
        match (e.snapshot, e.vdi) {
            (Some(s), None) => Ok(DeleteTarget::Snapshot(s)),
            (None, Some(v)) => Ok(DeleteTarget::Vdi(v)),
            _ => Err("\"delete\" takes exactly one of \"snapshot\" and \"vdi\""),
        }
    }
}

impl Request {
    /// The request as a JSON object, with `"image": PATH` when given.
    pub fn to_json(&self, image: Option<&std::path::Path>) -> Value {
        let mut v = self.fields();
        if let Some(p) = image {
            v.insert("image".into(), p.to_string_lossy().into_owned().into());
        }
        Value::Object(v)
    }

    /// The request's keys (`op` included).
    fn fields(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            // Every variant is a struct, a unit or a one-key map: always an object.
            _ => Map::new(),
        }
    }

    /// The operation's name on the wire.
    pub fn op(&self) -> String {
        match self.fields().get("op") {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        }
    }

    /// Whether the request changes the image.
    pub fn modifies(&self) -> bool {
        !matches!(
            self,
            Request::List | Request::Diff { .. } | Request::Usage | Request::Check
        )
    }
}

impl fmt::Display for Request {
    /// The operation and its arguments: `snapshot name='s1' vdi='default'`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields = self.fields();
        f.write_str(&self.op())?;
        for (k, v) in fields.iter().filter(|(k, _)| *k != "op") {
            match v {
                Value::String(s) => write!(f, " {k}='{s}'")?,
                other => write!(f, " {k}={other}")?,
            }
        }
        Ok(())
    }
}

/// Parses a request object; returns it and its `"image"`, if any. The error says what
/// is wrong, for the `invalid-request` answer.
///
/// ```
/// use qcowx_core::control::{parse_request, DeleteTarget, Request};
/// use serde_json::json;
///
/// let (req, image) = parse_request(&json!({"op": "delete", "snapshot": "s1", "image": "/vm/a.qcow2"})).unwrap();
/// assert_eq!(req, Request::Delete(DeleteTarget::Snapshot("s1".into())));
/// assert_eq!(image.as_deref(), Some(std::path::Path::new("/vm/a.qcow2")));
/// assert!(parse_request(&json!({"op": "gc", "force": true})).unwrap_err().contains("force"));
/// assert!(parse_request(&json!({"op": "explode"})).is_err());
/// ```
pub fn parse_request(v: &Value) -> Result<(Request, Option<PathBuf>), String> {
    let mut obj = v
        .as_object()
        .ok_or("a request must be a JSON object")?
        .clone();
    let op = match obj.get("op") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("\"op\" must be a string".into()),
        None => return Err("\"op\" is missing".into()),
    };
    let image = match obj.remove("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(PathBuf::from(s)),
        Some(_) => return Err("\"image\" must be a string".into()),
    };
    let req = Request::deserialize(Value::Object(obj.clone())).map_err(|e| {
        let e = e.to_string();
        if e.starts_with("unknown variant") {
            format!("unknown op \"{op}\": {e}")
        } else {
            format!("\"{op}\": {e}")
        }
    })?;
    // A key the request does not take would be ignored: refuse it instead.
    let known = req.fields();
    if let Some(k) = obj.keys().find(|k| !known.contains_key(*k)) {
        return Err(format!("\"{op}\" takes no \"{k}\""));
    }
    Ok((req, image))
}

// ---- answers ------------------------------------------------------------------------------

/// The answer to a successful request. `#[non_exhaustive]`, as [`Request`] is: new
/// operations may bring new answers, so a match on it outside the crate keeps a `_`
/// arm.
///
/// ```compile_fail
/// use qcowx_core::control::Response;
///
/// fn done(r: &Response) -> bool {
///     match r {
///         Response::Done => true,
///         Response::Root { .. }
///         | Response::Roots(_)
///         | Response::Gc(_)
///         | Response::Ranges(_)
///         | Response::Usage { .. }
///         | Response::Check(_) => false,
///     }
/// }
/// # fn main() { let _ = done(&Response::Done); }
/// ```
///
/// ```
/// use qcowx_core::control::Response;
/// use qcowx_core::Range;
///
/// let r = Response::Ranges(vec![Range { offset: 0, length: 65536 }]);
/// let line = r.to_json();
/// assert_eq!(line["ok"], true);
/// assert_eq!(line["bytes"], 65536);
/// assert_eq!(Response::from_json(&line).unwrap(), r);
/// assert_eq!(Response::Done.to_json(), serde_json::json!({"ok": true}));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "Success", try_from = "Success")]
#[non_exhaustive]
pub enum Response {
    /// Done (`delete`, `revert`).
    Done,
    /// The root a `snapshot` or `fork` created.
    Root {
        /// The new root.
        root: RootInfo,
        /// The NBD export serving it, if any (with `--export` lists, new roots are
        /// not exported).
        export: Option<String>,
    },
    /// The live roots (`list`).
    Roots(Vec<RootInfo>),
    /// What `gc` did.
    Gc(GcReport),
    /// The ranges that differ (`diff`).
    Ranges(Vec<Range>),
    /// The live roots and their space use (`usage`).
    Usage {
        /// The live roots, as `list` answers them.
        roots: Vec<RootInfo>,
        /// Their space use, in the same order.
        usage: Vec<RootUsage>,
    },
    /// A check's report (`check`).
    Check(CheckReport),
}

/// A success line's keys besides `"ok"`, by answer.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Success {
    // Untagged: tried in order, and unknown keys are ignored, so an answer with more
    // keys comes before one whose keys are a subset of its own.
    Usage {
        roots: Vec<RootJson>,
        usage: Vec<UsageJson>,
    },
    Check {
        check: CheckReport,
    },
    Root {
        root: RootJson,
        export: Option<String>,
    },
    Roots {
        roots: Vec<RootJson>,
    },
    Gc {
        gc: GcReport,
    },
    Ranges(RangesJson),
    Done {},
}

impl From<Response> for Success {
    fn from(r: Response) -> Self {
        match r {
            Response::Done => Success::Done {},
            Response::Root { root, export } => Success::Root {
                root: RootJson::from(&root),
                export,
            },
            Response::Roots(r) => Success::Roots {
                roots: r.iter().map(RootJson::from).collect(),
            },
            Response::Gc(gc) => Success::Gc { gc },
            Response::Ranges(r) => Success::Ranges(r.as_slice().into()),
            Response::Usage { roots, usage } => Success::Usage {
                roots: roots.iter().map(RootJson::from).collect(),
                usage: usage.iter().map(UsageJson::from).collect(),
            },
            Response::Check(r) => Success::Check { check: r },
        }
    }
}

impl TryFrom<Success> for Response {
    type Error = String;

    fn try_from(s: Success) -> Result<Self, String> {
        Ok(match s {
            Success::Done {} => Response::Done,
            Success::Root { root, export } => Response::Root {
                root: root.try_into()?,
                export,
            },
            Success::Roots { roots } => Response::Roots(
                roots
                    .into_iter()
                    .map(RootInfo::try_from)
                    .collect::<Result<_, _>>()?,
            ),
            Success::Gc { gc } => Response::Gc(gc),
            Success::Ranges(r) => Response::Ranges(r.into()),
            Success::Usage { roots, usage } => Response::Usage {
                roots: roots
                    .into_iter()
                    .map(RootInfo::try_from)
                    .collect::<Result<_, _>>()?,
                usage: usage
                    .into_iter()
                    .map(RootUsage::try_from)
                    .collect::<Result<_, _>>()?,
            },
            Success::Check { check } => Response::Check(check),
        })
    }
}

impl Response {
    /// The success line's object: `{"ok": true, ...}`.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or_else(|_| Value::Object(Map::new()));
        if let Value::Object(m) = &mut v {
            m.insert("ok".into(), true.into());
        }
        v
    }

    /// Parses a success line's object.
    pub fn from_json(v: &Value) -> Result<Response, String> {
        Response::deserialize(v).map_err(|e| e.to_string())
    }
}

/// A failure line: `{"ok": false, "error": MESSAGE, "kind": KIND}`.
///
/// ```
/// use qcowx_core::control::ErrorReply;
/// use qcowx_core::{CreateOptions, Image};
///
/// # fn main() -> Result<(), qcowx_core::Error> {
/// let dir = tempfile::tempdir().unwrap();
/// let img = Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(1 << 20))?;
/// let e = img.delete_snapshot("nope").unwrap_err();
/// let line = ErrorReply::from_error(&e).to_json();
/// assert_eq!((line["ok"].as_bool(), line["kind"].as_str()), (Some(false), Some("not-found")));
/// assert_eq!(line["error"], e.to_string());
/// let busy = ErrorReply::new("too many connections", "busy").to_json();
/// assert_eq!(busy["kind"], "busy");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The message (the library's, for image errors).
    #[serde(default = "no_reason")]
    pub error: String,
    /// The kind: [`crate::ErrorKind::as_str`] or one of the protocol's own.
    #[serde(default = "unknown_kind")]
    pub kind: String,
}

fn no_reason() -> String {
    "the server gave no reason".into()
}

fn unknown_kind() -> String {
    "unknown".into()
}

impl ErrorReply {
    /// The line is not a valid request.
    pub const INVALID_REQUEST: &'static str = "invalid-request";
    /// The request names another image than the one served.
    pub const WRONG_IMAGE: &'static str = "wrong-image";
    /// The server is shutting down.
    pub const SHUTTING_DOWN: &'static str = "shutting-down";
    /// Too many control connections.
    pub const BUSY: &'static str = "busy";

    /// A failure of `kind`.
    pub fn new(error: impl Into<String>, kind: &str) -> ErrorReply {
        ErrorReply {
            error: error.into(),
            kind: kind.into(),
        }
    }

    /// The failure line for a library error: its message and [`crate::Error::kind`].
    pub fn from_error(e: &crate::Error) -> ErrorReply {
        ErrorReply::new(e.to_string(), e.kind().as_str())
    }

    /// The failure line's object: `{"ok": false, ...}`.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or_else(|_| Value::Object(Map::new()));
        if let Value::Object(m) = &mut v {
            m.insert("ok".into(), false.into());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RootKind;
    use serde_json::json;
    use std::path::Path;

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Snapshot {
                vdi: "web".into(),
                name: "s1".into(),
            },
            Request::Fork {
                snapshot: "s1".into(),
                name: "db".into(),
            },
            Request::Delete(DeleteTarget::Snapshot("s1".into())),
            Request::Delete(DeleteTarget::Vdi("db".into())),
            Request::Revert {
                vdi: "web".into(),
                snapshot: "s1".into(),
            },
            Request::Gc,
            Request::List,
            Request::Diff {
                from: "s1".into(),
                to: "default".into(),
            },
            Request::Usage,
            Request::Check,
            Request::Bitmap {
                bitmap: "b0".into(),
                add: true,
                granularity: Some(65536),
                clear: false,
                merge: vec!["b1".into()],
                merge_file: Some("/x/other.qcow2".into()),
                enable: false,
                disable: true,
                remove: false,
            },
        ]
    }

    #[test]
    fn requests_round_trip_through_json() {
        for r in all_requests() {
            let v = r.to_json(Some(Path::new("/x/y.qcow2")));
            let (back, image) = parse_request(&v).expect("parse");
            assert_eq!(back, r);
            assert_eq!(image.as_deref(), Some(Path::new("/x/y.qcow2")));
            let (back, image) = parse_request(&r.to_json(None)).expect("parse");
            assert_eq!(back, r);
            assert!(image.is_none());
        }
        let (r, _) = parse_request(&json!({"op": "snapshot", "name": "a"})).unwrap();
        assert_eq!(
            r,
            Request::Snapshot {
                vdi: "default".into(),
                name: "a".into()
            }
        );
    }

    /// The bytes of today's wire format, key for key.
    #[test]
    fn requests_have_the_documented_keys() {
        let lines: Vec<String> = all_requests()
            .iter()
            .map(|r| r.to_json(None).to_string())
            .collect();
        assert_eq!(
            lines,
            [
                r#"{"name":"s1","op":"snapshot","vdi":"web"}"#,
                r#"{"name":"db","op":"fork","snapshot":"s1"}"#,
                r#"{"op":"delete","snapshot":"s1"}"#,
                r#"{"op":"delete","vdi":"db"}"#,
                r#"{"op":"revert","snapshot":"s1","vdi":"web"}"#,
                r#"{"op":"gc"}"#,
                r#"{"op":"list"}"#,
                r#"{"from":"s1","op":"diff","to":"default"}"#,
                r#"{"op":"usage"}"#,
                r#"{"op":"check"}"#,
                r#"{"add":true,"bitmap":"b0","clear":false,"disable":true,"enable":false,"granularity":65536,"merge":["b1"],"merge_file":"/x/other.qcow2","op":"bitmap","remove":false}"#,
            ]
        );
        let r = Request::Snapshot {
            vdi: "default".into(),
            name: "x".into(),
        };
        assert_eq!(r.op(), "snapshot");
        assert_eq!(r.to_string(), "snapshot name='x' vdi='default'");
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases = [
            (json!([1, 2]), "JSON object"),
            (json!({"name": "x"}), "\"op\" is missing"),
            (json!({"op": 7}), "\"op\" must be a string"),
            (json!({"op": "explode"}), "unknown op \"explode\""),
            (json!({"op": "snapshot"}), "name"),
            (json!({"op": "snapshot", "name": 3}), "string"),
            (json!({"op": "fork", "name": "x"}), "snapshot"),
            (json!({"op": "delete"}), "exactly one"),
            (
                json!({"op": "delete", "vdi": "a", "snapshot": "b"}),
                "exactly one",
            ),
            (json!({"op": "gc", "force": true}), "takes no \"force\""),
            (
                json!({"op": "snapshot", "name": "x", "force": true}),
                "takes no \"force\"",
            ),
            (
                json!({"op": "list", "image": 5}),
                "\"image\" must be a string",
            ),
        ];
        for (v, want) in cases {
            let e = parse_request(&v).expect_err(&v.to_string());
            assert!(e.contains(want), "{v}: {e}");
        }
    }

    #[test]
    fn responses_round_trip_through_json() {
        let root = RootInfo {
            kind: RootKind::Snapshot,
            name: "s1".into(),
            uid: 0x939d_26cf_d54e_091b,
            vdi: "default".into(),
            parent: Some("s0".into()),
            created_ns: 1_795_316_367_208_163_929,
            size: 8 << 20,
            id: Some("3".into()),
        };
        let r = Response::Root {
            root: root.clone(),
            export: Some("default@s1".into()),
        };
        let v = r.to_json();
        assert_eq!(
            v.to_string(),
            r#"{"export":"default@s1","ok":true,"root":{"date-nsec":208163929,"date-sec":1795316367,"id":"3","kind":"snapshot","name":"s1","parent":"s0","uid":"939d26cfd54e091b","vdi":"default","virtual-size":8388608}}"#
        );
        assert_eq!(Response::from_json(&v).unwrap(), r);
        let none = Response::Root {
            root: root.clone(),
            export: None,
        };
        assert_eq!(none.to_json()["export"], Value::Null);
        assert_eq!(Response::from_json(&none.to_json()).unwrap(), none);
        let list = Response::Roots(vec![root.clone()]);
        assert_eq!(Response::from_json(&list.to_json()).unwrap(), list);
        let gc = Response::Gc(GcReport {
            roots_removed: 1,
            clusters_freed: 2,
            bytes_freed: 131072,
            file_size_before: 10,
            file_size_after: 5,
            allocated_before: Some(8),
            allocated_after: None,
            refcounts_exact: true,
        });
        assert_eq!(
            gc.to_json().to_string(),
            r#"{"gc":{"allocated-after":null,"allocated-before":8,"bytes-freed":131072,"clusters-freed":2,"file-size-after":5,"file-size-before":10,"refcounts-exact":true,"roots-removed":1},"ok":true}"#
        );
        assert_eq!(Response::from_json(&gc.to_json()).unwrap(), gc);
        let ranges = Response::Ranges(vec![Range {
            offset: 65536,
            length: 65536,
        }]);
        assert_eq!(
            ranges.to_json().to_string(),
            r#"{"bytes":65536,"ok":true,"ranges":[{"length":65536,"offset":65536}]}"#
        );
        assert_eq!(Response::from_json(&ranges.to_json()).unwrap(), ranges);
        let usage = Response::Usage {
            roots: vec![root.clone()],
            usage: vec![RootUsage {
                name: "s1".into(),
                kind: RootKind::Snapshot,
                uid: root.uid,
                mapped_bytes: 131072,
                exclusive_bytes: 65536,
            }],
        };
        let v = usage.to_json();
        assert_eq!(
            v["usage"].to_string(),
            r#"[{"exclusive-bytes":65536,"kind":"snapshot","mapped-bytes":131072,"name":"s1","uid":"939d26cfd54e091b"}]"#
        );
        assert_eq!(Response::from_json(&v).unwrap(), usage);
        let check = Response::Check(CheckReport {
            leaks: 1,
            messages: vec!["leaked cluster 5".into()],
            dirty: true,
            ..CheckReport::default()
        });
        let v = check.to_json();
        assert_eq!(v["check"]["leaks"], 1);
        assert_eq!(v["check"]["check-errors"], 0);
        assert_eq!(Response::from_json(&v).unwrap(), check);
        assert_eq!(Response::Done.to_json().to_string(), r#"{"ok":true}"#);
        assert_eq!(
            Response::from_json(&json!({"ok": true})).unwrap(),
            Response::Done
        );
        let e = ErrorReply::new("no", ErrorReply::BUSY);
        assert_eq!(
            e.to_json().to_string(),
            r#"{"error":"no","kind":"busy","ok":false}"#
        );
    }
}
