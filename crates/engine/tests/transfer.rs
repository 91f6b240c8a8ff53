//! Two engines in one process: every transport, READ and WRITE, random data, poisoned
//! destinations, every byte checked.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{peek, poke, random_bytes, registered};
use tidewire::core::select::TransportKind;
use tidewire::{BatchOptions, EngineConfig, Error, Op, Request};

const POISON: u8 = 0xA5;

/// Writes random data from the initiator into the target and reads it back into poisoned
/// memory, in requests of several sizes (including multi-chunk ones; over shm the run passes
/// 16 MiB, where the copies take a new pin and in-flight mark).
fn round_trip(initiator_cfg: EngineConfig, target_shared: bool) {
    let sizes = [1usize, 4096, 65536 + 3, 5 << 20, 12 << 20, 4097];
    let total: usize = sizes.iter().sum();
    let target = common::engine();
    let initiator = tidewire::Engine::new(initiator_cfg).unwrap();
    let data = random_bytes(total, 7);
    let src = registered(&initiator, total, &data);
    let back = registered(&initiator, total, &vec![POISON; total]);
    let remote = if target_shared {
        let a = target.allocate_shared(total as u64).unwrap();
        poke(a, &vec![POISON; total]);
        a
    } else {
        let b = registered(&target, total, &vec![POISON; total]);
        let a = b.addr();
        std::mem::forget(b); // lives until the process ends; the engine unregisters it
        a
    };
    let peer = initiator.open_segment(target.name()).unwrap();
    let mut writes = Vec::new();
    let mut reads = Vec::new();
    let mut off = 0u64;
    for s in sizes {
        let s = s as u64;
        writes.push(Request {
            op: Op::Write,
            local: src.addr() + off,
            len: s,
            peer,
            remote: remote + off,
        });
        reads.push(Request {
            op: Op::Read,
            local: back.addr() + off,
            len: s,
            peer,
            remote: remote + off,
        });
        off += s;
    }
    initiator.transfer_sync(&writes, BatchOptions::default()).unwrap();
    assert!(peek(remote, total) == data, "target holds exactly the written bytes");
    initiator.transfer_sync(&reads, BatchOptions::default()).unwrap();
    assert!(back.to_vec() == data, "every byte read back matches");
}

#[test]
fn tcp_round_trip() {
    round_trip(common::tcp_config(), true);
    round_trip(common::config(), false);
}

#[test]
fn shm_round_trip() {
    round_trip(common::config(), true);
}

#[test]
fn selection_reasons_are_reported() {
    let target = common::engine();
    let initiator = common::engine();
    let _shared = target.allocate_shared(4096).unwrap();
    let plain = registered(&target, 4096, &[]);
    let peer = initiator.open_segment(target.name()).unwrap();
    let info = initiator.explain(peer).unwrap();
    assert!(info.same_host && !info.same_engine);
    let chosen: Vec<_> =
        info.regions.iter().map(|r| r.decision.as_ref().map(|c| c.transport).ok()).collect();
    assert_eq!(chosen.len(), 2);
    assert!(
        chosen.contains(&Some(TransportKind::Shm)) && chosen.contains(&Some(TransportKind::Tcp))
    );
    drop(target);
    drop(plain);
}

#[test]
fn local_transport_within_one_engine() {
    let e = common::engine();
    let data = random_bytes(8192, 3);
    let a = registered(&e, 8192, &data);
    let b = registered(&e, 8192, &[POISON; 8192]);
    let me = e.open_segment(e.name()).unwrap();
    let info = e.explain(me).unwrap();
    assert!(info
        .regions
        .iter()
        .all(|r| r.decision.as_ref().is_ok_and(|c| c.transport == TransportKind::Local)));
    e.transfer_sync(
        &[Request { op: Op::Write, local: a.addr(), len: 8192, peer: me, remote: b.addr() }],
        BatchOptions::default(),
    )
    .unwrap();
    assert!(b.to_vec() == data);
    drop(e);
}

