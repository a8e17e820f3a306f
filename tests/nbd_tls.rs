//! `qcowx-nbd` with TLS: TLS required on a Unix socket (QEMU's and libnbd's clients
//! with certificates, clients without TLS refused), TLS allowed over TCP (clients with
//! and without TLS), and client certificates outside the `--tls-allow-cn` list.
//!
//! Every test starts its own server process and checks the image afterwards with
//! qcowx and `qemu-img check`; the shared helpers and the conventions (tools, the
//! server binary, `QCOWX_NBD`) are in `qcowx_tests::nbd_tools` (tests/src/nbd_tools.rs).

use std::path::Path;
use std::process::Output;

use qcowx_tests::nbd_tools::*;
use qcowx_tests::*;

// ---- TLS -------------------------------------------------------------------------------------

/// qemu-io over TLS on a Unix socket: `dir` holds the client's files.
fn qemu_io_tls(sock: &Path, export: &str, dir: &Path, cmds: &[&str]) -> Output {
    let mut c = qemu_io();
    c.arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        ))
        .arg("--image-opts");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(format!(
        "driver=nbd,server.type=unix,server.path={},export={export},tls-creds=tls0,tls-hostname=localhost",
        sock.display()
    ));
    run(&mut c)
}

fn nbds_unix(sock: &Path, export: &str, dir: &Path) -> String {
    format!(
        "nbds+unix:///{export}?socket={}&tls-certificates={}",
        sock.display(),
        dir.display()
    )
}

#[test]
fn tls_required_serves_tls_clients_and_refuses_the_others() {
    let dir = tempdir();
    make_pki(dir.path());
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 16 << 20);
    let sock = sock_in(&dir);
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock),
        &[
            "-t",
            "-v",
            "--tls-creds",
            dir.path().join("server").to_str().unwrap(),
        ],
    );
    assert!(
        server.banner().contains("TLS required"),
        "{}",
        server.banner()
    );
    let alice = dir.path().join("alice");

    // QEMU's client over TLS: writes, reads, flushes; qemu-img copies the export.
    let out = qemu_io_tls(
        &sock,
        "default",
        &alice,
        &[
            "write -P 0x5c 0 1M",
            "aio_write -P 0x5d 4M 64k",
            "aio_flush",
            "read -P 0x5c 0 1M",
            "read -P 0x5d 4M 64k",
        ],
    );
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"),
        "qemu-io over TLS: {}",
        describe(&out)
    );
    let raw = dir.path().join("copy.raw");
    run_ok(
        qemu_img()
            .arg("convert")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                alice.display()
            ))
            .args(["--image-opts", "-O", "raw"])
            .arg(format!(
                "driver=nbd,server.type=unix,server.path={},export=default,tls-creds=tls0,tls-hostname=localhost",
                sock.display()
            ))
            .arg(&raw),
    );
    let copy = std::fs::read(&raw).unwrap();
    assert!(copy[..1 << 20].iter().all(|&b| b == 0x5c));
    assert!(copy[4 << 20..(4 << 20) + 65536].iter().all(|&b| b == 0x5d));

    // libnbd over TLS.
    let out = run_ok(nbdinfo().arg(nbds_unix(&sock, "default", &alice)));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("with TLS"),
        "{}",
        describe(&out)
    );
    let script = format!(
        r#"
h.set_uri_allow_local_file(True)
h.connect_uri("{uri}")
assert h.get_tls_negotiated()
assert h.get_structured_replies_negotiated()
h.pwrite(b"tls!" * 1024, 8 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8 << 20) == b"tls!" * 1024
h.shutdown()
print("ok")
"#,
        uri = nbds_unix(&sock, "default", &alice)
    );
    assert!(nbdsh_ok(&script).contains("ok"));

    // Without TLS: every option is refused with NBD_REP_ERR_TLS_REQD (libnbd reports
    // ENOTSUP and logs the server's message), and nothing can be read.
    let script = format!(
        r#"
h.set_opt_mode(True)
h.connect_uri("{uri}")
assert not h.get_tls_negotiated()
expect_err("ENOTSUP", h.opt_list, lambda n, d: 0)
expect_err("ENOTSUP", h.opt_info)
expect_err("ENOTSUP", h.opt_go)
print("refused")
"#,
        uri = server.uri("default")
    );
    let full = format!("{PY_PRELUDE}\n{script}");
    let out = run(nbdsh().env("LIBNBD_DEBUG", "1").args(["-c", &full]));
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("refused"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("this server requires TLS"),
        "libnbd did not see the server's TLS_REQD message: {}",
        describe(&out)
    );
    let out = run(qemu_io()
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(server.uri("default")));
    assert!(
        !out.status.success(),
        "qemu-io without TLS: {}",
        describe(&out)
    );
    assert!(
        server.stderr_shows("TLS established (client certificate CN alice)"),
        "{}",
        server.stderr()
    );
    server.stop();
    let image = open_ro(&img);
    let mut b = [0u8; 4];
    image.read_at(&mut b, 8 << 20).unwrap();
    assert_eq!(&b, b"tls!");
    drop(image);
    assert_qemu_check_clean(&img);
}

