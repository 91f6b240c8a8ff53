//! Faults: peers that die, stall or speak garbage; accesses outside registered memory;
//! port conflicts; unreachable metadata. Nothing may hang, and every failure has a reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{eventually, peek, poke, random_bytes, registered, ChildTarget, FakePeer};
use tidewire::core::wire::{FrameKind, Header, Status, HEADER_LEN, INSTANCE_LEN, MAX_DATA_FRAME};
use tidewire::{
    BatchOptions, Deadlines, Engine, EngineConfig, Error, MetadataServer, MetadataUri, Op, Request,
    RequestStatus,
};

const CHILD: &str = "zz_child_process_entry";

/// Not a test: the body of the child target process the tests below start.
#[test]
#[ignore = "helper, not a test: the body of the child processes other tests start"]
fn zz_child_process_entry() {
    common::child_main();
}

#[test]
fn peer_killed_mid_batch_fails_within_deadline_then_restart_is_reached() {
    const LEN: u64 = 256 << 20;
    let mut target = ChildTarget::spawn(CHILD, 0, LEN, 1);
    let mut cfg = common::tcp_config();
    cfg.deadlines.transfer = Duration::from_secs(5);
    let initiator = Engine::new(cfg).unwrap();
    let local = registered(&initiator, LEN as usize, &[]);
    let peer = initiator.open_segment(&target.name).unwrap();
    let reqs: Vec<Request> = (0..64)
        .map(|i| {
            let off = i * (LEN / 64);
            Request {
                op: Op::Write,
                local: local.addr() + off,
                len: LEN / 64,
                peer,
                remote: target.addr + off,
            }
        })
        .collect();
    let batch = initiator.submit(&reqs, BatchOptions::default()).unwrap();
    target.freeze();
    std::thread::sleep(Duration::from_millis(50));
    target.kill();
    let start = Instant::now();
    let outcome = batch.wait();
    let waited = start.elapsed();
    assert!(waited < Duration::from_secs(6), "failed within the deadline, took {waited:?}");
    match outcome {
        Err(Error::PeerFailed { peer: p, .. }) => {
            assert_eq!(p.name, target.name);
            assert_eq!(p.id, Some(peer), "the error carries the handle open_segment gave");
        }
        other => panic!("expected a peer failure, got {other:?}"),
    }

    // The same name, restarted: reached again through the same handle, with a new instance.
    let port = common::port_of(&target.name);
    let restarted = ChildTarget::spawn(CHILD, port, 1 << 20, 9);
    assert_eq!(restarted.name, target.name);
    let back = registered(&initiator, 1 << 20, &[0xA5; 1 << 20]);
    let read =
        Request { op: Op::Read, local: back.addr(), len: 1 << 20, peer, remote: restarted.addr };
    initiator.transfer_sync(&[read], BatchOptions::default()).unwrap();
    assert!(back.to_vec() == random_bytes(1 << 20, 9), "read the restarted peer's bytes");
    drop(initiator);
}

/// Writes `len` random bytes (from `seed`) to `remote` on `target` and checks they landed
/// (the target is in this process, so its memory can be read directly).
fn write_and_check(initiator: &Engine, target: &str, remote: u64, len: usize, seed: u64) {
    let data = random_bytes(len, seed);
    let local = registered(initiator, len, &data);
    let peer = initiator.open_segment(target).unwrap();
    let req = Request { op: Op::Write, local: local.addr(), len: len as u64, peer, remote };
    initiator.transfer_sync(&[req], BatchOptions::default()).unwrap();
    assert!(peek(remote, len) == data, "every byte landed");
    initiator.unregister(local.addr()).unwrap();
}

