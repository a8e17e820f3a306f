//! The stream library on hostile input: random byte flips and cuts of a valid stream
//! are refused with a typed error (never a panic), the receiving image keeps its
//! roots and content, and the good stream still goes in afterwards.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use qcowx_core::stream::{self, ReceiveOptions, SendOptions};
use qcowx_core::{CreateOptions, Error, Image, OpenOptions};
use qcowx_tests::Rng;

fn make_source(path: &Path) -> Arc<Image> {
    let img = Arc::new(Image::create(path, &CreateOptions::new(8 << 20)).unwrap());
    let mut rng = Rng::new(3);
    let mut buf = vec![0u8; 300 << 10];
    rng.fill(&mut buf);
    img.write_at(&buf, 64 << 10).unwrap();
    img.write_at(&[7u8; 200 << 10], 3 << 20).unwrap();
    img.snapshot("default", "s0").unwrap();
    img.write_at(&buf[..100 << 10], 1 << 20).unwrap();
    img.write_zeroes(3 << 20, 64 << 10, false).unwrap();
    img.discard(4 << 20, 64 << 10).unwrap();
    img.write_at(&[9u8; 70 << 10], 6 << 20).unwrap();
    img.snapshot("default", "s1").unwrap();
    img
}

fn send(img: &Arc<Image>, snap: &str, from: Option<&str>) -> Vec<u8> {
    let mut out = Vec::new();
    let opts = SendOptions {
        from: from.map(str::to_string),
        resume: None,
    };
    stream::send(img, snap, &opts, &mut out).unwrap();
    out
}

/// Names and content of every listed root.
fn fingerprint(path: &Path) -> Vec<(String, u64, Vec<u8>)> {
    let img = Arc::new(OpenOptions::new().open(path).unwrap());
    let out = img
        .list()
        .unwrap()
        .into_iter()
        .map(|r| {
            let disk = img.open_root(&r.name).unwrap();
            let mut buf = vec![0u8; disk.size() as usize];
            disk.read_at(&mut buf, 0).unwrap();
            (r.name, r.uid, buf)
        })
        .collect();
    img.close().unwrap();
    out
}

#[test]
fn mutated_streams_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(&dir.path().join("src.qcow2"));
    let full = send(&src, "s0", None);
    let inc = send(&src, "s1", Some("s0"));
    src.close().unwrap();
    drop(src);
    let dst = dir.path().join("dst.qcow2");
    stream::receive(&dst, &mut Cursor::new(&full), &ReceiveOptions::default()).unwrap();
    let before = fingerprint(&dst);

    let mut rng = Rng::new(11);
    for round in 0..150 {
        let mut bad = inc.clone();
        match rng.below(3) {
            0 => {
                let i = rng.below(bad.len() as u64) as usize;
                bad[i] ^= 1 << rng.below(8);
            }
            1 => bad.truncate(rng.below(bad.len() as u64) as usize),
            _ => {
                let i = rng.below(bad.len() as u64) as usize;
                bad.insert(i, rng.below(256) as u8);
            }
        }
        let r = stream::receive(&dst, &mut Cursor::new(&bad), &ReceiveOptions::default());
        match r {
            Err(Error::Stream { .. }) | Err(Error::StreamMismatch { .. }) => {}
            other => panic!("round {round}: {other:?}"),
        }
        assert!(
            fingerprint(&dst) == before,
            "round {round}: the image changed"
        );
        stream::abort(&dst).unwrap();
    }
    let report = stream::receive(&dst, &mut Cursor::new(&inc), &ReceiveOptions::default()).unwrap();
    assert!(report.incremental);
    let got = fingerprint(&dst);
    let want = fingerprint(&dir.path().join("src.qcow2"));
    // The snapshots match the sender's: same identity, same content.
    for name in ["s0", "s1"] {
        let g = got.iter().find(|r| r.0 == name).unwrap();
        let w = want.iter().find(|r| r.0 == name).unwrap();
        assert_eq!(g.1, w.1, "{name}: uid");
        assert!(g.2 == w.2, "{name}: content");
    }
}

