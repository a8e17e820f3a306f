//! The object-store tier (feature `s3`; `spec/remote.md`): snapshot streams kept in
//! an S3-compatible bucket, and images whose base is a snapshot there.
//!
//! - [`push`] sends a snapshot (all of it, or what changed since a snapshot pushed
//!   before) as a send/receive stream object, with its index, and lists it in the
//!   prefix's manifest. [`pull`] receives a snapshot's chain of streams into an image.
//! - [`RemoteLayer`] is a backing layer that reads a pushed snapshot on demand: each
//!   guest range maps to the newest record of the chain that covers it, fetched
//!   with one ranged GET, verified, decoded and kept in a bounded local
//!   [`Cache`]. An image names it by a header extension
//!   ([`crate::format::remote::RemoteBase`]); nothing is ever written to the store
//!   through it.
//!
//! Layers: [`client`] signs and sends HTTP requests (and counts them), [`cache`]
//! keeps what was read; the layout of the objects is [`crate::format::remote`].

mod base;
pub mod cache;
pub mod client;

use std::io::{Read, Seek};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use crate::error::remote::RemoteError;
pub use base::RemoteLayer;
pub use cache::Cache;
pub use client::{Client, ObjectInfo};

use crate::engine::Image;
use crate::error::{Error, Result};
use crate::format::remote::{Manifest, ManifestEntry, MAX_MANIFEST_ENTRIES};
use crate::format::stream::{StreamHeader, STREAM_HEADER_BYTES};
use crate::stream::{ReceiveOptions, SendOptions};

/// The environment variable naming the store's endpoint (`http://HOST:PORT`).
pub const ENV_ENDPOINT: &str = "QCOWX_S3_ENDPOINT";
/// The environment variable holding the access key.
pub const ENV_ACCESS_KEY: &str = "AWS_ACCESS_KEY_ID";
/// The environment variable holding the secret key.
pub const ENV_SECRET_KEY: &str = "AWS_SECRET_ACCESS_KEY";
/// The environment variable naming the region (default `us-east-1`).
pub const ENV_REGION: &str = "AWS_REGION";
/// The environment variable bounding each request's waits, in seconds (default 30).
pub const ENV_TIMEOUT: &str = "QCOWX_S3_TIMEOUT";
/// The environment variable overriding a remote base's cache bound, in bytes.
pub const ENV_CACHE_BYTES: &str = "QCOWX_S3_CACHE_BYTES";
/// The environment variable naming a remote base's cache folder (default: the image's
/// path followed by `.qcowx-cache`).
pub const ENV_CACHE_DIR: &str = "QCOWX_S3_CACHE_DIR";

/// Where a store is and how to sign for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// `http://HOST:PORT` or `https://HOST`.
    pub endpoint: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
    /// Signing region.
    pub region: String,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// Longest wait for each read or write on a connection, and for an answer.
    pub io_timeout: Duration,
    /// Objects larger than this are uploaded in parts of this size (at least 5 MiB).
    pub part_bytes: u64,
}

/// [`StoreConfig::part_bytes`] unless set otherwise.
pub const DEFAULT_PART_BYTES: u64 = 64 << 20;

impl StoreConfig {
    /// The configuration from the environment ([`ENV_ENDPOINT`], [`ENV_ACCESS_KEY`],
    /// [`ENV_SECRET_KEY`], [`ENV_REGION`], [`ENV_TIMEOUT`]); `endpoint`, when given,
    /// is used where [`ENV_ENDPOINT`] is unset.
    pub fn from_env(endpoint: Option<&str>) -> std::result::Result<StoreConfig, RemoteError> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let config = |why: String| RemoteError::Config { why };
        let endpoint = var(ENV_ENDPOINT)
            .or_else(|| endpoint.filter(|e| !e.is_empty()).map(str::to_string))
            .ok_or_else(|| config(format!("no endpoint: set {ENV_ENDPOINT} or --endpoint")))?;
        let access_key =
            var(ENV_ACCESS_KEY).ok_or_else(|| config(format!("{ENV_ACCESS_KEY} is not set")))?;
        let secret_key =
            var(ENV_SECRET_KEY).ok_or_else(|| config(format!("{ENV_SECRET_KEY} is not set")))?;
        let secs = match var(ENV_TIMEOUT) {
            None => 30,
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|&s| (1..=3600).contains(&s))
                .ok_or_else(|| config(format!("{ENV_TIMEOUT}={v}: not 1 to 3600 seconds")))?,
        };
        Ok(StoreConfig {
            endpoint,
            access_key,
            secret_key,
            region: var(ENV_REGION).unwrap_or_else(|| "us-east-1".into()),
            connect_timeout: Duration::from_secs(secs.min(5)),
            io_timeout: Duration::from_secs(secs),
            part_bytes: DEFAULT_PART_BYTES,
        })
    }
}

