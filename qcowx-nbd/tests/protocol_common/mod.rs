//! The in-process server of the wire-level conformance tests (`protocol_negotiation.rs`,
//! `protocol_transmission.rs`): an in-process server on a temporary Unix socket and
//! a client that writes the protocol's bytes by hand.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use qcowx_core::storage::MemStorage;
use qcowx_core::{CreateOptions, Image};
use qcowx_nbd::config::Settings;
use qcowx_nbd::exports::{ExportPlan, Exports};
use qcowx_nbd::server::ServerConfig;
use qcowx_nbd::wire::*;
use qcowx_tests::nbd_wire::*;

pub const SIZE: u64 = 4 << 20;

pub type Client = WireClient;

/// A server in process; dropping it shuts the server down before its directory goes.
pub struct TestServer {
    pub server: InProcessServer,
    pub _dir: tempfile::TempDir,
    pub path: PathBuf,
    pub image: Arc<Image>,
}

impl TestServer {
    pub fn start(settings: Settings, max_clients: usize) -> TestServer {
        TestServer::start_sized(SIZE, settings, max_clients)
    }

    /// A server of a `size`-byte disk: [64K, 128K) holds 0x5a, the rest is unallocated.
    pub fn start_sized(size: u64, settings: Settings, max_clients: usize) -> TestServer {
        TestServer::start_clustered(size, 65536, settings, max_clients)
    }

    /// A disk of `size` bytes in `cluster_size` clusters.
    pub fn start_clustered(
        size: u64,
        cluster_size: u64,
        settings: Settings,
        max_clients: usize,
    ) -> TestServer {
        let mut opts = CreateOptions::new(size);
        opts.cluster_size = cluster_size;
        let img = Image::create_in(Arc::new(MemStorage::new()), &opts).expect("create image");
        TestServer::serve(
            img,
            tempfile::tempdir().expect("tempdir"),
            settings,
            max_clients,
        )
    }

    /// The same disk in an image file (`disk.qcow2` in the server's directory), whose
    /// page-cached data large reads send straight from the file's mapping.
    pub fn start_on_file(settings: Settings, max_clients: usize) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = Image::create(dir.path().join("disk.qcow2"), &CreateOptions::new(SIZE))
            .expect("create image");
        TestServer::serve(img, dir, settings, max_clients)
    }

    pub fn serve(
        img: Image,
        dir: tempfile::TempDir,
        settings: Settings,
        max_clients: usize,
    ) -> TestServer {
        img.write_at(&[0x5a; 65536], 65536).expect("write");
        let image = Arc::new(img);
        image.snapshot("default", "snap").expect("snapshot");
        let exports = Exports::new(
            Arc::clone(&image),
            ExportPlan::Auto {
                main_name: "default".into(),
                main_description: Some("test disk".into()),
            },
            false,
        )
        .expect("exports");
        let path = dir.path().join("nbd.sock");
        let server = InProcessServer::bind(
            Arc::new(exports),
            ServerConfig {
                max_clients,
                ..unix_config(path.clone(), settings)
            },
        );
        TestServer {
            server,
            _dir: dir,
            path,
            image,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.path, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    }

    /// A client in transmission on the default export, with structured replies and
    /// the `base:allocation` context.
    pub fn allocation_client(&self) -> Client {
        let mut c = self.client();
        assert_eq!(c.final_kind(OPT_STRUCTURED_REPLY, &[]), REP_ACK);
        assert_eq!(
            c.final_kind(OPT_SET_META_CONTEXT, &meta_data("", &["base:allocation"])),
            REP_ACK
        );
        c.go("");
        c
    }

    pub fn stop(self) {
        self.server.stop();
        assert!(!self.path.exists(), "socket file left behind");
    }
}
