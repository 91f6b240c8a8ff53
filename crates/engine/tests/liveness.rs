//! Dead peers, on every transport that can lose one (shm, tcp and fabric over libfabric's tcp
//! provider here; nvlink and mnnvl in gpu.rs): a peer SIGKILLed while batches stream to it fails them with a reason, nothing of
//! it stays mapped, and the restarted peer is reached again. A stopped peer is not dead.
//! (`local` has no peer to lose: the peer is the engine itself.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{eventually, port_of, random_bytes, registered, status, ChildTarget, FakePeer};
use tidewire::core::select::TransportKind;
use tidewire::{
    BatchOptions, DeathCheck, Engine, EngineConfig, Error, Op, PeerId, PeerState, Request,
    RequestStatus,
};

const CHILD: &str = "zz_child_process_entry";
const LEN: u64 = 1 << 20;
const PAGE: u64 = 4096;
const POISON: u8 = 0xA5;

/// Not a test: the body of the child target process the tests below start.
#[test]
#[ignore = "helper, not a test: the body of the child processes other tests start"]
fn zz_child_process_entry() {
    common::child_main();
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Via {
    Shm,
    /// shm, the target offering no liveness word: the initiator peeks at the socket.
    ShmPeek,
    Tcp,
    Fabric,
}

fn initiator(via: Via) -> Engine {
    let cfg = match via {
        Via::Shm | Via::ShmPeek => common::config(),
        Via::Tcp => common::tcp_config(),
        Via::Fabric => {
            // The child's region is shareable memory: without shm here, the fabric reaches it.
            let mut c = common::fabric_config();
            c.transports.enabled.remove(&TransportKind::Shm);
            c
        }
    };
    Engine::new(cfg).unwrap()
}

/// A child target, serving its region over the fabric too when `via` is `Fabric`.
fn child(via: Via, port: u16, seed: u64) -> ChildTarget {
    let env: Vec<(&str, String)> = match via {
        Via::Fabric => vec![("TW_CHILD_FABRIC", "tcp".into())],
        Via::ShmPeek => vec![("TW_CHILD_NO_WORD", "1".into())],
        _ => Vec::new(),
    };
    ChildTarget::spawn_with(CHILD, port, LEN, seed, &env)
}

/// 64 scattered 4 KiB writes from `local` into the peer's region at `remote`.
fn page_writes(peer: PeerId, local: u64, remote: u64) -> Vec<Request> {
    (0..64)
        .map(|i| {
            let off = (i * 7 % 64) * PAGE;
            Request { op: Op::Write, local: local + off, len: PAGE, peer, remote: remote + off }
        })
        .collect()
}

/// Reads the peer's whole region into poisoned memory and checks it holds `expect`.
fn read_back(e: &Engine, peer: PeerId, remote: u64, expect: &[u8]) {
    let back = registered(e, expect.len(), &vec![POISON; expect.len()]);
    let req = Request { op: Op::Read, local: back.addr(), len: expect.len() as u64, peer, remote };
    e.transfer_sync(&[req], BatchOptions::default()).unwrap();
    assert!(back.to_vec() == expect, "every byte read back matches");
    e.unregister(back.addr()).unwrap();
}

/// What happened to one call of the stream.
struct Call {
    start: Instant,
    end: Instant,
    result: Result<(), Error>,
}

fn sigcont(child: &std::process::Child) {
    let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
}

/// The peer is SIGKILLed while batches stream to it: the first failure comes within
/// `first_within` of its death, every call after the death fails, none takes longer than the
/// transfer deadline, the mappings held for it drop to zero, and the same name restarted is
/// reached again with fresh mappings and verified byte for byte.
fn killed_mid_stream_then_restarted(via: Via, first_within: Duration) {
    let target = Arc::new(Mutex::new(child(via, 0, 1)));
    let (name, remote) = {
        let t = target.lock().unwrap();
        (t.name.clone(), t.addr)
    };
    let e = initiator(via);
    let deadline = e.config().deadlines.transfer;
    let data = random_bytes(LEN as usize, 2);
    let src = registered(&e, LEN as usize, &data);
    let peer = e.open_segment(&name).unwrap();
    let batch = page_writes(peer, src.addr(), remote);
    e.transfer_sync(&batch, BatchOptions::default()).unwrap();
    let chosen = e.explain_from(peer, Some(src.addr())).unwrap().regions[0].decision.clone();
    let shm = matches!(via, Via::Shm | Via::ShmPeek);
    let expect = match via {
        Via::Shm | Via::ShmPeek => TransportKind::Shm,
        Via::Tcp => TransportKind::Tcp,
        Via::Fabric => TransportKind::Fabric,
    };
    assert_eq!(chosen.map(|c| c.transport), Ok(expect), "the test runs on the transport it names");
    let check = match via {
        Via::Shm => Some(DeathCheck::Word),
        Via::ShmPeek => Some(DeathCheck::SocketPeek),
        _ => None,
    };
    assert_eq!(status(&e, peer).death_check, check, "{via:?}: how a death is seen");
    if shm {
        assert!(status(&e, peer).mappings > 0, "the shm path maps the peer's region");
    }

    // The killer: after 100 ms of streaming, SIGKILL and reap (the kernel has closed every
    // socket of the process once it is reaped).
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let killer = {
        let (t, k) = (target.clone(), killed_at.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            t.lock().unwrap().kill();
            *k.lock().unwrap() = Some(Instant::now());
        })
    };
    let mut calls = Vec::new();
    let limit = Instant::now() + first_within + Duration::from_secs(5);
    while Instant::now() < limit && !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let result = e.transfer_sync(&batch, BatchOptions::default());
        let end = Instant::now();
        calls.push(Call { start, end, result });
        let dead = killed_at.lock().unwrap().is_some();
        let failures = calls.iter().filter(|c| c.result.is_err()).count();
        if dead && failures >= 20 {
            stop.store(true, Ordering::Relaxed);
        }
    }
    killer.join().unwrap();
    let killed = killed_at.lock().unwrap().unwrap();

    let first = calls.iter().position(|c| c.result.is_err()).expect("a call failed");
    let fail = &calls[first];
    assert!(
        fail.end.saturating_duration_since(killed) < first_within,
        "{via:?}: first failure {:?} after the death (bound {first_within:?})",
        fail.end.saturating_duration_since(killed)
    );
    assert!(calls[first..].iter().all(|c| c.result.is_err()), "no call succeeds after a failure");
    assert!(
        calls.iter().filter(|c| c.start > killed).all(|c| c.result.is_err()),
        "every call started after the death fails"
    );
    let longest = calls.iter().map(|c| c.end - c.start).max().unwrap();
    assert!(longest < deadline, "{via:?}: a call took {longest:?} (deadline {deadline:?})");
    for c in &calls[first..] {
        match c.result.as_ref().unwrap_err() {
            Error::PeerFailed { peer: p, reason, .. } => {
                assert_eq!((&p.name, p.id), (&name, Some(peer)));
                if shm {
                    assert!(reason.contains("the peer process exited"), "reason: {reason}");
                }
            }
            // tcp (and the fabric peer's lanes): once the lanes are gone, re-connecting to
            // the dead port is refused.
            Error::PeerUnreachable { peer: p, .. } if !shm => {
                assert_eq!((&p.name, p.id), (&name, Some(peer)))
            }
            other => panic!("{via:?}: unexpected error after the death: {other}"),
        }
    }
    let released = eventually(Duration::from_secs(5), || {
        let s = status(&e, peer);
        s.mappings == 0 && matches!(s.state, PeerState::Retired(_))
    });
    assert!(
        released,
        "{via:?}: the dead peer is retired with nothing mapped: {:?}",
        status(&e, peer)
    );

    // The same name, restarted (same port, new instance): reached again, fresh mappings.
    let old_instance = status(&e, peer).instance;
    let restarted = child(via, port_of(&name), 3);
    assert_eq!(restarted.name, name);
    read_back(&e, peer, restarted.addr, &random_bytes(LEN as usize, 3));
    e.transfer_sync(&page_writes(peer, src.addr(), restarted.addr), BatchOptions::default())
        .unwrap();
    let mut expect = random_bytes(LEN as usize, 3);
    for r in page_writes(peer, src.addr(), restarted.addr) {
        let off = (r.remote - restarted.addr) as usize;
        expect[off..off + PAGE as usize].copy_from_slice(&data[off..off + PAGE as usize]);
    }
    read_back(&e, peer, restarted.addr, &expect);
    let s = status(&e, peer);
    assert_eq!(s.state, PeerState::Open);
    assert_ne!(s.instance, old_instance);
    if shm {
        assert!(s.mappings > 0, "the restarted peer is mapped afresh");
        assert_eq!(s.death_check, check, "{via:?}: the restarted peer is checked the same way");
    }
    drop(restarted);
    drop(e);
}

