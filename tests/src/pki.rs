//! Certificates for the TLS tests, made with `openssl`.

use std::path::Path;
use std::process::Command;

use crate::{require_tool, run_ok};

/// Makes certificates in `dir` with `openssl` (Debian package `openssl`; a missing
/// `openssl` fails the test):
///
/// * `ca.pem` / `ca.key`, the CA;
/// * `server/` in QEMU's server layout (ca-cert.pem, server-cert.pem, server-key.pem;
///   CN localhost, SAN localhost and 127.0.0.1);
/// * `alice/` and `eve/` in QEMU's client layout (ca-cert.pem, client-cert.pem,
///   client-key.pem; CN alice / eve, signed by the CA);
/// * `mallory/`, a self-signed client certificate with CN alice (not from the CA);
/// * `nocert/` with the CA only.
pub fn make_pki(dir: &Path) {
    require_tool("openssl", "openssl", &["version"]);
    let script = r#"
set -e
ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
mkdir -p server alice eve mallory nocert
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
for d in server alice eve mallory nocert; do cp ca.pem $d/ca-cert.pem; done
"#;
    run_ok(Command::new("bash").args(["-c", script]).current_dir(dir));
}