/// Sends raw frames to an engine's RPC port.
fn raw_conn(e: &Engine) -> TcpStream {
    let s = TcpStream::connect(e.rpc_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

fn send_frame(s: &mut TcpStream, h: Header, payload: &[u8]) {
    s.write_all(&h.encode()).unwrap();
    s.write_all(payload).unwrap();
}

fn read_header(s: &mut TcpStream) -> Header {
    let mut raw = [0u8; HEADER_LEN];
    s.read_exact(&mut raw).unwrap();
    Header::decode(&raw).unwrap()
}

/// True when the server closed the connection (EOF or reset), within the read timeout.
fn dropped(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn target_refuses_accesses_outside_registered_memory() {
    let target = common::engine();
    let guard_before = registered(&target, 4096, &[0x11; 4096]);
    let region = registered(&target, 8192, &[0x22; 8192]);
    let mut s = raw_conn(&target);
    let junk = random_bytes(8192, 5);
    // Entirely outside, straddling the end, straddling the start, then a valid one.
    let cases = [
        (region.addr() + 8192, 4096, Status::AccessDenied),
        (region.addr() + 4096, 8192, Status::AccessDenied),
        (region.addr() - 16, 64, Status::AccessDenied),
        (0, 4096, Status::AccessDenied),
        (region.addr(), 8192, Status::Ok),
    ];
    for (i, (addr, len, want)) in cases.into_iter().enumerate() {
        send_frame(
            &mut s,
            Header::new(FrameKind::Write, i as u64, addr, len),
            &junk[..len as usize],
        );
        let ack = read_header(&mut s);
        assert_eq!(
            (ack.kind, ack.tag, ack.status),
            (FrameKind::WriteAck, i as u64, want),
            "case {i}"
        );
        if want != Status::Ok {
            assert!(region.to_vec() == vec![0x22; 8192], "case {i} left the region untouched");
            assert!(
                guard_before.to_vec() == vec![0x11; 4096],
                "case {i} left the neighbour untouched"
            );
        }
    }
    assert!(region.to_vec() == junk, "the valid write landed");
    send_frame(&mut s, Header::new(FrameKind::Read, 9, region.addr() + 8000, 400), &[]);
    let h = read_header(&mut s);
    assert_eq!((h.kind, h.status, h.len), (FrameKind::ReadData, Status::AccessDenied, 0));
    // After unregistration the same valid range is refused too.
    target.unregister(region.addr()).unwrap();
    send_frame(&mut s, Header::new(FrameKind::Write, 10, region.addr(), 16), &[0u8; 16]);
    assert_eq!(read_header(&mut s).status, Status::AccessDenied);
    assert!(region.to_vec() == junk, "nothing written after unregistration");
    drop(target);
}

#[test]
fn garbage_truncated_and_oversized_frames_drop_only_that_connection() {
    let mut cfg = common::config();
    cfg.deadlines.stall = Duration::from_secs(1);
    let target = Engine::new(cfg).unwrap();
    let remote = target.allocate_shared(4096).unwrap();

    let mut garbage = raw_conn(&target);
    garbage.write_all(&random_bytes(4096, 11)).unwrap();
    assert!(dropped(&mut garbage), "garbage drops the connection");

    let mut oversized = raw_conn(&target);
    let mut h = Header::new(FrameKind::Write, 1, remote, 16).encode();
    h[24..32].copy_from_slice(&(MAX_DATA_FRAME + 1).to_le_bytes());
    oversized.write_all(&h).unwrap();
    assert!(dropped(&mut oversized), "an oversized length prefix drops the connection");

    let mut huge_notify = raw_conn(&target);
    send_frame(&mut huge_notify, Header::new(FrameKind::Notify, 1, 0, u64::MAX / 2), &[]);
    assert!(dropped(&mut huge_notify));

    let mut stalled = raw_conn(&target);
    stalled.write_all(&Header::new(FrameKind::Write, 1, remote, 4096).encode()[..10]).unwrap();
    assert!(
        dropped(&mut stalled),
        "a frame stalled mid-header is dropped after the stall deadline"
    );

    let mut truncated = raw_conn(&target);
    send_frame(&mut truncated, Header::new(FrameKind::Write, 1, remote, 4096), &[7u8; 100]);
    drop(truncated);

    let mut wrong_direction = raw_conn(&target);
    send_frame(&mut wrong_direction, Header::new(FrameKind::WriteAck, 1, 0, 0), &[]);
    assert!(dropped(&mut wrong_direction));

    let mut bad_hello = raw_conn(&target);
    let mut h = Header::new(FrameKind::Hello, 1, 0, INSTANCE_LEN).encode();
    h[24..32].copy_from_slice(&3u64.to_le_bytes());
    bad_hello.write_all(&h).unwrap();
    assert!(dropped(&mut bad_hello));

    // The engine still serves a well-behaved initiator, and the truncated write left the
    // memory it was aimed at untouched beyond what arrived... or entirely: check it serves.
    let initiator = Engine::new(common::tcp_config()).unwrap();
    write_and_check(&initiator, target.name(), remote, 4096, 12);
    drop(initiator);
}

#[test]
fn unregistered_regions_refuse_later_requests_over_tcp_and_shm() {
    for force_tcp in [true, false] {
        let target = common::engine();
        let initiator =
            Engine::new(if force_tcp { common::tcp_config() } else { common::config() }).unwrap();
        let remote = target.allocate_shared(4096).unwrap();
        poke(remote, &[0x33; 4096]);
        let local = registered(&initiator, 4096, &random_bytes(4096, 2));
        let peer = initiator.open_segment(target.name()).unwrap();
        let req = Request { op: Op::Write, local: local.addr(), len: 4096, peer, remote };
        initiator.transfer_sync(&[req], BatchOptions::default()).unwrap();
        poke(remote, &[0x33; 4096]);
        target.unregister(remote).unwrap();
        match initiator.transfer_sync(&[req], BatchOptions::default()) {
            Err(Error::RemoteAccessDenied { addr, len, .. }) => {
                assert_eq!((addr, len), (remote, 4096))
            }
            other => panic!("force_tcp={force_tcp}: expected RemoteAccessDenied, got {other:?}"),
        }
        assert!(peek(remote, 4096) == vec![0x33; 4096], "force_tcp={force_tcp}: memory untouched");
        drop(initiator);
    }
}

#[test]
fn cancel_timeout_and_shutdown_fail_pending_requests_with_reasons() {
    let fake = FakePeer::start(0x10_0000, 1 << 20);
    let initiator = common::engine();
    let local = registered(&initiator, 1 << 20, &[]);
    let peer = initiator.open_segment(&fake.addr.to_string()).unwrap();
    let req = Request { op: Op::Read, local: local.addr(), len: 4096, peer, remote: 0x10_0000 };

    let b = initiator.submit(&[req, req], BatchOptions::default()).unwrap();
    assert!(b.wait_timeout(Duration::from_millis(50)).is_none(), "the fake peer never answers");
    b.cancel();
    assert!(matches!(b.wait(), Err(Error::Cancelled { .. })));
    assert!(b
        .statuses()
        .iter()
        .all(|s| matches!(s, RequestStatus::Failed(Error::Cancelled { .. }))));

    let opts = BatchOptions { timeout: Some(Duration::from_millis(200)), ..Default::default() };
    let start = Instant::now();
    let b = initiator.submit(&[req], opts).unwrap();
    assert!(matches!(b.wait(), Err(Error::Timeout { .. })));
    assert!(start.elapsed() < Duration::from_secs(2));

    let b = initiator.submit(&[req], BatchOptions::default()).unwrap();
    fake.kill_connections();
    assert!(
        matches!(b.wait(), Err(Error::PeerFailed { .. })),
        "a dead connection fails its requests"
    );

    let b = initiator.submit(&[req], BatchOptions::default()).unwrap();
    let start = Instant::now();
    initiator.shutdown();
    assert!(matches!(b.wait(), Err(Error::ShuttingDown { .. })), "{:?}", b.poll());
    assert!(start.elapsed() < Duration::from_secs(3), "shutdown joined every thread promptly");
    assert!(matches!(
        initiator.submit(&[req], BatchOptions::default()),
        Err(Error::ShuttingDown { .. })
    ));
}

#[test]
fn a_silent_peer_fails_pending_requests_after_the_stall_deadline() {
    let fake = FakePeer::start(0x10_0000, 1 << 20);
    let mut cfg = common::config();
    cfg.deadlines.stall = Duration::from_secs(1);
    let initiator = Engine::new(cfg).unwrap();
    let local = registered(&initiator, 4096, &[]);
    let peer = initiator.open_segment(&fake.addr.to_string()).unwrap();
    let req = Request { op: Op::Read, local: local.addr(), len: 4096, peer, remote: 0x10_0000 };
    let start = Instant::now();
    let b = initiator.submit(&[req], BatchOptions::default()).unwrap();
    match b.wait() {
        Err(Error::PeerFailed { reason, .. }) => {
            assert!(reason.contains("sent nothing"), "{reason}")
        }
        other => panic!("expected a silent-peer failure, got {other:?}"),
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "failed after the stall deadline, not the 30 s batch deadline: {took:?}"
    );
    drop(initiator);
}

#[test]
fn engines_started_at_once_bind_distinct_ports() {
    let engines: Vec<Engine> = std::thread::scope(|s| {
        let hs: Vec<_> =
            (0..8).map(|_| s.spawn(|| Engine::new(EngineConfig::default()).unwrap())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ports: Vec<u16> = engines.iter().map(|e| e.rpc_addr().port()).collect();
    assert!(ports.iter().all(|p| (15000..=17000).contains(p)));
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 8, "every engine bound its own port");
    // A port already taken is an error naming it, not a silent success.
    let taken = engines[0].rpc_addr().port();
    let e = Engine::new(EngineConfig { port: Some(taken), ..Default::default() }).unwrap_err();
    assert!(matches!(e, Error::Bind { .. }) && e.to_string().contains(&taken.to_string()), "{e}");
}

#[test]
fn metadata_server_unreachable_at_start_is_a_clear_error_within_the_deadline() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let uri = format!("http://{closed}/metadata");
    let mut cfg = common::config();
    cfg.metadata = MetadataUri::parse(&uri).unwrap();
    cfg.deadlines = Deadlines { connect: Duration::from_secs(1), ..Default::default() };
    let start = Instant::now();
    let e = Engine::new(cfg).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(matches!(e, Error::MetadataUnreachable { .. }) && e.to_string().contains(&uri), "{e}");
}

#[test]
fn http_metadata_two_named_engines() {
    let server = MetadataServer::start("127.0.0.1:0").unwrap();
    let named = |n: &str| EngineConfig {
        name: Some(n.into()),
        metadata: MetadataUri::parse(&server.url()).unwrap(),
        ..common::config()
    };
    let decode = Engine::new(named("decode-0")).unwrap();
    let prefill = Engine::new(named("prefill-0")).unwrap();
    let e = Engine::new(named("decode-0")).unwrap_err();
    assert!(matches!(e, Error::NameInUse { .. }), "a live engine's name is not taken over: {e}");
    let remote = decode.allocate_shared(65536).unwrap();
    let data = random_bytes(65536, 4);
    let local = registered(&prefill, 65536, &data);
    let peer = prefill.open_segment("decode-0").unwrap();
    prefill
        .transfer_sync(
            &[Request { op: Op::Write, local: local.addr(), len: 65536, peer, remote }],
            BatchOptions::default(),
        )
        .unwrap();
    assert!(peek(remote, 65536) == data);
    assert!(matches!(prefill.open_segment("nobody"), Err(Error::SegmentNotFound { .. })));
    decode.shutdown();
    let again = Engine::new(named("decode-0")).unwrap();
    assert_ne!(again.instance_id(), decode.instance_id());
    drop(prefill);
}

#[test]
fn notifications_arrive_after_the_data_over_every_transport() {
    for (force_tcp, same_engine) in [(true, false), (false, false), (false, true)] {
        let target = common::engine();
        let initiator = if same_engine {
            None
        } else {
            Some(
                Engine::new(if force_tcp { common::tcp_config() } else { common::config() })
                    .unwrap(),
            )
        };
        let sender = initiator.as_ref().unwrap_or(&target);
        let remote = target.allocate_shared(1 << 20).unwrap();
        let data = random_bytes(1 << 20, 8);
        let local = registered(sender, 1 << 20, &data);
        let peer = sender.open_segment(target.name()).unwrap();
        let reqs: Vec<Request> = (0..16u64)
            .map(|i| Request {
                op: Op::Write,
                local: local.addr() + i * 65536,
                len: 65536,
                peer,
                remote: remote + i * 65536,
            })
            .collect();
        let opts = BatchOptions {
            notify: Some(("kv-done".into(), "req-17".into())),
            ..Default::default()
        };
        sender.submit(&reqs, opts).unwrap().wait().unwrap();
        let mut got = Vec::new();
        assert!(eventually(Duration::from_secs(5), || {
            got.extend(target.take_notifications());
            !got.is_empty()
        }));
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].name.as_str(), got[0].message.as_str()), ("kv-done", "req-17"));
        assert_eq!(got[0].from, sender.name());
        assert!(peek(remote, 1 << 20) == data, "data visible when the notification is");
    }
}

#[test]
fn probe_reports_reachability() {
    let target = common::engine();
    let initiator = common::engine();
    let peer = initiator.open_segment(target.name()).unwrap();
    assert!(initiator.probe(peer).is_ok());
    target.shutdown();
    assert!(initiator.probe(peer).is_err());
}

#[test]
fn ipv6_loopback_works_when_available() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback on this machine");
        return;
    }
    let cfg = || EngineConfig { host: "::1".into(), ..common::config() };
    let target = Engine::new(cfg()).unwrap();
    assert!(target.name().starts_with("[::1]:"), "{}", target.name());
    let initiator =
        Engine::new(EngineConfig { host: "::1".into(), ..common::tcp_config() }).unwrap();
    let remote = target.allocate_shared(4096).unwrap();
    write_and_check(&initiator, target.name(), remote, 4096, 6);
    drop(initiator);
}

