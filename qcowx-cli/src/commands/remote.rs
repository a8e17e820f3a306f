//! `push` and `pull`: argument handling and printing around `qcowx_core::remote`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use qcowx_core::remote::{self, Store, StoreConfig};
use qcowx_core::OpenOptions;

use super::{lock_mode, Failure};
use crate::size_arg;

/// Where the store is: the option, else the environment.
#[derive(Debug, Args)]
pub(crate) struct EndpointArg {
    /// The store's endpoint, `http://HOST:PORT` or `https://HOST` (default: the
    /// environment variable QCOWX_S3_ENDPOINT). Keys come from AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY, the region from AWS_REGION (default us-east-1).
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
}

impl EndpointArg {
    fn store(&self, url: &str) -> Result<(Store, String), Failure> {
        let cfg =
            StoreConfig::from_env(self.endpoint.as_deref()).map_err(qcowx_core::Error::from)?;
        let cfg = match &self.endpoint {
            // The option wins over the environment.
            Some(e) => StoreConfig {
                endpoint: e.clone(),
                ..cfg
            },
            None => cfg,
        };
        let store = Store::open(url, &cfg).map_err(qcowx_core::Error::from)?;
        Ok((store, cfg.endpoint))
    }
}

#[derive(Debug, Args)]
pub(crate) struct PushArgs {
    /// Push only what changed since this snapshot (pushed before).
    #[arg(long, value_name = "SNAPSHOT")]
    from: Option<String>,
    #[command(flatten)]
    endpoint: EndpointArg,
    /// Read the image without locking it (a served image's snapshots).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The snapshot to push.
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,
    /// The store: s3://BUCKET/PREFIX.
    #[arg(value_name = "URL")]
    url: String,
}

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// Do not download: make FILE a new image whose base is SNAPSHOT in the store,
    /// read on demand and cached beside FILE (in FILE.qcowx-cache).
    #[arg(long, requires = "snapshot")]
    lazy: bool,
    /// With --lazy: the most bytes the cache keeps (K, M, G suffixes).
    #[arg(long = "cache-size", value_name = "SIZE", value_parser = size_arg, default_value = "1G", requires = "lazy")]
    cache_size: u64,
    #[command(flatten)]
    endpoint: EndpointArg,
    /// The store: s3://BUCKET/PREFIX.
    #[arg(value_name = "URL")]
    url: String,
    /// The image file (created when missing; with --lazy it must not exist).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The snapshot to pull, with the snapshots its stream builds on (default: every
    /// snapshot in the store).
    #[arg(value_name = "SNAPSHOT")]
    snapshot: Option<String>,
}

pub(crate) fn push(a: &PushArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let (store, _) = a.endpoint.store(&a.url)?;
    let img = Arc::new(
        OpenOptions::new()
            .lock(lock_mode(a.force_share))
            .open(&a.file)?,
    );
    let r = remote::push(&img, &a.snapshot, a.from.as_deref(), &store)?;
    img.close()?;
    if !quiet {
        if r.already {
            writeln!(out, "'{}' is in {} already.", a.snapshot, store.url())?;
        } else {
            writeln!(
                out,
                "Pushed '{}' to {} ({} stream, {} records, {} bytes).",
                r.entry.name,
                store.url(),
                if r.entry.from_uid == 0 {
                    "full"
                } else {
                    "incremental"
                },
                r.records,
                r.entry.stream_len
            )?;
        }
    }
    Ok(0)
}

pub(crate) fn pull(a: &PullArgs, quiet: bool, out: &mut dyn Write) -> Result<u8, Failure> {
    let (store, endpoint) = a.endpoint.store(&a.url)?;
    if a.lazy {
        let snapshot = a.snapshot.as_deref().unwrap_or_default();
        let img = remote::create_on_remote(&a.file, &store, snapshot, &endpoint, a.cache_size)?;
        let size = img.size();
        img.close()?;
        if !quiet {
            writeln!(
                out,
                "Created {} ({size} bytes) on '{snapshot}' in {}, read on demand.",
                a.file.display(),
                store.url()
            )?;
        }
        return Ok(0);
    }
    let r = remote::pull(&store, &a.file, a.snapshot.as_deref())?;
    if !quiet {
        for name in &r.received {
            writeln!(out, "Received snapshot '{name}'.")?;
        }
        if !r.present.is_empty() {
            writeln!(out, "Already there: {}.", r.present.join(", "))?;
        }
    }
    Ok(0)
}