#[test]
fn a_stream_resumes_from_the_token_the_receiver_gives() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(&dir.path().join("src.qcow2"));
    let full = send(&src, "s1", None);
    let dst = dir.path().join("dst.qcow2");
    let opts = ReceiveOptions {
        name: None,
        checkpoint_bytes: 1,
    };
    // Cut inside the last data record: everything before it is kept.
    let cut = full.len() - 60;
    let e = stream::receive(&dst, &mut Cursor::new(&full[..cut]), &opts).unwrap_err();
    assert!(matches!(e, Error::Stream { .. }), "{e}");
    let token = stream::resume_token(&dst).unwrap().expect("a token");
    assert!(token.next.seq > 0);
    let mut rest = Vec::new();
    let sopts = SendOptions {
        from: None,
        resume: Some(token),
    };
    stream::send(&src, "s1", &sopts, &mut rest).unwrap();
    assert!(
        rest.len() < full.len() / 2,
        "{} of {}",
        rest.len(),
        full.len()
    );
    src.close().unwrap();
    drop(src);
    // A resumed stream is refused by an image that did not stop there.
    let other = dir.path().join("other.qcow2");
    let e = stream::receive(&other, &mut Cursor::new(&rest), &opts).unwrap_err();
    assert!(matches!(e, Error::StreamMismatch { .. }), "{e}");
    let r = stream::receive(&dst, &mut Cursor::new(&rest), &opts).unwrap();
    assert_eq!(r.skipped, 0);
    assert!(stream::resume_token(&dst).unwrap().is_none());
    let got = fingerprint(&dst);
    let want = fingerprint(&dir.path().join("src.qcow2"));
    let g = got.iter().find(|r| r.0 == "s1").unwrap();
    let w = want.iter().find(|r| r.0 == "s1").unwrap();
    assert!(g.1 == w.1 && g.2 == w.2);
}

/// Compressible data travels compressed and random data as it is (no bigger): each
/// record is judged on its own, and either way the receiver reads the same bytes.
#[test]
fn compressible_records_shrink_and_random_ones_do_not_grow() {
    let dir = tempfile::tempdir().unwrap();
    let img =
        Arc::new(Image::create(dir.path().join("a.qcow2"), &CreateOptions::new(16 << 20)).unwrap());
    img.snapshot("default", "empty").unwrap();
    let text =
        b"kernel: EXT4-fs (vda1): mounted filesystem with ordered data mode\n".repeat(64 << 10);
    let text = &text[..4 << 20];
    img.write_at(text, 0).unwrap();
    img.snapshot("default", "text").unwrap();
    let mut noise = vec![0u8; 4 << 20];
    Rng::new(11).fill(&mut noise);
    img.write_at(&noise, 8 << 20).unwrap();
    img.snapshot("default", "noise").unwrap();

    let text_stream = send(&img, "text", Some("empty"));
    assert!(
        text_stream.len() < text.len() / 8,
        "text: {} stream bytes for {} bytes of data",
        text_stream.len(),
        text.len()
    );
    let noise_stream = send(&img, "noise", Some("text"));
    assert!(
        noise_stream.len() >= noise.len(),
        "random data cannot shrink"
    );
    assert!(
        noise_stream.len() <= noise.len() + noise.len() / 100,
        "noise: {} stream bytes for {} bytes of data",
        noise_stream.len(),
        noise.len()
    );

    let dst = dir.path().join("b.qcow2");
    for s in [send(&img, "empty", None), text_stream, noise_stream] {
        stream::receive(&dst, &mut Cursor::new(s), &ReceiveOptions::default()).unwrap();
    }
    let got = Arc::new(OpenOptions::new().open(&dst).unwrap());
    let disk = got.open_root("noise").unwrap();
    let mut buf = vec![0u8; 16 << 20];
    disk.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4 << 20] == *text && buf[8 << 20..12 << 20] == *noise);
}
