//! STARTTLS: the server's TLS settings (rustls), loading X.509 files, the client
//! certificate allow-list, and the I/O thread of a TLS connection.
//!
//! Files follow QEMU's `tls-creds-x509` layout: a directory with `ca-cert.pem`,
//! `server-cert.pem` and `server-key.pem` ([`TlsFiles::in_dir`]), or each file
//! named on its own. The certificate file may hold a chain (leaf first); the key
//! may be PKCS#8, PKCS#1 (RSA) or SEC1 (EC). With a CA and `verify_peer` (the
//! default, as QEMU's `verify-peer=yes`), every client must present a certificate
//! that CA signed; an allow-list of common names ([`TlsFiles::allowed_cns`])
//! further admits only certificates whose subject CN is listed. Without a CA, any
//! client may connect (the server is authenticated and the connection encrypted).
//!
//! The transmission phase reads requests on one thread and writes replies from
//! several, which a TLS session cannot share. So after the handshake a TLS
//! connection gets an I/O thread ([`pump`]) that owns the session and the socket and
//! exchanges plaintext with the transmission code through a socket pair: the
//! transmission phase is the same code over either.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    ServerConfig, ServerConnection, SignatureScheme,
};

use crate::error::{Error, Result};
use crate::socket::Socket;

pub use crate::config::{Tls, TlsMode};

/// Where the server's X.509 files are and how clients are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate (chain), PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The CA that signs client certificates, PEM (several certificates allowed).
    pub ca: Option<PathBuf>,
    /// Require and verify client certificates when a CA is given.
    pub verify_peer: bool,
    /// Subject common names admitted (empty: any certificate the CA signed).
    pub allowed_cns: Vec<String>,
}

impl TlsFiles {
    /// QEMU's layout in `dir`: `server-cert.pem`, `server-key.pem`, and
    /// `ca-cert.pem` when it exists.
    pub fn in_dir(dir: &Path) -> TlsFiles {
        let ca = dir.join("ca-cert.pem");
        TlsFiles {
            cert: dir.join("server-cert.pem"),
            key: dir.join("server-key.pem"),
            ca: ca.exists().then_some(ca),
            verify_peer: true,
            allowed_cns: Vec::new(),
        }
    }

    /// Loads the files into a rustls server configuration.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = load_certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| {
            Error::Config(format!(
                "{}: no usable private key: {e}",
                self.key.display()
            ))
        })?;
        if !self.allowed_cns.is_empty() && (self.ca.is_none() || !self.verify_peer) {
            return Err(Error::Config(
                "a client certificate allow-list needs a CA to verify client certificates \
                 (ca-cert.pem or --tls-ca) and peer verification on"
                    .into(),
            ));
        }
        let verifier: Arc<dyn ClientCertVerifier> = match &self.ca {
            Some(ca) if self.verify_peer => {
                let mut roots = RootCertStore::empty();
                for c in load_certs(ca)? {
                    roots.add(c).map_err(|e| {
                        Error::Config(format!("{}: unusable CA certificate: {e}", ca.display()))
                    })?;
                }
                let inner = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| Error::Config(format!("{}: {e}", ca.display())))?;
                Arc::new(CnVerifier {
                    inner,
                    allowed: self.allowed_cns.clone(),
                })
            }
            _ => WebPkiClientVerifier::no_client_auth(),
        };
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| {
                Error::Config(format!(
                    "{} / {}: {e}",
                    self.cert.display(),
                    self.key.display()
                ))
            })?;
        Ok(Arc::new(config))
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{}: no certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// A client certificate whose CN is not on the allow-list.
#[derive(Debug)]
struct NotAllowed(Vec<String>);

impl fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            write!(f, "the client certificate has no common name")
        } else {
            write!(
                f,
                "client certificate CN '{}' is not on the allow-list",
                self.0.join("', '")
            )
        }
    }
}

impl std::error::Error for NotAllowed {}

/// The handshake signature checks of [`CnVerifier`], each the inner verifier's own
/// (the TLS 1.2 and 1.3 ones have the same signature).
macro_rules! signature_checks_of_inner {
    ($($check:ident),*) => {$(
        fn $check(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.$check(message, cert, dss)
        }
    )*};
}

/// WebPKI client verification, then the CN allow-list.
#[derive(Debug)]
struct CnVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for CnVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_empty() {
            return Ok(ok);
        }
        let cns = subject_common_names(end_entity).unwrap_or_default();
        if cns.iter().any(|c| self.allowed.contains(c)) {
            Ok(ok)
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(NotAllowed(cns))),
            )))
        }
    }

    signature_checks_of_inner!(verify_tls12_signature, verify_tls13_signature);

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// ---- the subject's common names, from the certificate's DER -------------------------