#[test]
fn tls_allowed_over_tcp_serves_clients_with_and_without_tls() {
    let dir = tempdir();
    make_pki(dir.path());
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let server = QcowxNbd::listen(
        &img,
        Listen::Tcp,
        &[
            "-t",
            "--tls=allow",
            "--tls-cert",
            dir.path().join("server/server-cert.pem").to_str().unwrap(),
            "--tls-key",
            dir.path().join("server/server-key.pem").to_str().unwrap(),
            "--tls-ca",
            dir.path().join("ca.pem").to_str().unwrap(),
        ],
    );
    assert!(
        server.banner().contains("TLS allowed"),
        "{}",
        server.banner()
    );
    let addr = server.tcp().expect("tcp address").to_string();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let alice = dir.path().join("alice");
    // In clear.
    qemu_io_nbd(&server.uri("default"), &["write -P 0x61 0 64k"]);
    let out = run_ok(nbdinfo().arg(server.uri("default")));
    assert!(String::from_utf8_lossy(&out.stdout).contains("without TLS"));
    // With TLS, over TCP (the certificate names 127.0.0.1).
    let out = run_ok(nbdinfo().arg(format!(
        "nbds://{addr}/default?tls-certificates={}",
        alice.display()
    )));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("with TLS"),
        "{}",
        describe(&out)
    );
    let out = run(qemu_io()
        .arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            alice.display()
        ))
        .args(["--image-opts", "-c", "read -P 0x61 0 64k", "-c", "write -P 0x62 64k 64k"])
        .arg(format!(
            "driver=nbd,server.type=inet,server.host={host},server.port={port},export=default,tls-creds=tls0"
        )));
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"),
        "qemu-io over TLS/TCP: {}",
        describe(&out)
    );
    qemu_io_nbd(&server.uri("default"), &["read -P 0x62 64k 64k"]);
    server.stop();
    assert_qemu_check_clean(&img);
}

#[test]
fn tls_client_certificates_outside_the_allow_list_are_refused() {
    let dir = tempdir();
    make_pki(dir.path());
    let img = dir.path().join("disk.qcow2");
    new_image(&img, 8 << 20);
    let sock = sock_in(&dir);
    let server = QcowxNbd::listen(
        &img,
        Listen::Unix(&sock),
        &[
            "-t",
            "--tls-creds",
            dir.path().join("server").to_str().unwrap(),
            "--tls-allow-cn",
            "alice",
            "--tls-allow-cn",
            "bob",
        ],
    );
    let ok = run_ok(nbdinfo().arg(nbds_unix(&sock, "default", &dir.path().join("alice"))));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("with TLS"));
    for who in ["eve", "nocert"] {
        let out = run(nbdinfo().arg(nbds_unix(&sock, "default", &dir.path().join(who))));
        assert!(
            !out.status.success(),
            "{who} was served: {}",
            describe(&out)
        );
        let out = qemu_io_tls(&sock, "default", &dir.path().join(who), &["read 0 4k"]);
        assert!(
            !out.status.success(),
            "qemu-io as {who} was served: {}",
            describe(&out)
        );
    }
    // The refusals are logged, and alice is still served.
    qemu_io_tls(
        &sock,
        "default",
        &dir.path().join("alice"),
        &["write -P 0x7a 0 4k"],
    );
    for want in ["CN 'eve' is not on the allow-list", "no certificates"] {
        assert!(server.stderr_shows(want), "{}", server.stderr());
    }
    server.stop();
    let image = open_ro(&img);
    let mut b = [0u8; 4];
    image.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x7a; 4]);
}
