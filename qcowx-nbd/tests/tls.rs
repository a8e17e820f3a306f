//! STARTTLS at the wire level: an in-process server with TLS settings and a client
//! that writes the protocol's bytes by hand and runs the TLS handshake with rustls,
//! so every reply type can be checked exactly (`NBD_REP_ERR_TLS_REQD`, the state
//! reset after `STARTTLS`, a second `STARTTLS`, `EXPORT_NAME` before TLS), plus the
//! client certificate checks. Real clients over TLS (libnbd, QEMU) are in the
//! workspace's `tests/nbd_tls.rs`.
//!
//! The certificates are made for each test with the `openssl` command (Debian package
//! `openssl`); a missing `openssl` fails the test.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qcowx_core::storage::MemStorage;
use qcowx_core::{CreateOptions, Image};
use qcowx_nbd::config::Settings;
use qcowx_nbd::exports::{ExportPlan, Exports};
use qcowx_nbd::tls::{Tls, TlsFiles, TlsMode};
use qcowx_nbd::wire::*;
use qcowx_tests::make_pki;
use qcowx_tests::nbd_wire::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const SIZE: u64 = 4 << 20;

// ---- the server -----------------------------------------------------------------------------

/// A server in process; dropping it shuts the server down before its directory goes.
struct TestServer {
    server: InProcessServer,
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl TestServer {
    /// A server with TLS in `mode`; `allowed_cns` as `--tls-allow-cn`.
    fn start(mode: TlsMode, allowed_cns: &[&str]) -> TestServer {
        TestServer::start_with(mode, allowed_cns, Settings::default())
    }

    fn start_with(mode: TlsMode, allowed_cns: &[&str], settings: Settings) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        make_pki(dir.path());
        let mut files = TlsFiles::in_dir(&dir.path().join("server"));
        assert!(files.ca.is_some(), "ca-cert.pem found in the directory");
        files.allowed_cns = allowed_cns.iter().map(|s| s.to_string()).collect();
        let config = files.server_config().expect("TLS configuration");
        let img = Image::create_in(Arc::new(MemStorage::new()), &CreateOptions::new(SIZE))
            .expect("create image");
        img.write_at(&[0x5a; 65536], 65536).expect("write");
        let exports = Exports::new(
            Arc::new(img),
            ExportPlan::Auto {
                main_name: "default".into(),
                main_description: None,
            },
            false,
        )
        .expect("exports");
        let path = dir.path().join("nbd.sock");
        let settings = Settings {
            tls: Some(Tls { mode, config }),
            ..settings
        };
        let server = InProcessServer::bind(Arc::new(exports), unix_config(path.clone(), settings));
        TestServer { server, dir, path }
    }