/// One DER element: (tag, contents, rest).
fn der_element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = b.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // high tag numbers do not occur where we look
    }
    let (&l0, rest) = rest.split_first()?;
    let (len, rest) = if l0 < 0x80 {
        (usize::from(l0), rest)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The expected element with `tag` at the start of `b`: (contents, rest).
fn expect(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, c, r) = der_element(b)?;
    (t == tag).then_some((c, r))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID_CN: [u8; 3] = [0x55, 0x04, 0x03];

/// The subject common names of an X.509 certificate (DER), `None` if it cannot be
/// parsed.
pub fn subject_common_names(cert: &[u8]) -> Option<Vec<String>> {
    let (certificate, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(certificate, SEQUENCE)?;
    let mut rest = tbs;
    // [0] EXPLICIT version, if present.
    if let Some((0xa0, _, r)) = der_element(rest) {
        rest = r;
    }
    let (_, r) = expect(rest, 0x02)?; // serialNumber
    let (_, r) = expect(r, SEQUENCE)?; // signature
    let (_, r) = expect(r, SEQUENCE)?; // issuer
    let (_, r) = expect(r, SEQUENCE)?; // validity
    let (mut subject, _) = expect(r, SEQUENCE)?;
    let mut out = Vec::new();
    while !subject.is_empty() {
        let (mut rdn, r) = expect(subject, SET)?;
        subject = r;
        while !rdn.is_empty() {
            let (atv, r) = expect(rdn, SEQUENCE)?;
            rdn = r;
            let (oid, value) = expect(atv, 0x06)?;
            if oid != OID_CN {
                continue;
            }
            let (tag, v, _) = der_element(value)?;
            let s = match tag {
                // UTF8String, PrintableString, IA5String
                0x0c | 0x13 | 0x16 => String::from_utf8(v.to_vec()).ok()?,
                // TeletexString: taken as Latin-1.
                0x14 => v.iter().map(|&b| char::from(b)).collect(),
                // BMPString: UTF-16BE.
                0x1e => {
                    if v.len() % 2 != 0 {
                        return None;
                    }
                    let units: Vec<u16> = v
                        .chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect();
                    String::from_utf16(&units).ok()?
                }
                _ => return None,
            };
            out.push(s);
        }
    }
    Some(out)
}

// ---- the connection ------------------------------------------------------------------

/// Runs the server side of a TLS handshake on `sock` (blocking, bounded by the
/// socket's timeouts). On failure rustls's alert is sent, if possible.
pub fn accept<S: Read + Write>(
    config: &Arc<ServerConfig>,
    sock: &mut S,
) -> Result<ServerConnection> {
    let mut conn = ServerConnection::new(Arc::clone(config))
        .map_err(|e| Error::Tls(format!("cannot start a TLS session: {e}")))?;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(sock) {
            // A verification failure leaves an alert queued: send it.
            let _ = conn.write_tls(sock);
            return Err(if e.kind() == io::ErrorKind::InvalidData {
                Error::Tls(format!("TLS handshake failed: {}", describe_tls_error(&e)))
            } else {
                Error::io("TLS handshake", e)
            });
        }
    }
    Ok(conn)
}

/// A readable message for a TLS failure (the allow-list's refusal as itself).
fn describe_tls_error(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) => {
            inner.to_string()
        }
        Some(r) => r.to_string(),
        None => e.to_string(),
    }
}

/// The subject CNs of the client certificate a finished handshake verified.
pub fn peer_common_names(conn: &ServerConnection) -> Vec<String> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| subject_common_names(c))
        .unwrap_or_default()
}

/// Decrypted bytes waiting for the plaintext side beyond which the socket is not
/// read (back-pressure on the client).
const PLAINTEXT_BACKLOG: usize = 1 << 20;