#[test]
fn bad_requests_fail_at_submit_with_typed_errors() {
    let target = common::engine();
    let initiator = common::engine();
    let remote = target.allocate_shared(4096).unwrap();
    let local = registered(&initiator, 4096, &[]);
    let peer = initiator.open_segment(target.name()).unwrap();
    let req = Request { op: Op::Write, local: local.addr(), len: 4096, peer, remote };
    let err =
        |r: Request| initiator.submit(&[r], BatchOptions::default()).expect_err("submit refuses");
    assert!(matches!(err(Request { len: 0, ..req }), Error::InvalidArgument { .. }));
    assert!(matches!(err(Request { local: 0x10, ..req }), Error::NotRegistered { .. }));
    assert!(matches!(err(Request { remote: remote + 1, ..req }), Error::RemoteAccessDenied { .. }));
    assert!(matches!(err(Request { remote: 0x1000, ..req }), Error::RemoteAccessDenied { .. }));
    assert!(initiator.submit(&[], BatchOptions::default()).is_err());
    // One bad request after a run of good ones (same regions) fails the whole submission.
    let with = |bad: Request| {
        let mut batch = vec![req; 100];
        batch.push(bad);
        batch.extend([req; 10]);
        initiator.submit(&batch, BatchOptions::default()).expect_err("submit refuses")
    };
    let e = with(Request { remote: remote + 1, ..req });
    assert!(matches!(e, Error::RemoteAccessDenied { addr, .. } if addr == remote + 1), "{e}");
    assert!(matches!(with(Request { len: 0, ..req }), Error::InvalidArgument { .. }));
    let e = with(Request { local: local.addr() + 1, ..req });
    assert!(matches!(e, Error::NotRegistered { .. }), "{e}");
    // A transport configuration that reaches nothing: every transport's refusal is named.
    let mut cfg = common::config();
    cfg.transports.enabled.clear();
    let lonely = tidewire::Engine::new(cfg).unwrap();
    let lb = registered(&lonely, 4096, &[]);
    let p = lonely.open_segment(target.name()).unwrap();
    let e = lonely
        .submit(&[Request { peer: p, local: lb.addr(), ..req }], BatchOptions::default())
        .err()
        .unwrap();
    let text = e.to_string();
    assert!(
        matches!(e, Error::NoTransport { .. })
            && text.contains("tcp: no")
            && text.contains("shm: no"),
        "{text}"
    );
    drop(lonely);
    drop(initiator);
}

#[test]
fn large_mixed_batches_move_every_byte() {
    const N: usize = 2048;
    const B: usize = 4096;
    let target = common::engine();
    let initiator = common::engine();
    let shared = target.allocate_shared((N * B) as u64).unwrap();
    poke(shared, &vec![POISON; N * B]);
    let plain = registered(&target, N * B, &vec![POISON; N * B]);
    let data = random_bytes(2 * N * B, 21);
    let src = registered(&initiator, 2 * N * B, &data);
    let peer = initiator.open_segment(target.name()).unwrap();
    // Interleave shm and tcp requests, scattered: request i goes to slot (i * 7919) % N.
    let mut writes = Vec::new();
    for i in 0..N {
        let slot = ((i * 7919) % N * B) as u64;
        writes.push(Request {
            op: Op::Write,
            local: src.addr() + (i * B) as u64,
            len: B as u64,
            peer,
            remote: shared + slot,
        });
        writes.push(Request {
            op: Op::Write,
            local: src.addr() + ((N + i) * B) as u64,
            len: B as u64,
            peer,
            remote: plain.addr() + slot,
        });
    }
    initiator.transfer_sync(&writes, BatchOptions::default()).unwrap();
    let (got_shm, got_tcp) = (peek(shared, N * B), plain.to_vec());
    for i in 0..N {
        let slot = (i * 7919) % N * B;
        assert!(got_shm[slot..slot + B] == data[i * B..(i + 1) * B], "shm request {i}");
        assert!(got_tcp[slot..slot + B] == data[(N + i) * B..(N + i + 1) * B], "tcp request {i}");
    }
    // Read everything back into poisoned memory with the reverse requests.
    let back = registered(&initiator, 2 * N * B, &vec![POISON; 2 * N * B]);
    let reads: Vec<Request> = writes
        .iter()
        .map(|w| Request { op: Op::Read, local: w.local - src.addr() + back.addr(), ..*w })
        .collect();
    initiator.transfer_sync(&reads, BatchOptions::default()).unwrap();
    assert!(back.to_vec() == data, "every byte read back");
    drop(initiator);
    drop(target);
}

#[test]
fn opening_a_segment_again_returns_the_same_handle() {
    let target = common::engine();
    let initiator = common::engine();
    let a = initiator.open_segment(target.name()).unwrap();
    let b = initiator.open_segment(target.name()).unwrap();
    assert_eq!(a, b);
    let me = initiator.open_segment(initiator.name()).unwrap();
    assert_eq!(initiator.open_segment(initiator.name()).unwrap(), me);
}

/// A raw RPC connection speaking the revocation frames as a peer on another host would.
struct RawLease(std::net::TcpStream);

impl RawLease {
    fn open(engine: &tidewire::Engine) -> Self {
        use tidewire::core::wire::{FrameKind, Header, INSTANCE_LEN};
        let s = std::net::TcpStream::connect(engine.rpc_addr()).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut lease = Self(s);
        let mut hello = Header::new(FrameKind::Hello, 0, 0, INSTANCE_LEN).encode().to_vec();
        hello.extend_from_slice(&[0u8; 16]);
        let (h, _) = lease.call(&hello);
        assert_eq!(h.kind, FrameKind::HelloAck);
        lease
    }

