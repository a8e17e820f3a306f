//! Wire-level conformance tests: an in-process server on a temporary Unix socket and
//! a client that writes the protocol's bytes by hand, for the cases real clients
//! cannot produce (malformed and unknown options, bad magic, unknown commands,
//! oversized messages). Real-client tests live in the workspace's `tests/nbd_*.rs`.
//!
//! This file: transmission (command errors, read-only exports, structured reads,
//! block status limits, pipelining, large and cached reads of an image file, clients
//! that stop reading, parallel workers).

mod protocol_common;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qcowx_core::storage::{Access, MemStorage, Watched};
use qcowx_core::{CreateOptions, Image};
use qcowx_nbd::config::Settings;
use qcowx_nbd::wire::*;
use qcowx_tests::nbd_wire::*;

use protocol_common::{TestServer, SIZE};

#[test]
fn transmission_errors_follow_the_spec() {
    let srv = TestServer::start(Settings::default(), 0);
    let mut c = srv.client();
    c.go("default");
    // Unknown command, unknown flag, flag of another command.
    c.request(0, 99, 1, 0, 0, &[]);
    assert_eq!(c.simple(), (EINVAL, 1));
    c.request(1 << 9, CMD_READ, 2, 0, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 2));
    c.request(CMD_FLAG_REQ_ONE, CMD_FLUSH, 3, 0, 0, &[]);
    assert_eq!(c.simple(), (EINVAL, 3));
    // DF needs structured replies.
    c.request(CMD_FLAG_DF, CMD_READ, 4, 0, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 4));
    // Past the end: EINVAL for reads and trims, ENOSPC for writes and zeroes.
    c.request(0, CMD_READ, 5, SIZE - 512, 1024, &[]);
    assert_eq!(c.simple(), (EINVAL, 5));
    c.request(0, CMD_WRITE, 6, SIZE, 4, b"abcd");
    assert_eq!(c.simple(), (ENOSPC, 6));
    c.request(0, CMD_WRITE_ZEROES, 7, u64::MAX - 10, 100, &[]);
    assert_eq!(c.simple(), (ENOSPC, 7));
    c.request(0, CMD_TRIM, 8, SIZE, 1, &[]);
    assert_eq!(c.simple(), (EINVAL, 8));
    // Block status without contexts; flush with an offset.
    c.request(0, CMD_BLOCK_STATUS, 9, 0, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 9));
    c.request(0, CMD_FLUSH, 10, 512, 0, &[]);
    assert_eq!(c.simple(), (EINVAL, 10));
    // An oversized write: its payload is dropped, the connection stays in sync.
    let big = vec![1u8; (32 << 20) + 512];
    c.request(0, CMD_WRITE, 11, 0, big.len() as u32, &big);
    assert_eq!(c.simple(), (EINVAL, 11));
    c.request(0, CMD_READ, 12, 65536, 4, &[]);
    let (_, _, err, cookie, data) = c.any_reply(4);
    assert_eq!((err, cookie, data), (0, 12, vec![0x5a; 4]));
    // A bad request magic ends the connection.
    c.s.write_all(&[0u8; 28]).unwrap();
    assert!(c.is_closed());
    srv.stop();
}

#[test]
fn read_only_exports_refuse_writes_with_eperm() {
    let srv = TestServer::start(Settings::default(), 0);
    let mut c = srv.client();
    let (_, flags) = c.go("default@snap");
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    for (i, cmd) in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES]
        .into_iter()
        .enumerate()
    {
        let data: &[u8] = if cmd == CMD_WRITE { b"abcd" } else { &[] };
        c.request(0, cmd, i as u64, 0, 4, data);
        assert_eq!(c.simple(), (EPERM, i as u64));
    }
    srv.stop();
}