/// The I/O thread of a TLS connection: moves bytes between the encrypted socket
/// `sock` (through `conn`) and the plaintext socket `inner`, whose other end the
/// transmission phase uses, until both directions are done. Plaintext the session
/// already holds (requests pipelined behind the last option) is delivered first.
///
/// When the client stops sending (close_notify, EOF, or the server shutting the
/// socket's reading side down), `inner` is shut for writing, so the transmission
/// phase sees EOF and finishes its requests; once it closes `inner`, close_notify
/// is sent and `sock` is shut down.
pub fn pump(mut conn: ServerConnection, mut sock: Socket, mut inner: UnixStream) -> io::Result<()> {
    sock.set_nonblocking(true)?;
    inner.set_nonblocking(true)?;
    conn.set_buffer_limit(Some(PLAINTEXT_BACKLOG));
    let mut to_inner: Vec<u8> = Vec::new();
    let mut to_inner_at = 0usize;
    let mut from_inner = vec![0u8; 64 << 10];
    let (mut from_at, mut from_len) = (0usize, 0usize);
    let mut tmp = vec![0u8; 64 << 10];
    let mut client_done = false;
    let mut inner_write_shut = false;
    let mut inner_done = false;
    let mut close_sent = false;
    loop {
        // Decrypted plaintext → the buffer for the plaintext side.
        let mut session_empty = false;
        if to_inner.len() - to_inner_at < PLAINTEXT_BACKLOG {
            loop {
                match conn.reader().read(&mut tmp) {
                    Ok(0) => {
                        client_done = true;
                        session_empty = true;
                        break;
                    }
                    Ok(n) => to_inner.extend_from_slice(&tmp[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        session_empty = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        client_done = true;
                        session_empty = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
                if to_inner.len() - to_inner_at >= PLAINTEXT_BACKLOG {
                    break;
                }
            }
        }
        // … → the plaintext side.
        while to_inner_at < to_inner.len() {
            match inner.write(&to_inner[to_inner_at..]) {
                Ok(n) => to_inner_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The transmission phase is gone: drop what the client still sends.
                Err(_) => {
                    to_inner_at = to_inner.len();
                    inner_done = true;
                }
            }
        }
        if to_inner_at == to_inner.len() {
            to_inner.clear();
            to_inner_at = 0;
            if client_done && session_empty && !inner_write_shut {
                let _ = inner.shutdown(std::net::Shutdown::Write);
                inner_write_shut = true;
            }
        }
        // Replies from the plaintext side → the session.
        loop {
            if from_at == from_len && !inner_done {
                match inner.read(&mut from_inner) {
                    Ok(0) => inner_done = true,
                    Ok(n) => {
                        from_at = 0;
                        from_len = n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => inner_done = true,
                }
            }
            if from_at == from_len {
                break;
            }
            let n = conn.writer().write(&from_inner[from_at..from_len])?;
            if n == 0 {
                break;
            }
            from_at += n;
        }
        if inner_done && from_at == from_len && !close_sent {
            conn.send_close_notify();
            close_sent = true;
        }
        // The session → the client.
        while conn.wants_write() {
            match conn.write_tls(&mut sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if close_sent && !conn.wants_write() {
            let _ = sock.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        // Replies the session refused while its buffer was full, and the buffer has
        // since gone to the client in full: the session takes more now. No event
        // would come for them (the plaintext side is not read while they wait, and
        // the client socket is not watched for room with nothing to send), so go
        // round again instead of waiting.
        if from_at < from_len && !conn.wants_write() {
            continue;
        }

        let mut fds = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: 0,
                revents: 0,
            },
            libc::pollfd {
                fd: inner.as_raw_fd(),
                events: 0,
                revents: 0,
            },
        ];
        let read_sock = !client_done && to_inner.len() - to_inner_at < PLAINTEXT_BACKLOG;
        if read_sock {
            fds[0].events |= libc::POLLIN;
        }
        if conn.wants_write() {
            fds[0].events |= libc::POLLOUT;
        }
        if !inner_done && from_at == from_len {
            fds[1].events |= libc::POLLIN;
        }
        if to_inner_at < to_inner.len() {
            fds[1].events |= libc::POLLOUT;
        }
        // SAFETY: `fds` is a valid array of two pollfd.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if read_sock && fds[0].revents != 0 {
            match conn.read_tls(&mut sock) {
                Ok(0) => client_done = true,
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        // Send the alert, then give up.
                        let _ = conn.write_tls(&mut sock);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => client_done = true,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v1 certificate (no version field) for CN=alice (with O and OU around it),
    /// issued by CN=qcowx test CA; made with `openssl x509 -req`.
    const V1_LEAF: &str = "-----BEGIN CERTIFICATE-----
MIIBRjCB7QIUSa4cJg0O46QvLaukhzHatWgO70MwCgYIKoZIzj0EAwIwGDEWMBQG
A1UEAwwNcWNvd3ggdGVzdCBDQTAeFw0yNjExMjIwMzMwMjNaFw0zNjExMTkwMzMw
MjNaMDQxFDASBgNVBAoMC3Fjb3d4IHRlc3RzMQ4wDAYDVQQDDAVhbGljZTEMMAoG
A1UECwwDb3BzMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEdHLIEo8tG7ZTK1LQ
u3kLWvPdnUasFoWgZcPh9jr8uea9rqEclD9URha9w4v/naZEf+23u1xkI1n7rAr6
OVQmEzAKBggqhkjOPQQDAgNIADBFAiEA5/2sg/yiyDf+g7+crzqfDKd7a2xqRia9
Hd5ci8efRcoCIEQ8J4LS+hFmpmWV9/fOcH8AcQrsCgp9kuiRr92oqPtR
-----END CERTIFICATE-----
";

    /// A self-signed v3 certificate, subject and issuer O=qcowx tests, CN=alice,
    /// OU=ops.
    const V3_SELF: &str = "-----BEGIN CERTIFICATE-----
MIIBvTCCAWOgAwIBAgIUQziCIaRPHCs46a9BnwmNbK/c8QEwCgYIKoZIzj0EAwIwNDEUMBIGA1UECgwL
cWNvd3ggdGVzdHMxDjAMBgNVBAMMBWFsaWNlMQwwCgYDVQQLDANvcHMwHhcNMjYxMTIyMDMzMDE5WhcN
MzYxMTE5MDMzMDE5WjA0MRQwEgYDVQQKDAtxY293eCB0ZXN0czEOMAwGA1UEAwwFYWxpY2UxDDAKBgNV
BAsMA29wczBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABMUjhA13jiwgxO+KQnWL6/EB+8OI6tl4y+yd
s0XYB+xf6iiHQ+jGWXQjC/REQkfmWKSlrizEAVwZuMB1bmpE1a2jUzBRMB0GA1UdDgQWBBQ4ih4StdCs
5G7bXKyBR4RudTmrkDAfBgNVHSMEGDAWgBQ4ih4StdCs5G7bXKyBR4RudTmrkDAPBgNVHRMBAf8EBTAD
AQH/MAoGCCqGSM49BAMCA0gAMEUCIQChv4EyEmicXaMuLzMuPQuSxrlyIUiEDH/8inFnVLGD3gIgcs1r
b4zWukT4F9agrZ6YGezI7EJDVpGJboOjgEQk1PQ=
-----END CERTIFICATE-----
";

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("PEM")
            .as_ref()
            .to_vec()
    }

    #[test]
    fn common_names_come_from_the_subject() {
        assert_eq!(
            subject_common_names(&der(V1_LEAF)),
            Some(vec!["alice".into()])
        );
        assert_eq!(
            subject_common_names(&der(V3_SELF)),
            Some(vec!["alice".into()])
        );
    }

    #[test]
    fn damaged_certificates_give_none_not_a_panic() {
        let d = der(V3_SELF);
        for cut in [0, 1, 2, 10, 50, 100, d.len() - 1] {
            let _ = subject_common_names(&d[..cut]);
        }
        assert_eq!(subject_common_names(&[]), None);
        assert_eq!(
            subject_common_names(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        let mut bad = d.clone();
        bad[0] = 0x31;
        assert_eq!(subject_common_names(&bad), None);
        // Every single-byte corruption parses or fails; none panics.
        for i in 0..d.len() {
            let mut c = d.clone();
            c[i] ^= 0xff;
            let _ = subject_common_names(&c);
        }
    }

    #[test]
    fn der_lengths() {
        assert_eq!(
            der_element(&[0x04, 0x01, 0xaa, 0xbb]),
            Some((4, &[0xaa][..], &[0xbb][..]))
        );
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend(std::iter::repeat_n(7u8, 0x80));
        let (t, c, r) = der_element(&long).unwrap();
        assert_eq!((t, c.len(), r.len()), (4, 0x80, 0));
        assert_eq!(der_element(&[0x04, 0x80]), None);
        assert_eq!(der_element(&[0x04, 0x05, 1]), None);
        assert_eq!(der_element(&[0x1f, 0x01, 0x00]), None);
    }

    #[test]
    fn allow_list_without_a_ca_is_refused() {
        let files = TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            ca: None,
            verify_peer: true,
            allowed_cns: vec!["alice".into()],
        };
        let e = files.server_config().expect_err("no files");
        assert!(e.to_string().contains("cert.pem"), "{e}");
        let d = TlsFiles::in_dir(Path::new("/nonexistent"));
        assert_eq!(d.cert, Path::new("/nonexistent/server-cert.pem"));
        assert_eq!(d.key, Path::new("/nonexistent/server-key.pem"));
        assert!(d.ca.is_none() && d.verify_peer);
    }
}
