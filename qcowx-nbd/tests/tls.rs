//! STARTTLS at the wire level: an in-process server with TLS settings and a client
//! that writes the protocol's bytes by hand and runs the TLS handshake with rustls,
//! so every reply type can be checked exactly (`NBD_REP_ERR_TLS_REQD`, the state
//! reset after `STARTTLS`, a second `STARTTLS`, `EXPORT_NAME` before TLS), plus the
//! client certificate checks. Real clients over TLS (libnbd, QEMU) are in the
//! workspace's `tests/nbd.rs`.
//!
//! The certificates are made for each test with the `openssl` command (Debian package
//! `openssl`); a missing `openssl` fails the test.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use qcowx_core::storage::MemStorage;
use qcowx_core::{CreateOptions, Image};
use qcowx_nbd::config::Settings;
use qcowx_nbd::exports::{ExportPlan, Exports};
use qcowx_nbd::server::{ListenAddr, Server, ServerConfig, ShutdownHandle};
use qcowx_nbd::tls::{Tls, TlsFiles, TlsMode};
use qcowx_nbd::wire::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

const SIZE: u64 = 4 << 20;

// ---- certificates ---------------------------------------------------------------------------

/// Makes, in `dir`: a CA (`ca.pem`), `server/` in QEMU's layout (ca-cert.pem,
/// server-cert.pem, server-key.pem; CN and SAN localhost), client directories
/// `alice/` and `eve/` (client-cert.pem, client-key.pem signed by the CA, CN alice /
/// eve), and `mallory/`, a self-signed certificate with CN alice (not from the CA).
fn make_pki(dir: &Path) {
    let script = r#"
set -e
ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
mkdir -p server alice eve mallory
ec ca.key
openssl req -x509 -new -key ca.key -days 30 -subj "/CN=qcowx test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem
ec server/server-key.pem
openssl req -new -key server/server-key.pem -subj "/CN=localhost" -out s.csr
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n' > s.ext
openssl x509 -req -in s.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -extfile s.ext -out server/server-cert.pem 2>/dev/null
printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=CA:FALSE\n' > c.ext
for who in alice eve; do
  ec $who/client-key.pem
  openssl req -new -key $who/client-key.pem -subj "/O=qcowx/CN=$who" -out c.csr
  openssl x509 -req -in c.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 -extfile c.ext -out $who/client-cert.pem 2>/dev/null
done
ec mallory/client-key.pem
openssl req -x509 -new -key mallory/client-key.pem -days 30 -subj "/CN=alice" -out mallory/client-cert.pem
for d in server alice eve mallory; do cp ca.pem $d/ca-cert.pem; done
"#;
    let ok = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "openssl not found: install openssl (Debian package openssl)"
    );
    let out = Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "making certificates failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- the server -----------------------------------------------------------------------------

struct TestServer {
    dir: tempfile::TempDir,
    path: PathBuf,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<qcowx_nbd::Result<()>>>,
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
        let server = Server::bind(
            Arc::new(exports),
            ServerConfig {
                listen: vec![ListenAddr::Unix(path.clone())],
                socket_activation: false,
                max_clients: 0,
                persistent: true,
                settings,
                control: None,
            },
        )
        .expect("bind");
        let handle = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        TestServer {
            dir,
            path,
            handle,
            thread: Some(thread),
        }
    }

    fn client(&self) -> Wire<UnixStream> {
        let s = UnixStream::connect(&self.path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = Wire { s };
        let mut g = [0u8; 18];
        w.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        w.s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        w
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

    fn stop(mut self) {
        self.handle.shutdown();
        let r = self.thread.take().expect("thread").join().expect("join");
        r.expect("server run");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown();
            let _ = t.join();
        }
    }
}

// ---- the client -------------------------------------------------------------------------------

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn info_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// The protocol over a plain or TLS stream.
struct Wire<S: Read + Write> {
    s: S,
}

type TlsWire = Wire<StreamOwned<ClientConnection, UnixStream>>;

impl<S: Read + Write> Wire<S> {
    fn send_opt(&mut self, opt: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)?;
        self.s.flush()
    }

    /// One option reply: (option, type, data).
    fn opt_reply(&mut self) -> std::io::Result<(u32, u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        assert_eq!(&h[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let mut data = vec![0u8; be_u32(&h[16..]) as usize];
        self.s.read_exact(&mut data)?;
        Ok((be_u32(&h[8..]), be_u32(&h[12..]), data))
    }

    /// Sends an option; returns every reply (type, data) up to the final one.
    fn opt(&mut self, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_opt(opt, data).expect("send option");
        let mut out = Vec::new();
        loop {
            let (o, kind, d) = self.opt_reply().expect("option reply");
            assert_eq!(o, opt);
            let last = kind == REP_ACK || kind & (1 << 31) != 0;
            out.push((kind, d));
            if last {
                return out;
            }
        }
    }

    fn final_kind(&mut self, opt: u32, data: &[u8]) -> u32 {
        self.opt(opt, data).last().unwrap().0
    }

    fn export_names(&mut self) -> Vec<String> {
        self.opt(OPT_LIST, &[])
            .into_iter()
            .filter(|(k, _)| *k == REP_SERVER)
            .map(|(_, d)| String::from_utf8(d[4..4 + be_u32(&d) as usize].to_vec()).unwrap())
            .collect()
    }

    fn request(&mut self, cmd: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).expect("send request");
        self.s.flush().unwrap();
    }

    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("simple reply");
        assert_eq!(be_u32(&h), SIMPLE_REPLY_MAGIC);
        (
            be_u32(&h[4..]),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

impl Wire<UnixStream> {
    /// `STARTTLS` (which must be acknowledged), then the TLS handshake. `Err` when
    /// the handshake fails on the client's side.
    fn starttls(mut self, cfg: Arc<ClientConfig>) -> Result<TlsWire, std::io::Error> {
        assert_eq!(self.final_kind(OPT_STARTTLS, &[]), REP_ACK);
        let conn = ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap())
            .expect("client session");
        let mut s = StreamOwned::new(conn, self.s);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Wire { s })
    }
}