    fn call(&mut self, frame: &[u8]) -> (tidewire::core::wire::Header, Vec<u8>) {
        use std::io::{Read, Write};
        self.0.write_all(frame).unwrap();
        let mut raw = [0u8; tidewire::core::wire::HEADER_LEN];
        self.0.read_exact(&mut raw).unwrap();
        let h = tidewire::core::wire::Header::decode(&raw).unwrap();
        let mut payload = vec![0u8; h.payload_len() as usize];
        self.0.read_exact(&mut payload).unwrap();
        (h, payload)
    }

    fn send(
        &mut self,
        kind: tidewire::core::wire::FrameKind,
        id: u64,
    ) -> tidewire::core::wire::Status {
        let (h, _) = self.call(&tidewire::core::wire::Header::new(kind, 7, id, 0).encode());
        assert_eq!(h.addr, id);
        h.status
    }
}

#[test]
fn marks_taken_over_rpc_hold_unregister_until_left_or_disconnected() {
    use tidewire::core::wire::{FrameKind, Status};
    let target = std::sync::Arc::new(common::engine());
    let id_of = |addr: u64| {
        target.descriptor().regions.iter().find(|r| r.addr == addr).map(|r| r.id.0).unwrap()
    };
    let a = target.allocate_shared(4096).unwrap();
    let b = target.allocate_shared(4096).unwrap();
    let (ida, idb) = (id_of(a), id_of(b));
    let mut lease = RawLease::open(&target);
    assert_eq!(lease.send(FrameKind::Enter, ida), Status::Ok);
    assert_eq!(lease.send(FrameKind::Leave, 999_999), Status::BadRequest, "never entered");
    // Unregistering waits for the mark...
    let t2 = target.clone();
    let freeing = std::thread::spawn(move || t2.free_shared(a));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!freeing.is_finished(), "free_shared returned while a copy was marked in flight");
    // ...and new marks are refused meanwhile.
    let mut other = RawLease::open(&target);
    assert_eq!(other.send(FrameKind::Enter, ida), Status::AccessDenied);
    assert_eq!(lease.send(FrameKind::Leave, ida), Status::Ok);
    freeing.join().unwrap().unwrap();
    // A peer that disappears with a mark held releases it with its connection.
    assert_eq!(other.send(FrameKind::Enter, idb), Status::Ok);
    drop(other);
    target.free_shared(b).unwrap();
    assert_eq!(lease.send(FrameKind::Enter, idb), Status::AccessDenied, "unregistered");
}

#[test]
fn complete_on_a_stream_is_refused_for_tcp_and_needs_nothing_for_host_copies() {
    let target = common::engine();
    let initiator = common::engine();
    let shared = target.allocate_shared(8192).unwrap();
    let plain = registered(&target, 8192, &[POISON; 8192]);
    let data = random_bytes(8192, 4);
    let src = registered(&initiator, 8192, &data);
    let peer = initiator.open_segment(target.name()).unwrap();
    // A stream handle that is never touched: no GPU copy in these batches.
    let opts = || BatchOptions { complete_on: Some(0xdead_beef), ..Default::default() };
    let write = |remote| Request { op: Op::Write, local: src.addr(), len: 8192, peer, remote };
    // shm copies finish inside submit: nothing for a stream to wait for.
    initiator.submit(&[write(shared)], opts()).unwrap().wait().unwrap();
    assert!(peek(shared, 8192) == data);
    // tcp bytes land on a host thread: refused at submit, nothing moved.
    let err = initiator.submit(&[write(plain.addr())], opts()).unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument { reason } if reason.contains("tcp")), "{err}");
    assert!(plain.to_vec() == vec![POISON; 8192], "nothing of a refused batch moved");
    drop(target);
    drop(plain);
}

#[test]
fn shared_memory_of_an_engine_without_shm_is_offered_to_tcp_and_moves() {
    let cfg = EngineConfig { port: Some(0), enable_shm: false, ..Default::default() };
    let target = tidewire::Engine::new(cfg).unwrap();
    let remote = target.allocate_shared(8192).unwrap();
    poke(remote, &[POISON; 8192]);
    let initiator = common::engine();
    let peer = initiator.open_segment(target.name()).unwrap();
    let data = random_bytes(8192, 12);
    let src = registered(&initiator, 8192, &data);
    let req = Request { op: Op::Write, local: src.addr(), len: 8192, peer, remote };
    initiator.transfer_sync(&[req], BatchOptions::default()).unwrap();
    assert!(peek(remote, 8192) == data);
    let info = initiator.explain(peer).unwrap();
    let chosen = info.regions[0].decision.as_ref().map(|c| c.transport).ok();
    assert_eq!(chosen, Some(TransportKind::Tcp), "no shm reach without the shm socket");
}