/// A prefix in a bucket: `s3://BUCKET/PREFIX`, with its client.
#[derive(Debug)]
pub struct Store {
    client: Client,
    prefix: String,
    url: String,
    part_bytes: u64,
}

/// Parses `s3://BUCKET[/PREFIX]` into the bucket and the prefix (no slashes at its
/// ends).
pub fn parse_url(url: &str) -> std::result::Result<(String, String), RemoteError> {
    let bad = |why: &str| RemoteError::Config {
        why: format!("'{url}' is not s3://BUCKET/PREFIX: {why}"),
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("no s3:// scheme"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid {
        return Err(bad(
            "a bucket name is 3 to 63 lowercase letters, digits, '-' or '.'",
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.len() > 512 || prefix.contains("//") {
        return Err(bad("a prefix is at most 512 bytes, without empty parts"));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

impl Store {
    /// The store at `url` (`s3://BUCKET/PREFIX`) through the endpoint of `cfg`.
    /// Makes no request.
    pub fn open(url: &str, cfg: &StoreConfig) -> std::result::Result<Store, RemoteError> {
        let (bucket, prefix) = parse_url(url)?;
        Ok(Store {
            client: Client::new(cfg, &bucket)?,
            url: if prefix.is_empty() {
                format!("s3://{bucket}")
            } else {
                format!("s3://{bucket}/{prefix}")
            },
            prefix,
            part_bytes: cfg.part_bytes,
        })
    }

    /// The store's URL, normalized.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The HTTP client (its request counter, for one).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    /// The key of the manifest.
    pub fn manifest_key(&self) -> String {
        self.key("manifest.qxm")
    }

    /// The key of the stream object of snapshot `uid`.
    pub fn stream_key(&self, uid: u64) -> String {
        self.key(&format!("{uid:016x}.qxs"))
    }

    /// The key of the index object of snapshot `uid`.
    pub fn index_key(&self, uid: u64) -> String {
        self.key(&format!("{uid:016x}.qxi"))
    }

    /// The manifest (empty when none was pushed yet).
    pub fn manifest(&self) -> std::result::Result<Manifest, RemoteError> {
        let key = self.manifest_key();
        let max = 24 + 184 * MAX_MANIFEST_ENTRIES as u64;
        match self.client.get(&key, max) {
            Ok(bytes) => Manifest::decode(&bytes).map_err(|source| RemoteError::Layout {
                bucket: self.client.bucket().to_string(),
                key,
                source,
            }),
            Err(RemoteError::Status { status: 404, .. }) => Ok(Manifest::default()),
            Err(e) => Err(e),
        }
    }

    /// The snapshot named `name` in `manifest`.
    pub fn find<'m>(
        &self,
        manifest: &'m Manifest,
        name: &str,
    ) -> std::result::Result<&'m ManifestEntry, RemoteError> {
        manifest
            .by_name(name)
            .ok_or_else(|| RemoteError::NoSnapshot {
                url: self.url.clone(),
                name: name.to_string(),
                listed: listed(manifest),
            })
    }
}

fn listed(m: &Manifest) -> String {
    if m.entries.is_empty() {
        return "nothing".into();
    }
    m.entries
        .iter()
        .map(|e| e.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<RemoteError> for Error {
    fn from(source: RemoteError) -> Error {
        Error::Remote {
            source: Box::new(source),
        }
    }
}

/// What [`push`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The snapshot as the manifest lists it.
    pub entry: ManifestEntry,
    /// Whether it was listed already (nothing was sent).
    pub already: bool,
    /// Records in its stream (the end record included).
    pub records: u64,
}

/// Pushes snapshot `snapshot` of `image` to `store`: its stream (relative to `from`,
/// which must have been pushed before, or full), the stream's index, then the
/// manifest listing it. A snapshot listed already is not sent again.
pub fn push(
    image: &Arc<Image>,
    snapshot: &str,
    from: Option<&str>,
    store: &Store,
) -> Result<PushReport> {
    let mut manifest = store.manifest()?;
    let roots = image.list()?;
    let uid_of = |name: &str| {
        roots
            .iter()
            .find(|r| r.kind == crate::vdi::RootKind::Snapshot && r.name == name)
            .map(|r| r.uid)
    };
    if let Some(uid) = uid_of(snapshot) {
        if let Some(e) = manifest.by_uid(uid) {
            return Ok(PushReport {
                entry: e.clone(),
                already: true,
                records: 0,
            });
        }
    }
    if let Some(f) = from {
        let listed = uid_of(f).is_some_and(|uid| manifest.by_uid(uid).is_some());
        if !listed {
            return Err(Error::InvalidArgument(format!(
                "{}: snapshot '{f}' is not in {}: push it first (an incremental stream \
                 needs its base there)",
                image.file_name(),
                store.url()
            )));
        }
    }
    if manifest.entries.len() >= MAX_MANIFEST_ENTRIES {
        return Err(Error::InvalidArgument(format!(
            "{} lists {MAX_MANIFEST_ENTRIES} snapshots already",
            store.url()
        )));
    }
    let opts = SendOptions {
        from: from.map(str::to_string),
        resume: None,
    };
    // The stream goes to a file beside the image first: its length must be known
    // before it is uploaded, and it may be far larger than memory.
    let spool = Spool::new(image)?;
    let mut file = std::io::BufWriter::with_capacity(1 << 20, spool.create()?);
    let (report, index) = crate::stream::send_indexed(image, snapshot, &opts, &mut file)?;
    let mut file = file
        .into_inner()
        .map_err(|e| spool.io("write", e.into_error()))?;
    let stream_len = report.stream_bytes;
    let mut head = [0u8; STREAM_HEADER_BYTES];
    file.seek(std::io::SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut head))
        .and_then(|_| file.seek(std::io::SeekFrom::Start(0)))
        .map_err(|e| spool.io("read", e))?;
    let header = StreamHeader::decode(&head).map_err(|source| Error::Stream {
        file: image.file_name().to_string(),
        source,
    })?;
    let index_bytes = index.encode();
    let client = store.client();
    client.put_reader(
        &store.stream_key(header.to_uid),
        &mut file,
        stream_len,
        store.part_bytes,
    )?;
    drop(file);
    drop(spool);
    client.put(&store.index_key(header.to_uid), &index_bytes, false)?;
    let entry = ManifestEntry {
        uid: header.to_uid,
        from_uid: header.from_uid,
        virtual_size: header.virtual_size,
        created_ns: header.created_ns,
        stream_len,
        index_len: index_bytes.len() as u64,
        cluster_size: header.cluster_size,
        name: header.name,
    };
    manifest.entries.push(entry.clone());
    client.put(&store.manifest_key(), &manifest.encode(), false)?;
    Ok(PushReport {
        entry,
        already: false,
        records: report.records,
    })
}

/// The file a push writes its stream to before uploading it, removed when dropped.
struct Spool {
    path: std::path::PathBuf,
}

impl Spool {
    fn new(image: &Image) -> Result<Spool> {
        let mut name = image
            .path()
            .map(|p| p.as_os_str().to_owned())
            .unwrap_or_else(|| std::env::temp_dir().join("qcowx").into_os_string());
        name.push(format!(".qcowx-push-{}", std::process::id()));
        Ok(Spool { path: name.into() })
    }

    fn create(&self) -> Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&self.path)
            .map_err(|e| self.io("create", e))
    }

    fn io(&self, op: &'static str, source: std::io::Error) -> Error {
        Error::Io {
            file: self.path.display().to_string(),
            op,
            offset: 0,
            source,
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What [`pull`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullReport {
    /// Snapshots received, oldest first.
    pub received: Vec<String>,
    /// Snapshots of the chain the image had already.
    pub present: Vec<String>,
    /// Whether the image file was created.
    pub created: bool,
}

/// Pulls snapshot `snapshot` (every snapshot listed, when `None`) from `store` into
/// the image at `path` (created by the first full stream when missing): each stream
/// of its chain that the image lacks, oldest first, received as `qcowx receive`
/// does (verified, atomic, resumable).
pub fn pull(store: &Store, path: &Path, snapshot: Option<&str>) -> Result<PullReport> {
    let manifest = store.manifest()?;
    let wanted: Vec<&ManifestEntry> = match snapshot {
        Some(name) => {
            let e = store.find(&manifest, name)?;
            manifest
                .chain(e.uid)
                .ok_or_else(|| RemoteError::NoSnapshot {
                    url: store.url().to_string(),
                    name: format!("{name} (a base of its chain)"),
                    listed: listed(&manifest),
                })?
        }
        None => manifest.entries.iter().collect(),
    };
    let mut report = PullReport {
        received: Vec::new(),
        present: Vec::new(),
        created: false,
    };
    for e in wanted {
        if path.exists() {
            let img = crate::engine::OpenOptions::new().open(path)?;
            let have = img.snapshot_by_uid(e.uid)?.is_some();
            img.close()?;
            if have {
                report.present.push(e.name.clone());
                continue;
            }
        }
        let key = store.stream_key(e.uid);
        let mut body = store.client().get_reader(&key)?;
        // The object must hold the snapshot the manifest says, before any of it is
        // received.
        let mut head = [0u8; STREAM_HEADER_BYTES];
        let stream_head = body
            .read_exact(&mut head)
            .ok()
            .and_then(|_| StreamHeader::decode(&head).ok());
        if stream_head.is_none_or(|h| h.to_uid != e.uid || h.from_uid != e.from_uid) {
            return Err(RemoteError::Size {
                bucket: store.client().bucket().to_string(),
                key,
                why: format!(
                    "does not start with the header of a stream of snapshot {:016x} from {:016x}",
                    e.uid, e.from_uid
                ),
            }
            .into());
        }
        let mut whole = std::io::Cursor::new(head).chain(body);
        let got = crate::stream::receive(path, &mut whole, &ReceiveOptions::default())?;
        report.created |= got.created;
        report.received.push(got.snapshot.name);
    }
    Ok(report)
}

/// Creates the image at `path` whose base is snapshot `snapshot` of `store` (its
/// size and cluster size), read on demand through a local cache of at most
/// `cache_bytes`; `endpoint` is recorded as the store's default endpoint. An
/// existing file is refused. Returns the image, open for writing with its base.
pub fn create_on_remote(
    path: &Path,
    store: &Store,
    snapshot: &str,
    endpoint: &str,
    cache_bytes: u64,
) -> Result<Image> {
    let manifest = store.manifest()?;
    let e = store.find(&manifest, snapshot)?;
    if endpoint.len() > crate::format::remote::MAX_REMOTE_NAME
        || store.url().len() > crate::format::remote::MAX_REMOTE_NAME
    {
        return Err(Error::InvalidArgument(format!(
            "the endpoint and the store URL are at most {} bytes each",
            crate::format::remote::MAX_REMOTE_NAME
        )));
    }
    // Never over an existing file: it may be an image with data of its own.
    let mut opts =
        crate::engine::CreateOptions::new(e.virtual_size).if_exists(crate::engine::IfExists::Fail);
    opts.cluster_size = u64::from(e.cluster_size);
    opts.remote_base = Some(crate::format::remote::RemoteBase {
        url: store.url().to_string(),
        endpoint: endpoint.to_string(),
        uid: e.uid,
        cache_bytes,
    });
    Image::create(path, &opts)
}