#[test]
fn shm_peer_killed_mid_stream_fails_within_a_second_releases_and_comes_back() {
    killed_mid_stream_then_restarted(Via::Shm, Duration::from_secs(1));
}

#[test]
fn shm_peer_without_a_liveness_word_killed_mid_stream_fails_within_a_second_and_comes_back() {
    killed_mid_stream_then_restarted(Via::ShmPeek, Duration::from_secs(1));
}

#[test]
fn tcp_peer_killed_mid_stream_fails_within_the_stall_deadline_and_comes_back() {
    let stall = EngineConfig::default().deadlines.stall;
    killed_mid_stream_then_restarted(Via::Tcp, stall);
}

#[test]
fn fabric_peer_killed_mid_stream_fails_within_a_second_and_comes_back() {
    if let Some(why) = common::fabric_missing() {
        eprintln!("skipped: {why}");
        return;
    }
    killed_mid_stream_then_restarted(Via::Fabric, Duration::from_secs(1));
}

/// A stopped fabric peer answers nothing: the batch fails at its deadline, the operations
/// the provider still holds are given up (the peer's address removed), so the local buffer
/// can be unregistered within a bounded time; the killed peer is then an error at once.
#[test]
fn a_stopped_fabric_peer_fails_at_the_deadline_and_releases_the_local_buffer() {
    if let Some(why) = common::fabric_missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut target = child(Via::Fabric, 0, 4);
    let e = initiator(Via::Fabric);
    let data = random_bytes(LEN as usize, 5);
    let src = registered(&e, LEN as usize, &data);
    let peer = e.open_segment(&target.name).unwrap();
    let whole = |op| Request { op, local: src.addr(), len: LEN, peer, remote: target.addr };
    read_back(&e, peer, target.addr, &random_bytes(LEN as usize, 4));
    target.freeze();
    let opts = BatchOptions { timeout: Some(Duration::from_millis(300)), ..Default::default() };
    let started = Instant::now();
    let err = e.transfer_sync(&[whole(Op::Read)], opts).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // The read's local range is released: unregistration returns (bounded by the test's
    // watchdog), and the buffer holds nothing the stopped peer sent.
    let unregistered = Instant::now();
    e.unregister(src.addr()).unwrap();
    assert!(unregistered.elapsed() < Duration::from_secs(5), "{:?}", unregistered.elapsed());
    target.kill();
    sigcont(&target.child);
    let src2 = registered(&e, LEN as usize, &data);
    let killed = Instant::now();
    let req = Request { op: Op::Write, local: src2.addr(), len: LEN, peer, remote: target.addr };
    let err = e.transfer_sync(&[req], BatchOptions::default()).unwrap_err();
    assert!(killed.elapsed() < Duration::from_secs(5), "{:?}", killed.elapsed());
    assert!(matches!(err, Error::PeerFailed { .. } | Error::PeerUnreachable { .. }), "{err}");
}