#[test]
fn an_initiator_draining_answers_slower_than_the_stall_deadline_is_not_dropped() {
    // A lane sends every READ header of its share at once, then reads the answers at ~10
    // MiB/s: the target stops reading while its answers pile up, which is back-pressure, not
    // a peer stalled mid-frame. Stall deadline 1 s, the drain takes ~4 s.
    const MIB: u64 = 1 << 20;
    let mut cfg = common::config();
    cfg.deadlines.stall = Duration::from_secs(1);
    let target = Engine::new(cfg).unwrap();
    let buf = registered(&target, 8 * MIB as usize, &random_bytes(8 * MIB as usize, 3));
    let mut s = raw_conn(&target);
    let mut hello = Header::new(FrameKind::Hello, 0, 0, INSTANCE_LEN).encode().to_vec();
    hello.extend_from_slice(&[0u8; INSTANCE_LEN as usize]);
    s.write_all(&hello).unwrap();
    let ack = read_header(&mut s);
    let mut id = vec![0u8; ack.payload_len() as usize];
    s.read_exact(&mut id).unwrap();
    let n = 40u64;
    for i in 0..n {
        let at = buf.addr() + (i % 8) * MIB;
        s.write_all(&Header::new(FrameKind::Read, i, at, MIB).encode()).unwrap();
    }
    let mut payload = vec![0u8; MIB as usize];
    for i in 0..n {
        let h = read_header(&mut s);
        assert_eq!((h.kind, h.tag, h.status), (FrameKind::ReadData, i, Status::Ok), "answer {i}");
        s.read_exact(&mut payload).unwrap();
        let off = ((i % 8) * MIB) as usize;
        assert!(payload == buf.to_vec()[off..off + MIB as usize], "payload {i}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(target);
}