#[test]
fn structured_reads_send_holes_data_and_errors() {
    let srv = TestServer::start(Settings::default(), 0);
    let mut c = srv.client();
    assert_eq!(c.final_kind(OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    assert_eq!(
        c.final_kind(
            OPT_SET_META_CONTEXT,
            &meta_data("", &["base:allocation", "qemu:allocation-depth"])
        ),
        REP_ACK
    );
    c.go("");
    // [0, 64K) unallocated, [64K, 128K) data, rest unallocated.
    c.request(0, CMD_READ, 1, 0, 196608, &[]);
    let ch = c.chunks(1);
    let kinds: Vec<u16> = ch.iter().map(|x| x.0).collect();
    assert_eq!(
        kinds,
        vec![
            REPLY_TYPE_OFFSET_HOLE,
            REPLY_TYPE_OFFSET_DATA,
            REPLY_TYPE_OFFSET_HOLE
        ]
    );
    assert_eq!(be_u64(&ch[1].1), 65536);
    assert!(ch[1].1[8..].iter().all(|&b| b == 0x5a));
    assert_eq!((be_u64(&ch[2].1), be_u32(&ch[2].1[8..])), (131072, 65536));
    // A small read (run by the connection's reader) across a hole and data, and one
    // inside the hole.
    c.request(0, CMD_READ, 11, 61440, 8192, &[]);
    let ch = c.chunks(11);
    let kinds: Vec<u16> = ch.iter().map(|x| x.0).collect();
    assert_eq!(kinds, vec![REPLY_TYPE_OFFSET_HOLE, REPLY_TYPE_OFFSET_DATA]);
    assert_eq!((be_u64(&ch[0].1), be_u32(&ch[0].1[8..])), (61440, 4096));
    assert_eq!((be_u64(&ch[1].1), ch[1].1.len()), (65536, 8 + 4096));
    assert!(ch[1].1[8..].iter().all(|&b| b == 0x5a));
    c.request(0, CMD_READ, 12, 4096, 4096, &[]);
    let ch = c.chunks(12);
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].0, REPLY_TYPE_OFFSET_HOLE);
    assert_eq!((be_u64(&ch[0].1), be_u32(&ch[0].1[8..])), (4096, 4096));
    // DF: one data chunk with the zeros in it.
    c.request(CMD_FLAG_DF, CMD_READ, 2, 0, 196608, &[]);
    let ch = c.chunks(2);
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].0, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(ch[0].1.len(), 8 + 196608);
    // Errors are structured too, with a message.
    c.request(0, CMD_READ, 3, SIZE, 512, &[]);
    let ch = c.chunks(3);
    assert_eq!(ch[0].0, REPLY_TYPE_ERROR);
    assert_eq!(be_u32(&ch[0].1), EINVAL);
    assert!(be_u16(&ch[0].1[4..]) > 0, "error message expected");
    // Block status: one chunk per context; REQ_ONE gives one descriptor each.
    c.request(0, CMD_BLOCK_STATUS, 4, 0, SIZE as u32, &[]);
    let ch = c.chunks(4);
    assert_eq!(ch.len(), 2);
    let base = ch
        .iter()
        .find(|x| be_u32(&x.1) == 1)
        .expect("base:allocation");
    let descs: Vec<(u32, u32)> = base.1[4..]
        .chunks(8)
        .map(|d| (be_u32(d), be_u32(&d[4..])))
        .collect();
    assert_eq!(
        descs,
        vec![
            (65536, STATE_HOLE | STATE_ZERO),
            (65536, 0),
            (SIZE as u32 - 131072, STATE_HOLE | STATE_ZERO)
        ]
    );
    let depth = ch.iter().find(|x| be_u32(&x.1) == 2).expect("depth");
    assert_eq!(be_u32(&depth.1[8..]), 0);
    assert_eq!(be_u32(&depth.1[16..]), 1);
    c.request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 5, 65536, 4096, &[]);
    for (_, p) in c.chunks(5) {
        assert_eq!(p.len(), 12);
        assert_eq!(be_u32(&p[4..]), 4096);
    }
    srv.stop();
}

/// With 64 KiB clusters a block-status request is answered whole up to 65,536
/// clusters, which is any length a request can ask (4 GiB - 1): a client walking a
/// 64 TiB disk that is mostly unallocated needs one query per 4 GiB, not per GiB.
#[test]
fn block_status_answers_whole_queries_of_up_to_65536_clusters() {
    use qcowx_nbd::transmission::{status_query_limit, MAX_STATUS_CLUSTERS};
    assert_eq!(status_query_limit(65536), MAX_STATUS_CLUSTERS * 65536);
    let size = 64u64 << 40;
    let srv = TestServer::start_sized(size, Settings::default(), 0);
    let far = 40u64 << 40;
    srv.image
        .write_at(&[0x66; 65536], far)
        .expect("write far out");
    let mut c = srv.allocation_client();
    let ask = u32::MAX - 65535; // 4 GiB - 64 KiB, cluster-aligned
    let start = far - 2 * u64::from(ask);
    let (mut offset, mut data_at) = (start, Vec::new());
    for cookie in 1..=4 {
        let descs = c.status(cookie, offset, ask);
        let covered: u64 = descs.iter().map(|d| d.0).sum();
        assert_eq!(covered, u64::from(ask), "reply at {offset:#x}");
        let mut at = offset;
        for (n, flags) in descs {
            if flags & STATE_HOLE == 0 {
                data_at.push((at, n));
            }
            at += n;
        }
        offset += covered;
    }
    assert_eq!(data_at, vec![(far, 65536)]);
    srv.stop();
}