#[test]
fn a_stopped_shm_peer_keeps_completing_and_dies_only_when_killed() {
    let mut target = ChildTarget::spawn(CHILD, 0, LEN, 4);
    let e = initiator(Via::Shm);
    let data = random_bytes(LEN as usize, 5);
    let src = registered(&e, LEN as usize, &data);
    let peer = e.open_segment(&target.name).unwrap();
    let remote = target.addr;
    let whole = |op| Request { op, local: src.addr(), len: LEN, peer, remote };
    // Map the region while the peer can still answer the socket.
    read_back(&e, peer, target.addr, &random_bytes(LEN as usize, 4));
    assert_eq!(status(&e, peer).death_check, Some(DeathCheck::Word));

    // Stopped: its memory is still there and will be read when it resumes.
    target.freeze();
    for _ in 0..10 {
        e.transfer_sync(&[whole(Op::Write)], BatchOptions::default()).unwrap();
    }
    assert_eq!(status(&e, peer).state, PeerState::Open, "a stopped peer is not dead");
    sigcont(&target.child);
    read_back(&e, peer, target.addr, &data);

    // Stopped, then killed: the death ends it.
    target.freeze();
    e.transfer_sync(&[whole(Op::Write)], BatchOptions::default()).unwrap();
    target.kill();
    let killed = Instant::now();
    let err = e.transfer_sync(&[whole(Op::Write)], BatchOptions::default()).unwrap_err();
    assert!(killed.elapsed() < Duration::from_secs(1));
    assert!(
        matches!(&err, Error::PeerFailed { reason, .. } if reason.contains("the peer process exited")),
        "{err}"
    );
    assert!(eventually(Duration::from_secs(5), || status(&e, peer).mappings == 0));
}

