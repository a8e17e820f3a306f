//! Wire-level conformance tests: an in-process server on a temporary Unix socket and
//! a client that writes the protocol's bytes by hand, for the cases real clients
//! cannot produce (malformed and unknown options, bad magic, unknown commands,
//! oversized messages). Real-client tests live in the workspace's `tests/nbd_*.rs`.
//!
//! This file: the handshake (client flags, options, exports, meta contexts, export
//! names) and the connection's life around it (handshake deadlines, the client limit,
//! shutdown).

mod protocol_common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qcowx_core::storage::MemStorage;
use qcowx_core::{CreateOptions, Image};
use qcowx_nbd::config::Settings;
use qcowx_nbd::exports::{ExportPlan, Exports};
use qcowx_nbd::handshake::{self, HandshakeContext};
use qcowx_nbd::wire::*;
use qcowx_tests::nbd_wire::*;

use protocol_common::{Client, TestServer, SIZE};

#[test]
fn unknown_client_flags_close_the_connection() {
    let srv = TestServer::start(Settings::default(), 0);
    let mut c = Client::connect(&srv.path, 1 << 7);
    assert!(c.is_closed());
    // The server still serves others.
    let mut ok = srv.client();
    assert_eq!(ok.final_kind(OPT_LIST, &[]), REP_ACK);
    srv.stop();
}