/// One block-status request describes at most `MAX_STATUS_QUERY` bytes where that is
/// more than 65,536 clusters (a reply may be shorter than asked, never longer); the
/// client goes on from where it ended.
#[test]
fn block_status_replies_stop_at_the_query_limit() {
    use qcowx_nbd::transmission::{status_query_limit, MAX_STATUS_QUERY};
    let size = 4 * MAX_STATUS_QUERY;
    // 512-byte clusters: the limit is MAX_STATUS_QUERY, not 65,536 clusters.
    assert_eq!(status_query_limit(512), MAX_STATUS_QUERY);
    let srv = TestServer::start_clustered(size, 512, Settings::default(), 0);
    srv.image
        .write_at(&[0x66; 65536], 2 * MAX_STATUS_QUERY + 65536)
        .expect("write far out");
    let mut c = srv.allocation_client();
    // Ask for 3 GiB at a time; every reply must stop within the limit.
    let ask = 3 * MAX_STATUS_QUERY as u32;
    let (mut offset, mut data_at) = (0u64, Vec::new());
    for cookie in 1..=16 {
        if offset >= size {
            break;
        }
        let len = (size - offset).min(u64::from(ask)) as u32;
        let descs = c.status(cookie, offset, len);
        let covered: u64 = descs.iter().map(|d| d.0).sum();
        assert!(
            covered > 0 && covered <= MAX_STATUS_QUERY,
            "reply at {offset:#x} covers {covered:#x} bytes"
        );
        let mut at = offset;
        for (n, flags) in descs {
            if flags & STATE_HOLE == 0 {
                data_at.push(at);
            }
            at += n;
        }
        offset += covered;
    }
    assert_eq!(offset, size, "the whole disk was described");
    assert_eq!(data_at, vec![65536, 2 * MAX_STATUS_QUERY + 65536]);
    srv.stop();
}

#[test]
fn pipelined_requests_are_all_answered() {
    let srv = TestServer::start(Settings::default(), 0);
    let mut c = srv.client();
    c.go("");
    let n = 200u64;
    for i in 0..n {
        let off = (i % 32) * 4096 + (1 << 20);
        c.request(CMD_FLAG_FUA, CMD_WRITE, i, off, 4096, &[i as u8; 4096]);
    }
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (err, cookie) = c.simple();
        assert_eq!(err, 0);
        assert!(!seen[cookie as usize], "cookie {cookie} answered twice");
        seen[cookie as usize] = true;
    }
    c.request(0, CMD_FLUSH, 1000, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 1000));
    c.request(0, CMD_DISC, 1001, 0, 0, &[]);
    assert!(c.is_closed());
    srv.stop();
}

#[test]
fn misaligned_requests_fail_when_a_minimum_block_size_is_advertised() {
    let settings = Settings {
        min_block_size: 4096,
        ..Settings::default()
    };
    let srv = TestServer::start(settings, 0);
    let mut c = srv.client();
    c.go("");
    c.request(0, CMD_READ, 1, 512, 4096, &[]);
    assert_eq!(c.simple(), (EINVAL, 1));
    c.request(0, CMD_WRITE, 2, 0, 512, &[0u8; 512]);
    assert_eq!(c.simple(), (EINVAL, 2));
    c.request(0, CMD_READ, 3, 4096, 4096, &[]);
    let (_, _, err, _, _) = c.any_reply(4096);
    assert_eq!(err, 0);
    srv.stop();
}