#[test]
fn a_peer_engine_shut_down_and_started_again_in_the_same_process_is_released_and_reached() {
    let first = common::engine();
    let port = first.rpc_addr().port();
    let remote = first.allocate_shared(LEN).unwrap();
    common::poke(remote, &random_bytes(LEN as usize, 6));
    let e = initiator(Via::Shm);
    let peer = e.open_segment(first.name()).unwrap();
    read_back(&e, peer, remote, &random_bytes(LEN as usize, 6));
    assert!(status(&e, peer).mappings > 0);
    let first_instance = first.instance_id();
    drop(first);
    let released = eventually(Duration::from_secs(5), || {
        let s = status(&e, peer);
        s.mappings == 0 && matches!(s.state, PeerState::Retired(_))
    });
    assert!(released, "the old instance's mappings are released: {:?}", status(&e, peer));

    let second = Engine::new(EngineConfig { port: Some(port), ..EngineConfig::default() }).unwrap();
    assert_ne!(second.instance_id(), first_instance);
    let remote = second.allocate_shared(LEN).unwrap();
    common::poke(remote, &random_bytes(LEN as usize, 7));
    read_back(&e, peer, remote, &random_bytes(LEN as usize, 7));
    let s = status(&e, peer);
    assert_eq!((s.state, s.instance), (PeerState::Open, second.instance_id()));
    assert!(s.mappings > 0);
}

#[test]
fn a_batch_nobody_waits_on_times_out_at_its_deadline() {
    let fake = FakePeer::start(0x1000_0000, 1 << 20);
    let e = initiator(Via::Tcp);
    let local = registered(&e, 1 << 16, &[1; 1 << 16]);
    let peer = e.open_segment(&fake.addr.to_string()).unwrap();
    let reqs: Vec<Request> = (0..4)
        .map(|i| Request {
            op: Op::Write,
            local: local.addr() + i * PAGE,
            len: PAGE,
            peer,
            remote: 0x1000_0000 + i * PAGE,
        })
        .collect();
    let opts = BatchOptions { timeout: Some(Duration::from_millis(200)), ..Default::default() };
    let handle = e.submit(&reqs, opts).unwrap();
    // Nobody polls: `counts` reads the state without checking the deadline itself.
    let ended = eventually(Duration::from_secs(5), || handle.counts() == (0, 4, 0));
    assert!(ended, "the batch ended by itself: {:?}", handle.counts());
    for s in handle.statuses() {
        assert!(matches!(s, RequestStatus::Failed(Error::Timeout { .. })), "{s:?}");
    }
}

