//! Two engines in one process: every transport, READ and WRITE, random data, poisoned
//! destinations, every byte checked.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{peek, poke, random_bytes, registered};
use tidewire::core::select::TransportKind;
use tidewire::{BatchOptions, EngineConfig, Error, Op, Request};

const POISON: u8 = 0xA5;

/// Writes random data from the initiator into the target and reads it back into poisoned
/// memory, in requests of several sizes (including multi-chunk ones).
fn round_trip(initiator_cfg: EngineConfig, target_shared: bool) {
    let sizes = [1usize, 4096, 65536 + 3, 5 << 20];
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
    initiator
        .transfer_sync(&writes, BatchOptions::default())
        .unwrap();
    assert!(
        peek(remote, total) == data,
        "target holds exactly the written bytes"
    );
    initiator
        .transfer_sync(&reads, BatchOptions::default())
        .unwrap();
    assert!(back.to_vec() == data, "every byte read back matches");
}

#[test]
fn tcp_round_trip() {
    let cfg = EngineConfig {
        port: Some(0),
        ..Default::default()
    }
    .apply_env(|k| (k == "MC_FORCE_TCP").then(|| "1".into()))
    .unwrap();
    round_trip(cfg, true);
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
    let chosen: Vec<_> = info
        .regions
        .iter()
        .map(|r| r.decision.as_ref().map(|c| c.transport).ok())
        .collect();
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
    assert!(info.regions.iter().all(|r| r
        .decision
        .as_ref()
        .is_ok_and(|c| c.transport == TransportKind::Local)));
    e.transfer_sync(
        &[Request {
            op: Op::Write,
            local: a.addr(),
            len: 8192,
            peer: me,
            remote: b.addr(),
        }],
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
    let req = Request {
        op: Op::Write,
        local: local.addr(),
        len: 4096,
        peer,
        remote,
    };
    let err = |r: Request| {
        initiator
            .submit(&[r], BatchOptions::default())
            .err()
            .expect("submit refuses")
    };
    assert!(matches!(
        err(Request { len: 0, ..req }),
        Error::InvalidArgument { .. }
    ));
    assert!(matches!(
        err(Request { local: 0x10, ..req }),
        Error::NotRegistered { .. }
    ));
    assert!(matches!(
        err(Request {
            remote: remote + 1,
            ..req
        }),
        Error::RemoteAccessDenied { .. }
    ));
    assert!(matches!(
        err(Request {
            remote: 0x1000,
            ..req
        }),
        Error::RemoteAccessDenied { .. }
    ));
    assert!(initiator.submit(&[], BatchOptions::default()).is_err());
    // A transport configuration that reaches nothing: every transport's refusal is named.
    let mut cfg = common::config();
    cfg.transports.enabled.clear();
    let lonely = tidewire::Engine::new(cfg).unwrap();
    let lb = registered(&lonely, 4096, &[]);
    let p = lonely.open_segment(target.name()).unwrap();
    let e = lonely
        .submit(
            &[Request {
                peer: p,
                local: lb.addr(),
                ..req
            }],
            BatchOptions::default(),
        )
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