#[test]
fn unknown_and_unsupported_options_get_err_unsup_and_negotiation_goes_on() {
    let srv = TestServer::start(Settings::default(), 0);
    let mut c = srv.client();
    for opt in [99u32, 4, OPT_STARTTLS, OPT_EXTENDED_HEADERS, 0x7fff_ffff] {
        assert_eq!(
            c.final_kind(opt, b"some data"),
            REP_ERR_UNSUP,
            "option {opt}"
        );
    }
    let list = c.opt(OPT_LIST, &[]);
    let names: Vec<String> = list
        .iter()
        .filter(|r| r.kind == REP_SERVER)
        .map(|r| {
            let n = be_u32(&r.data) as usize;
            String::from_utf8(r.data[4..4 + n].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, vec!["default", "default@snap"]);
    let (size, flags) = c.go("");
    assert_eq!(size, SIZE);
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
    srv.stop();
}

#[test]
fn malformed_options_get_err_invalid() {
    let srv = TestServer::start(Settings::default(), 0);
    let mut c = srv.client();
    // INFO whose name length runs past the data; one request byte short; trailing.
    let mut bad = info_data("default", &[INFO_NAME]);
    bad[3] = 100;
    assert_eq!(c.final_kind(OPT_INFO, &bad), REP_ERR_INVALID);
    let good = info_data("default", &[INFO_NAME]);
    assert_eq!(
        c.final_kind(OPT_GO, &good[..good.len() - 1]),
        REP_ERR_INVALID
    );
    let mut long = good.clone();
    long.push(0);
    assert_eq!(c.final_kind(OPT_INFO, &long), REP_ERR_INVALID);
    assert_eq!(c.final_kind(OPT_INFO, &[0, 0]), REP_ERR_INVALID);
    // Options that take no data.
    assert_eq!(c.final_kind(OPT_LIST, b"x"), REP_ERR_INVALID);
    assert_eq!(c.final_kind(OPT_STRUCTURED_REPLY, b"x"), REP_ERR_INVALID);
    // SET_META_CONTEXT before structured replies.
    assert_eq!(
        c.final_kind(
            OPT_SET_META_CONTEXT,
            &meta_data("default", &["base:allocation"])
        ),
        REP_ERR_INVALID
    );
    assert_eq!(c.final_kind(OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    // Repeated: refused, and structured replies stay on.
    assert_eq!(c.final_kind(OPT_STRUCTURED_REPLY, &[]), REP_ERR_INVALID);
    let m = meta_data("default", &["base:allocation"]);
    assert_eq!(
        c.final_kind(OPT_SET_META_CONTEXT, &m[..m.len() - 2]),
        REP_ERR_INVALID
    );
    assert_eq!(
        c.final_kind(OPT_SET_META_CONTEXT, &meta_data("default", &["nocolon"])),
        REP_ERR_INVALID
    );
    // Unknown exports.
    assert_eq!(
        c.final_kind(OPT_INFO, &info_data("nope", &[])),
        REP_ERR_UNKNOWN
    );
    assert_eq!(
        c.final_kind(OPT_LIST_META_CONTEXT, &meta_data("nope", &[])),
        REP_ERR_UNKNOWN
    );
    // Oversized option data is skipped.
    assert_eq!(
        c.final_kind(OPT_INFO, &vec![0u8; 100 << 10]),
        REP_ERR_TOO_BIG
    );
    // After all that, the handshake still works.
    let (size, flags) = c.go("default@snap");
    assert_eq!(size, SIZE);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_ne!(flags & TFLAG_SEND_DF, 0);
    srv.stop();
}

#[test]
fn info_reports_export_block_size_name_and_description() {
    let srv = TestServer::start(Settings::default(), 0);
    let mut c = srv.client();
    let r = c.opt(
        OPT_INFO,
        &info_data("", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    let find = |t: u16| {
        r.iter()
            .find(|x| x.kind == REP_INFO && be_u16(&x.data) == t)
            .unwrap_or_else(|| panic!("info {t} missing"))
    };
    assert_eq!(&find(INFO_NAME).data[2..], b"default");
    assert_eq!(&find(INFO_DESCRIPTION).data[2..], b"test disk");
    let b = &find(INFO_BLOCK_SIZE).data;
    assert_eq!(
        (be_u32(&b[2..]), be_u32(&b[6..]), be_u32(&b[10..])),
        (1, 65536, 32 << 20)
    );
    // Meta contexts: listing wildcards, selecting names.
    assert_eq!(c.final_kind(OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    let l = c.opt(
        OPT_LIST_META_CONTEXT,
        &meta_data("", &["qemu:", "x-other:thing"]),
    );
    let names: Vec<&[u8]> = l
        .iter()
        .filter(|x| x.kind == REP_META_CONTEXT)
        .map(|x| &x.data[4..])
        .collect();
    assert_eq!(
        names,
        vec![
            b"qemu:allocation-depth".as_slice(),
            b"qemu:dirty-bitmap:snap".as_slice()
        ]
    );
    let s = c.opt(
        OPT_SET_META_CONTEXT,
        &meta_data(
            "default",
            &["base:allocation", "qemu:allocation-depth", "base:"],
        ),
    );
    assert_eq!(s.len(), 3, "two contexts and an ACK");
    srv.stop();
}

#[test]
fn abort_and_bad_option_magic() {
    let srv = TestServer::start(Settings::default(), 0);
    let mut c = srv.client();
    assert_eq!(c.final_kind(OPT_ABORT, &[]), REP_ACK);
    assert!(c.is_closed());
    let mut c = srv.client();
    c.s.write_all(&[0u8; 16]).unwrap();
    assert!(c.is_closed());
    srv.stop();
}

#[test]
fn export_name_unknown_closes_known_enters_transmission() {
    let srv = TestServer::start(Settings::default(), 0);
    let mut c = srv.client();
    c.send_opt(OPT_EXPORT_NAME, b"missing");
    assert!(c.is_closed());
    // Without NO_ZEROES: size, flags, 124 zeros, then simple replies only.
    let mut c = Client::connect(&srv.path, FLAG_C_FIXED_NEWSTYLE);
    c.send_opt(OPT_EXPORT_NAME, b"default");
    let mut r = [0u8; 10 + 124];
    c.s.read_exact(&mut r).unwrap();
    assert_eq!(be_u64(&r), SIZE);
    assert!(r[10..].iter().all(|&b| b == 0));
    c.request(0, CMD_READ, 7, 65536, 8, &[]);
    let (magic, _, err, cookie, data) = c.any_reply(8);
    assert_eq!((magic, err, cookie), (SIMPLE_REPLY_MAGIC, 0, 7));
    assert_eq!(data, vec![0x5a; 8]);
    srv.stop();
}

#[test]
fn handshake_timeout_closes_idle_clients() {
    let settings = Settings {
        handshake_timeout: Duration::from_millis(300),
        ..Settings::default()
    };
    let srv = TestServer::start(settings, 0);
    let mut c = srv.client();
    let t = Instant::now();
    assert!(c.is_closed());
    assert!(t.elapsed() < Duration::from_secs(10));
    srv.stop();
}

#[test]
fn the_client_limit_holds_further_clients_back() {
    let srv = TestServer::start(Settings::default(), 1);
    let mut first = srv.client();
    first.go("");
    let path = srv.path.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let c = Client::connect(&path, FLAG_C_FIXED_NEWSTYLE);
        tx.send(()).unwrap();
        c
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "second client was served while the first was connected"
    );
    first.request(0, CMD_DISC, 0, 0, 0, &[]);
    drop(first);
    rx.recv_timeout(Duration::from_secs(10))
        .expect("second client served after the first left");
    drop(t.join().unwrap());
    srv.stop();
}

#[test]
fn shutdown_drains_and_closes_the_image() {
    let srv = TestServer::start(Settings::default(), 0);
    let mut c = srv.client();
    c.go("");
    c.request(0, CMD_WRITE, 1, 8192, 4, b"live");
    assert_eq!(c.simple(), (0, 1));
    // A client still in the handshake.
    let mut h = srv.client();
    let image = Arc::clone(&srv.image);
    srv.stop();
    assert!(c.is_closed());
    let _ = h.is_closed();
    // Closed: further use fails.
    assert!(image.read_at(&mut [0u8; 4], 8192).is_err());
}

#[test]
fn options_get_err_shutdown_while_the_server_shuts_down() {
    let image =
        Arc::new(Image::create_in(Arc::new(MemStorage::new()), &CreateOptions::new(SIZE)).unwrap());
    let exports = Exports::new(
        image,
        ExportPlan::Auto {
            main_name: "default".into(),
            main_description: None,
        },
        false,
    )
    .unwrap();
    let settings = Settings::default();
    let shutting_down = AtomicBool::new(true);
    let (server_end, client_end) = UnixStream::pair().unwrap();
    std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            let mut s = server_end;
            let ctx = HandshakeContext {
                exports: &exports,
                settings: &settings,
                shutting_down: &shutting_down,
            };
            handshake::negotiate(&mut s, ctx, None, Duration::from_secs(5))
        });
        let mut c = Client::over(client_end, FLAG_C_FIXED_NEWSTYLE);
        assert_eq!(c.final_kind(OPT_LIST, &[]), REP_ERR_SHUTDOWN);
        assert_eq!(c.final_kind(OPT_GO, &info_data("", &[])), REP_ERR_SHUTDOWN);
        assert_eq!(c.final_kind(OPT_ABORT, &[]), REP_ACK);
        let r = server.join().unwrap();
        assert!(matches!(r, Ok(None)), "{r:?}");
    });
}

#[test]
fn a_client_trickling_option_bytes_is_cut_off_at_the_handshake_deadline() {
    let settings = Settings {
        handshake_timeout: Duration::from_millis(500),
        ..Settings::default()
    };
    let srv = TestServer::start(settings, 0);
    let mut c = srv.client();
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_INFO.to_be_bytes());
    h.extend_from_slice(&1000u32.to_be_bytes());
    c.s.write_all(&h).unwrap();
    let start = Instant::now();
    let mut cut = false;
    while start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        if c.s.write_all(&[0]).is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut, "the server kept a trickling client for 10 s");
    assert!(start.elapsed() < Duration::from_secs(5));
    srv.stop();
}