/// A same-host process maps our shared region (its mapping holds an in-use mark there) and is
/// SIGKILLed while our `free_shared` waits for the mark: the free ends (the dead process's
/// slot detaches; its mark is not waited for), not after the stall deadline with an error.
/// The revocation once looked at which initiators were attached only when it began.
#[test]
fn a_free_waiting_for_a_mapping_ends_when_the_mapping_process_dies() {
    let mut cfg = common::config();
    cfg.deadlines.stall = Duration::from_secs(30);
    let e = Engine::new(cfg).unwrap();
    let addr = e.allocate_shared(LEN).unwrap();
    let env = [("TW_CHILD_MAP", format!("{} {addr} {LEN}", e.name()))];
    let (mut child, _lines, _ready) = common::spawn_child(CHILD, &env, Duration::from_secs(20));
    let pid = child.id();
    let killer = std::thread::spawn(move || {
        // The free is waiting for the mark by then (the child holds it until it dies).
        std::thread::sleep(Duration::from_millis(300));
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    });
    let freed = e.free_shared(addr);
    killer.join().unwrap();
    let _ = child.wait();
    assert!(freed.is_ok(), "the free waited for a dead process's mark: {freed:?}");
}

#[test]
fn a_mapped_shm_peer_is_written_through_its_pointer_and_tells_when_it_dies() {
    let mut target = ChildTarget::spawn(CHILD, 0, LEN, 8);
    let e = initiator(Via::Shm);
    let peer = e.open_segment(&target.name).unwrap();
    let off = 3 * PAGE + 5;
    let len = LEN - off - 7;
    let m = e.map_peer(peer, target.addr + off, len, None).unwrap();
    assert_eq!((m.device(), m.transport(), m.len()), (None, TransportKind::Shm, len));
    assert!(m.is_alive() && m.error().is_none());
    // The peer's bytes, read straight through the mapping.
    let initial = random_bytes(LEN as usize, 8);
    assert!(common::peek(m.addr(), len as usize) == initial[off as usize..(off + len) as usize]);
    // Written through the pointer, read back by the engine into poisoned memory.
    let data = random_bytes(len as usize, 9);
    common::poke(m.addr(), &data);
    let mut expect = initial.clone();
    expect[off as usize..(off + len) as usize].copy_from_slice(&data);
    read_back(&e, peer, target.addr, &expect);
    let held = status(&e, peer).mappings;
    assert!(held >= 1);

    // Memory only tcp reaches, and GPU use of host memory, are refused with the reason.
    let plain = e.map_peer(peer, target.addr, PAGE, Some(0)).unwrap_err();
    assert!(
        matches!(&plain, Error::NoTransport { refusals, .. } if refusals[0].reason.contains("host")),
        "{plain}"
    );
    let outside = e.map_peer(peer, target.addr + LEN, PAGE, None).unwrap_err();
    assert!(matches!(outside, Error::RemoteAccessDenied { .. }), "{outside}");

    target.kill();
    assert!(eventually(Duration::from_secs(1), || !m.is_alive()), "the handle sees the death");
    let why = m.error().unwrap().to_string();
    assert!(why.contains("the peer process exited"), "{why}");
    // The handle still holds its mapping (a kernel may be reading it) until it is dropped.
    assert!(status(&e, peer).mappings >= 1);
    drop(m);
    assert!(eventually(Duration::from_secs(5), || status(&e, peer).mappings == 0));
}

#[test]
fn map_peer_of_this_engine_is_its_own_memory_and_tcp_only_memory_is_refused() {
    let e = common::engine();
    let buf = registered(&e, 8192, &random_bytes(8192, 10));
    let me = e.open_segment(e.name()).unwrap();
    let m = e.map_peer(me, buf.addr() + 100, 1000, None).unwrap();
    assert_eq!((m.addr(), m.transport()), (buf.addr() + 100, TransportKind::Local));
    drop(m);

    let target = common::engine();
    let plain = registered(&target, 8192, &[0; 8192]);
    let peer = e.open_segment(target.name()).unwrap();
    let err = e.map_peer(peer, plain.addr(), 8192, None).unwrap_err();
    assert!(
        matches!(&err, Error::NoTransport { refusals, .. } if refusals[0].transport == TransportKind::Tcp),
        "{err}"
    );
    drop(target);
    drop(plain);
}