/// Whether a TLS client was refused: the handshake failed, or (TLS 1.3, where the
/// server checks the client's certificate after the client considers the handshake
/// done) the first option gets no reply.
fn refused(r: Result<TlsWire, std::io::Error>) -> bool {
    match r {
        Err(_) => true,
        Ok(mut w) => w.send_opt(OPT_LIST, &[]).is_err() || w.opt_reply().is_err(),
    }
}

// ---- tests ------------------------------------------------------------------------------------

#[test]
fn required_tls_refuses_every_option_before_starttls() {
    let srv = TestServer::start(TlsMode::Require, &[]);
    let mut c = srv.client();
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_INFO, info_data("default")),
        (OPT_GO, info_data("")),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (OPT_LIST_META_CONTEXT, meta_data("", &["base:"])),
        (99, b"whatever".to_vec()),
    ] {
        let r = c.opt(opt, &data);
        assert_eq!(r.len(), 1, "option {opt}: one reply");
        assert_eq!(r[0].0, REP_ERR_TLS_REQD, "option {opt}");
        assert!(String::from_utf8_lossy(&r[0].1).contains("requires TLS"));
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
    let go = t.opt(OPT_GO, &info_data(""));
    assert_eq!(go.last().unwrap().0, REP_ACK);
    let export = go
        .iter()
        .find(|(k, d)| *k == REP_INFO && be_u16(d) == INFO_EXPORT)
        .expect("INFO_EXPORT");
    assert_eq!(
        u64::from_be_bytes(export.1[2..10].try_into().unwrap()),
        SIZE
    );
    // Pipelined writes larger than the TLS layer's buffers, then reads.
    let mut want = vec![0u8; SIZE as usize];
    for i in 0..4u64 {
        let data: Vec<u8> = (0..1u32 << 20).map(|x| (x as u64 * 7 + i) as u8).collect();
        want[(i << 20) as usize..((i + 1) << 20) as usize].copy_from_slice(&data);
        t.request(CMD_WRITE, 10 + i, i << 20, 1 << 20, &data);
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
    t.request(CMD_READ, 20, 0, SIZE as u32, &[]);
    assert_eq!(t.simple(), (0, 20));
    let mut got = vec![0u8; SIZE as usize];
    t.s.read_exact(&mut got).expect("read data");
    assert!(got == want, "data read back over TLS differs");
    t.request(CMD_FLUSH, 21, 0, 0, &[]);
    assert_eq!(t.simple(), (0, 21));
    t.request(CMD_DISC, 22, 0, 0, &[]);
    assert!(t.is_closed());

    // EXPORT_NAME cannot be refused: the connection closes.
    let mut e = srv.client();
    e.send_opt(OPT_EXPORT_NAME, b"default").unwrap();
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
    plain.opt(OPT_GO, &info_data(""));
    plain.request(CMD_READ, 1, 65536, 4, &[]);
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
    t.opt(OPT_GO, &info_data("default"));
    // Structured replies are on now: a read is answered with chunks.
    t.request(CMD_READ, 5, 65536, 8, &[]);
    let mut h = [0u8; 20];
    t.s.read_exact(&mut h).unwrap();
    assert_eq!(be_u32(&h), STRUCTURED_REPLY_MAGIC);
    assert_eq!(be_u16(&h[6..]), REPLY_TYPE_OFFSET_DATA);
    let mut p = vec![0u8; be_u32(&h[16..]) as usize];
    t.s.read_exact(&mut p).unwrap();
    assert_eq!(&p[8..], &[0x5a; 8]);
    t.request(CMD_DISC, 6, 0, 0, &[]);
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
    ok.opt(OPT_GO, &info_data(""));
    ok.request(CMD_FLUSH, 1, 0, 0, &[]);
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
    t.opt(OPT_GO, &info_data(""));
    t.request(CMD_WRITE, 1, 8192, 4, b"live");
    assert_eq!(t.simple(), (0, 1));
    t.request(CMD_READ, 2, 8192, 4, &[]);
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