#[test]
fn dirty_bitmap_contexts_report_changes_since_a_snapshot() {
    let srv = TestServer::start(Settings::default(), 0);
    srv.image.write_at(&[7u8; 100], (2 << 20) + 10).unwrap();
    let mut c = srv.client();
    assert_eq!(c.final_kind(OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    let l = c.opt(
        OPT_LIST_META_CONTEXT,
        &meta_data("", &["qemu:dirty-bitmap:"]),
    );
    let names: Vec<&[u8]> = l
        .iter()
        .filter(|x| x.kind == REP_META_CONTEXT)
        .map(|x| &x.data[4..])
        .collect();
    assert_eq!(names, vec![b"qemu:dirty-bitmap:snap".as_slice()]);
    let s = c.opt(
        OPT_SET_META_CONTEXT,
        &meta_data(
            "",
            &[
                "qemu:dirty-bitmap:snap",
                "qemu:dirty-bitmap:nope",
                "base:allocation",
            ],
        ),
    );
    let ids: Vec<(u32, Vec<u8>)> = s
        .iter()
        .filter(|x| x.kind == REP_META_CONTEXT)
        .map(|x| (be_u32(&x.data), x.data[4..].to_vec()))
        .collect();
    assert_eq!(ids.len(), 2, "the unknown snapshot selects nothing");
    let dirty_id = ids
        .iter()
        .find(|(_, n)| n == b"qemu:dirty-bitmap:snap")
        .expect("dirty bitmap selected")
        .0;
    c.go("");
    c.request(0, CMD_BLOCK_STATUS, 1, 0, SIZE as u32, &[]);
    let chunks = c.chunks(1);
    let dirty = chunks
        .iter()
        .find(|(_, p)| be_u32(p) == dirty_id)
        .expect("dirty bitmap chunk");
    let descs: Vec<(u32, u32)> = dirty.1[4..]
        .chunks(8)
        .map(|d| (be_u32(d), be_u32(&d[4..])))
        .collect();
    let m = 1u32 << 20;
    assert_eq!(
        descs,
        vec![(2 * m, 0), (65536, 1), (SIZE as u32 - 2 * m - 65536, 0)]
    );
    srv.stop();
}

/// Bytes that differ at every offset, so data from the wrong place shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + (i >> 12)) as u8).collect()
}

/// Reads larger than the inline limit, from an image file: sent straight from the
/// file's mapping when their pages are cached, read into a buffer when they are not;
/// either way the bytes the disk holds, in simple and structured replies.
#[test]
fn large_reads_of_an_image_file_send_what_the_disk_holds() {
    const MIB: u64 = 1 << 20;
    let srv = TestServer::start_on_file(Settings::default(), 0);
    // [64K, 128K) 0x5a (from the server), [1 MiB, 2.5 MiB) a pattern, [3 MiB, 3.5
    // MiB) written zeros, the rest unallocated.
    srv.image
        .write_at(&pattern(3 * MIB as usize / 2), MIB)
        .expect("write");
    srv.image
        .write_zeroes(3 * MIB, MIB / 2, false)
        .expect("write zeroes");
    srv.image.flush().expect("flush");
    let file = srv.path.with_file_name("disk.qcow2");
    let mut simple = srv.client();
    simple.go("");
    let mut structured = srv.client();
    assert_eq!(structured.final_kind(OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    structured.go("");
    let reads = [
        (0, 4 * MIB as u32),
        (MIB - 4096, 2 * MIB as u32),
        (MIB + 512, 70_000),
        (2 * MIB, 2 * MIB as u32),
    ];
    let mut cookie = 0;
    // Cold (nothing cached, so nothing can be lent) and then warm.
    for round in ["cold", "warm"] {
        for &(off, len) in &reads {
            if round == "cold" {
                qcowx_tests::evict_page_cache(&file);
            }
            let mut expect = vec![0u8; len as usize];
            srv.image.read_at(&mut expect, off).expect("read_at");
            cookie += 1;
            simple.request(0, CMD_READ, cookie, off, len, &[]);
            let (err, c, p) = {
                let (_, _, err, c, p) = simple.any_reply(len as usize);
                (err, c, p)
            };
            assert_eq!((err, c), (0, cookie));
            assert!(p == expect, "{round} simple read at {off}+{len} differs");
            for flags in [0, CMD_FLAG_DF] {
                cookie += 1;
                let got = structured.structured_read(cookie, flags, off, len);
                assert!(
                    got == expect,
                    "{round} structured read (flags {flags}) at {off}+{len} differs"
                );
            }
        }
    }
    srv.stop();
}

/// `NBD_CMD_CACHE` starts reading the range's data into the page cache: after it,
/// the host bytes of the written cluster are cached without any read.
#[test]
fn cache_brings_the_range_into_the_page_cache() {
    let srv = TestServer::start_on_file(Settings::default(), 0);
    srv.image.flush().expect("flush");
    let file = srv.path.with_file_name("disk.qcow2");
    let host = srv.image.block_status(65536, 65536).expect("status")[0]
        .host_offset
        .expect("stored") as usize;
    let cached = || {
        let f = std::fs::File::open(&file).expect("open");
        // SAFETY: read-only mapping of a file the test does not shrink; only
        // mincore looks at it.
        let map = unsafe { memmap2::Mmap::map(&f) }.expect("map");
        qcowx_core::storage::resident(&map, host, 65536)
    };
    qcowx_tests::evict_page_cache(&file);
    assert!(!cached(), "the eviction left the pages cached");
    let mut c = srv.client();
    c.go("");
    c.request(0, CMD_CACHE, 1, 0, SIZE as u32, &[]);
    assert_eq!(c.simple(), (0, 1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cached() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(cached(), "CACHE did not bring the data in");
    // Past the end: EINVAL, as for a read.
    c.request(0, CMD_CACHE, 2, SIZE - 512, 1024, &[]);
    assert_eq!(c.simple(), (EINVAL, 2));
    srv.stop();
}

/// A client that sends large reads and stops reading the replies must not hold up
/// another client: lent bytes keep the image from freeing clusters, so a send from
/// the mapping waits only `LEND_WAIT` for room before copying the rest. The other
/// client's trim and flush (which makes the trimmed cluster reusable once no read
/// uses it) must complete while the first one still reads nothing.
#[test]
fn a_client_that_stops_reading_replies_holds_up_no_other_client() {
    const MIB: u32 = 1 << 20;
    let settings = Settings {
        discard: qcowx_nbd::config::DiscardMode::Unmap,
        ..Settings::default()
    };
    let srv = TestServer::start_on_file(settings, 0);
    srv.image
        .write_at(&pattern(2 * MIB as usize), 0)
        .expect("write");
    let mut expect = vec![0u8; MIB as usize];
    srv.image.read_at(&mut expect, 0).expect("read_at");

    let mut stuck = srv.client();
    stuck.go("");
    let reads = 48u64;
    for cookie in 0..reads {
        stuck.request(0, CMD_READ, cookie, 0, MIB, &[]);
    }
    // Let the server fill the socket and block on it.
    std::thread::sleep(Duration::from_millis(300));

    let mut other = srv.client();
    other
        .s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    other.go("");
    other.request(0, CMD_WRITE, 1, 3 * u64::from(MIB), 65536, &[7; 65536]);
    assert_eq!(other.simple(), (0, 1));
    other.request(0, CMD_TRIM, 2, 3 * u64::from(MIB), 65536, &[]);
    assert_eq!(other.simple(), (0, 2));
    other.request(0, CMD_FLUSH, 3, 0, 0, &[]);
    assert_eq!(other.simple(), (0, 3), "flush while a client reads nothing");

    // The stuck client gets every reply, whole and in one piece each.
    let mut seen = vec![false; reads as usize];
    for _ in 0..reads {
        let (_, _, err, c, p) = stuck.any_reply(MIB as usize);
        assert_eq!(err, 0);
        assert!(!seen[c as usize], "cookie {c} answered twice");
        seen[c as usize] = true;
        assert!(p == expect, "reply {c} differs");
    }
    srv.stop();
}

/// Shutdown waits for busy connections only as long as `Settings::drain_timeout`: a
/// client that stops reading its replies does not keep the image open (the server's
/// send to it blocks, and no timeout set after the send began ends it).
#[test]
fn shutdown_stops_waiting_for_a_stuck_client_at_the_drain_timeout() {
    const MIB: u32 = 1 << 20;
    let settings = Settings {
        drain_timeout: Duration::from_millis(500),
        ..Settings::default()
    };
    let srv = TestServer::start_on_file(settings, 0);
    srv.image
        .write_at(&pattern(2 * MIB as usize), 0)
        .expect("write");
    let mut stuck = srv.client();
    stuck.go("");
    for cookie in 0..48u64 {
        stuck.request(0, CMD_READ, cookie, 0, MIB, &[]);
    }
    // Let the server fill the socket and block on it.
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    srv.stop();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(8),
        "shutdown took {took:?} with a 500 ms drain timeout"
    );
    drop(stuck);
}

/// How many reads of a [`gauged`] storage run at once while `armed`, each held up
/// 40 ms.
#[derive(Debug, Default)]
struct Gauge {
    armed: std::sync::atomic::AtomicBool,
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

/// A storage in memory whose reads `Gauge` measures.
fn gauged() -> (Arc<Gauge>, Arc<Watched<MemStorage>>) {
    use std::sync::atomic::Ordering::SeqCst;
    let gauge = Arc::new(Gauge::default());
    let g = Arc::clone(&gauge);
    let storage = Watched::new(MemStorage::new(), move |a| {
        if matches!(a, Access::Read { .. }) && g.armed.load(SeqCst) {
            let n = g.now.fetch_add(1, SeqCst) + 1;
            g.max.fetch_max(n, SeqCst);
            std::thread::sleep(Duration::from_millis(40));
            g.now.fetch_sub(1, SeqCst);
        }
        Ok(())
    });
    (gauge, Arc::new(storage))
}

/// `Settings::workers` bounds how many requests of one connection run at once, and
/// the workers do run in parallel: 8 pipelined reads too large to run on the reading
/// thread, each waiting 40 ms for the disk, run two at a time with two workers and
/// four at a time with four.
#[test]
fn a_connection_runs_as_many_requests_at_once_as_it_has_workers() {
    use std::sync::atomic::Ordering::SeqCst;
    for workers in [2usize, 4] {
        let (gauge, storage) = gauged();
        let img = Image::create_in(storage, &CreateOptions::new(SIZE)).expect("create");
        let settings = Settings {
            workers,
            ..Settings::default()
        };
        let srv = TestServer::serve(img, tempfile::tempdir().expect("tempdir"), settings, 0);
        let mut c = srv.client();
        c.go("");
        gauge.armed.store(true, SeqCst);
        // [64K, 192K): one cluster of data (one storage read), one unallocated.
        let len = 2 * 65536u32;
        for cookie in 0..8u64 {
            c.request(0, CMD_READ, cookie, 65536, len, &[]);
        }
        for _ in 0..8 {
            let (_, _, err, _, p) = c.any_reply(len as usize);
            assert_eq!(err, 0);
            assert!(p[..65536].iter().all(|&b| b == 0x5a));
            assert!(p[65536..].iter().all(|&b| b == 0));
        }
        gauge.armed.store(false, SeqCst);
        assert_eq!(gauge.max.load(SeqCst), workers, "reads at once");
        drop(c);
        srv.stop();
    }
}

/// One block status chunk carries at most `MAX_DESCRIPTORS` descriptors: on a disk of
/// 512-byte clusters alternating data and hole, a query of the whole disk is answered
/// with exactly that many, covering less than asked, and the queries that follow
/// from where each reply stopped describe the whole disk.
#[test]
fn block_status_chunks_stop_at_the_descriptor_limit() {
    use qcowx_nbd::transmission::MAX_DESCRIPTORS;
    let pairs = MAX_DESCRIPTORS as u64 + 100;
    let start = 196608u64; // past the data TestServer::serve writes at [64K, 128K)
    let size = start + pairs * 1024;
    let mut opts = CreateOptions::new(size);
    opts.cluster_size = 512;
    let img = Image::create_in(Arc::new(MemStorage::new()), &opts).expect("create");
    for i in 0..pairs {
        img.write_at(&[0x77; 512], start + i * 1024).expect("write");
    }
    let srv = TestServer::serve(
        img,
        tempfile::tempdir().expect("tempdir"),
        Settings::default(),
        0,
    );
    let mut c = srv.allocation_client();
    let (mut offset, mut counts, mut data_at) = (0u64, Vec::new(), Vec::new());
    for cookie in 1..=8 {
        if offset >= size {
            break;
        }
        let descs = c.status(cookie, offset, (size - offset) as u32);
        counts.push(descs.len());
        for (n, flags) in descs {
            if flags & STATE_HOLE == 0 && offset >= start {
                data_at.push(offset);
            }
            offset += n;
        }
    }
    assert_eq!(offset, size, "the whole disk was described");
    assert_eq!(counts[0], MAX_DESCRIPTORS, "{counts:?}");
    assert!(counts.iter().all(|&n| n <= MAX_DESCRIPTORS), "{counts:?}");
    let want: Vec<u64> = (0..pairs).map(|i| start + i * 1024).collect();
    assert_eq!(data_at.len(), want.len());
    assert!(data_at == want, "data where it was written, holes between");
    srv.stop();
}