    fn client(&self) -> Wire<UnixStream> {
        Wire::connect(&self.path, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    }

    /// The client configuration of `who` (a directory made by [`make_pki`], or None
    /// for a client without a certificate).
    fn client_config(&self, who: Option<&str>) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        let ca = CertificateDer::from_pem_file(self.dir.path().join("ca.pem")).unwrap();
        roots.add(ca).unwrap();
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        let cfg = match who {
            Some(w) => {
                let d = self.dir.path().join(w);
                let certs = CertificateDer::pem_file_iter(d.join("client-cert.pem"))
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_file(d.join("client-key.pem")).unwrap();
                builder.with_client_auth_cert(certs, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        Arc::new(cfg)
    }

    fn stop(self) {
        self.server.stop();
    }
}

// ---- the client -------------------------------------------------------------------------------

/// The protocol over a plain or TLS stream.
type Wire<S> = WireClient<S>;

type TlsWire = Wire<StreamOwned<ClientConnection, UnixStream>>;

/// STARTTLS for the hand-written client.
trait StartTls {
    /// `STARTTLS` (which must be acknowledged), then the TLS handshake. `Err` when
    /// the handshake fails on the client's side.
    fn starttls(self, cfg: Arc<ClientConfig>) -> Result<TlsWire, std::io::Error>;
}

impl StartTls for Wire<UnixStream> {
    fn starttls(mut self, cfg: Arc<ClientConfig>) -> Result<TlsWire, std::io::Error> {
        assert_eq!(self.final_kind(OPT_STARTTLS, &[]), REP_ACK);
        let conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap())
            .expect("client session");
        let mut s = StreamOwned::new(conn, self.s);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(WireClient { s })
    }
}

/// Whether a TLS client was refused: the handshake failed, or (TLS 1.3, where the
/// server checks the client's certificate after the client considers the handshake
/// done) the first option gets no reply.
fn refused(r: Result<TlsWire, std::io::Error>) -> bool {
    match r {
        Err(_) => true,
        Ok(mut w) => w.try_send_opt(OPT_LIST, &[]).is_err() || w.try_opt_reply().is_err(),
    }
}

// ---- tests ------------------------------------------------------------------------------------

#[test]
fn required_tls_refuses_every_option_before_starttls() {
    let srv = TestServer::start(TlsMode::Require, &[]);
    let mut c = srv.client();
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_INFO, info_data("default", &[])),
        (OPT_GO, info_data("", &[])),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (OPT_LIST_META_CONTEXT, meta_data("", &["base:"])),
        (99, b"whatever".to_vec()),
    ] {
        let r = c.opt(opt, &data);
        assert_eq!(r.len(), 1, "option {opt}: one reply");
        assert_eq!(r[0].kind, REP_ERR_TLS_REQD, "option {opt}");
        assert!(String::from_utf8_lossy(&r[0].data).contains("requires TLS"));
    }
    // STARTTLS with data is malformed; negotiation goes on.
    assert_eq!(c.final_kind(OPT_STARTTLS, b"x"), REP_ERR_INVALID);
    let mut t = c.starttls(srv.client_config(Some("alice"))).expect("TLS");
    assert_eq!(
        t.final_kind(OPT_STARTTLS, &[]),
        REP_ERR_INVALID,
        "second STARTTLS"
    );
    assert_eq!(t.export_names(), vec!["default"]);
    let go = t.opt(OPT_GO, &info_data("", &[]));
    assert_eq!(go.last().unwrap().kind, REP_ACK);
    let export = go
        .iter()
        .find(|r| r.kind == REP_INFO && be_u16(&r.data) == INFO_EXPORT)
        .expect("INFO_EXPORT");
    assert_eq!(
        u64::from_be_bytes(export.data[2..10].try_into().unwrap()),
        SIZE
    );
    // Pipelined writes larger than the TLS layer's buffers, then reads.
    let mut want = vec![0u8; SIZE as usize];
    for i in 0..4u64 {
        let data: Vec<u8> = (0..1u32 << 20).map(|x| (x as u64 * 7 + i) as u8).collect();
        want[(i << 20) as usize..((i + 1) << 20) as usize].copy_from_slice(&data);
        t.request(0, CMD_WRITE, 10 + i, i << 20, 1 << 20, &data);
    }
    let mut cookies: Vec<u64> = (0..4)
        .map(|_| t.simple())
        .map(|(e, c)| {
            assert_eq!(e, 0);
            c
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, vec![10, 11, 12, 13]);
    t.request(0, CMD_READ, 20, 0, SIZE as u32, &[]);
    assert_eq!(t.simple(), (0, 20));
    let mut got = vec![0u8; SIZE as usize];
    t.s.read_exact(&mut got).expect("read data");
    assert!(got == want, "data read back over TLS differs");
    t.request(0, CMD_FLUSH, 21, 0, 0, &[]);
    assert_eq!(t.simple(), (0, 21));
    t.request(0, CMD_DISC, 22, 0, 0, &[]);
    assert!(t.is_closed());

    // EXPORT_NAME cannot be refused: the connection closes.
    let mut e = srv.client();
    e.try_send_opt(OPT_EXPORT_NAME, b"default").unwrap();
    assert!(e.is_closed());
    // ABORT is answered.
    let mut a = srv.client();
    assert_eq!(a.final_kind(OPT_ABORT, &[]), REP_ACK);
    srv.stop();
}

#[test]
fn allowed_tls_serves_clear_clients_and_starttls_resets_the_negotiation() {
    let srv = TestServer::start(TlsMode::Allow, &[]);
    // In clear: everything works.
    let mut plain = srv.client();
    assert_eq!(plain.export_names(), vec!["default"]);
    plain.opt(OPT_GO, &info_data("", &[]));
    plain.request(0, CMD_READ, 1, 65536, 4, &[]);
    assert_eq!(plain.simple(), (0, 1));
    let mut b = [0u8; 4];
    plain.s.read_exact(&mut b).unwrap();
    assert_eq!(b, [0x5a; 4]);

    // State negotiated in clear is forgotten after STARTTLS.
    let mut c = srv.client();
    assert_eq!(c.final_kind(OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    let set = c.opt(OPT_SET_META_CONTEXT, &meta_data("", &["base:allocation"]));
    assert_eq!(set.len(), 2, "one context and the ACK: {:?}", set.len());
    let mut t = c.starttls(srv.client_config(Some("alice"))).expect("TLS");
    assert_eq!(
        t.final_kind(OPT_SET_META_CONTEXT, &meta_data("", &["base:allocation"])),
        REP_ERR_INVALID,
        "structured replies must be negotiated again after STARTTLS"
    );
    assert_eq!(
        t.final_kind(OPT_STRUCTURED_REPLY, &[]),
        REP_ACK,
        "structured replies were not left negotiated"
    );
    t.opt(OPT_GO, &info_data("default", &[]));
    // Structured replies are on now: a read is answered with chunks.
    t.request(0, CMD_READ, 5, 65536, 8, &[]);
    let mut h = [0u8; 20];
    t.s.read_exact(&mut h).unwrap();
    assert_eq!(be_u32(&h), STRUCTURED_REPLY_MAGIC);
    assert_eq!(be_u16(&h[6..]), REPLY_TYPE_OFFSET_DATA);
    let mut p = vec![0u8; be_u32(&h[16..]) as usize];
    t.s.read_exact(&mut p).unwrap();
    assert_eq!(&p[8..], &[0x5a; 8]);
    t.request(0, CMD_DISC, 6, 0, 0, &[]);
    assert!(t.is_closed());
    srv.stop();
}

#[test]
fn client_certificates_must_come_from_the_ca_and_the_allow_list() {
    let srv = TestServer::start(TlsMode::Require, &["alice"]);
    // alice: signed by the CA and listed.
    let mut ok = srv
        .client()
        .starttls(srv.client_config(Some("alice")))
        .expect("alice's handshake");
    assert_eq!(ok.export_names(), vec!["default"]);
    // eve: signed by the CA, not listed.
    assert!(refused(
        srv.client().starttls(srv.client_config(Some("eve")))
    ));
    // No certificate at all.
    assert!(refused(srv.client().starttls(srv.client_config(None))));
    // CN alice, but not signed by the CA.
    assert!(refused(
        srv.client().starttls(srv.client_config(Some("mallory")))
    ));
    // The refusals did not disturb the connected client.
    ok.opt(OPT_GO, &info_data("", &[]));
    ok.request(0, CMD_FLUSH, 1, 0, 0, &[]);
    assert_eq!(ok.simple(), (0, 1));
    srv.stop();
}

#[test]
fn bad_tls_files_are_refused_with_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let server = dir.path().join("server");
    // The key of another certificate.
    let files = TlsFiles {
        key: dir.path().join("alice/client-key.pem"),
        ..TlsFiles::in_dir(&server)
    };
    assert!(files.server_config().is_err());
    // A certificate file that is not PEM.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, b"not a certificate\n").unwrap();
    let files = TlsFiles {
        cert: junk.clone(),
        ..TlsFiles::in_dir(&server)
    };
    let e = files.server_config().expect_err("junk certificate");
    assert!(e.to_string().contains("junk.pem"), "{e}");
    // An allow-list with peer verification off.
    let files = TlsFiles {
        verify_peer: false,
        allowed_cns: vec!["alice".into()],
        ..TlsFiles::in_dir(&server)
    };
    assert!(files.server_config().is_err());
    // The good files load.
    TlsFiles::in_dir(&server)
        .server_config()
        .expect("good files");
}

#[test]
fn a_silent_client_after_starttls_hits_the_handshake_timeout() {
    let srv = TestServer::start_with(
        TlsMode::Require,
        &[],
        Settings {
            handshake_timeout: Duration::from_millis(500),
            ..Settings::default()
        },
    );
    let mut c = srv.client();
    assert_eq!(c.final_kind(OPT_STARTTLS, &[]), REP_ACK);
    // No ClientHello: the server gives up at the deadline.
    let start = std::time::Instant::now();
    assert!(c.is_closed());
    assert!(start.elapsed() < Duration::from_secs(10));
    srv.stop();
}

#[test]
fn shutdown_drains_tls_clients_in_transmission() {
    let srv = TestServer::start(TlsMode::Require, &[]);
    let mut t = srv
        .client()
        .starttls(srv.client_config(Some("alice")))
        .expect("TLS");
    t.opt(OPT_GO, &info_data("", &[]));
    t.request(0, CMD_WRITE, 1, 8192, 4, b"live");
    assert_eq!(t.simple(), (0, 1));
    t.request(0, CMD_READ, 2, 8192, 4, &[]);
    assert_eq!(t.simple(), (0, 2));
    let mut b = [0u8; 4];
    t.s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"live");
    // Stopping does not wait for the client to leave: its TLS session is closed.
    let start = std::time::Instant::now();
    srv.stop();
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(t.is_closed());
}
