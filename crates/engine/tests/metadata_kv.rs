//! etcd and Redis metadata against real servers (started here on free ports; installed by
//! scripts/test.sh, found through `TIDEWIRE_ETCD_BIN` / `TIDEWIRE_REDIS_BIN` or the PATH).
//! Each test runs against every server it finds. A missing server fails the test when
//! `TIDEWIRE_REQUIRE_SERVERS=1` (scripts/test.sh sets it); otherwise the test leaves that
//! server out and prints `SKIPPED in <test>: <why>` on stderr, visible in a passing run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{
    etcd_cluster, etcd_put, eventually, random_bytes, redis, redis_cmd, registered, ChildTarget,
    Server,
};
use tidewire::{BatchOptions, Engine, EngineConfig, Error, MetadataUri, Op, Request};

const CHILD: &str = "zz_child_process_entry";

/// Not a test: the body of the child target process.
#[test]
#[ignore = "helper, not a test: the body of the child processes other tests start"]
fn zz_child_process_entry() {
    common::child_main();
}

enum Kv {
    Etcd(Vec<Server>),
    Redis(Server),
}

impl Kv {
    fn uri(&self) -> String {
        match self {
            Kv::Etcd(s) => {
                format!("etcd://{}", s.iter().map(Server::endpoint).collect::<Vec<_>>().join(","))
            }
            Kv::Redis(s) => format!("redis://{}", s.endpoint()),
        }
    }

    /// A single-member etcd and a redis, each when installed (see the module doc).
    fn both() -> Vec<Kv> {
        let mut v = Vec::new();
        if let Some(e) = etcd_cluster(1) {
            v.push(Kv::Etcd(e));
        }
        if let Some(r) = redis() {
            v.push(Kv::Redis(r));
        }
        v
    }

    fn put_raw(&self, key: &str, value: &[u8]) {
        match self {
            Kv::Etcd(s) => etcd_put(&s[0].endpoint(), key, value).unwrap(),
            Kv::Redis(s) => {
                redis_cmd(&s.endpoint(), &[b"SET", key.as_bytes(), value]).unwrap();
            }
        }
    }
}

const TTL: Duration = Duration::from_millis(1500);

fn config(uri: &str, name: &str) -> EngineConfig {
    EngineConfig {
        port: Some(0),
        name: Some(name.into()),
        metadata: MetadataUri::parse(uri).unwrap(),
        metadata_ttl: TTL,
        ..EngineConfig::default()
    }
}

fn child(uri: &str, name: &str, seed: u64) -> ChildTarget {
    ChildTarget::spawn_with(
        CHILD,
        0,
        1 << 20,
        seed,
        &[
            ("TW_CHILD_METADATA", uri.into()),
            ("TW_CHILD_NAME", name.into()),
            ("TW_CHILD_TTL_MS", TTL.as_millis().to_string()),
        ],
    )
}

fn read_back(e: &Engine, peer: tidewire::PeerId, remote: u64, len: usize) -> Vec<u8> {
    let buf = registered(e, len, &vec![0xA5; len]);
    e.transfer_sync(
        &[Request { op: Op::Read, local: buf.addr(), len: len as u64, peer, remote }],
        BatchOptions::default(),
    )
    .unwrap();
    let out = buf.to_vec();
    e.unregister(buf.addr()).unwrap();
    out
}

#[test]
fn two_processes_move_verified_data_through_etcd_and_redis() {
    for kv in Kv::both() {
        let uri = kv.uri();
        let target = child(&uri, "decode-0", 3);
        let initiator = Engine::new(config(&uri, "prefill-0")).unwrap();
        let peer = initiator.open_segment("decode-0").unwrap();
        assert!(
            read_back(&initiator, peer, target.addr, 1 << 20) == random_bytes(1 << 20, 3),
            "{uri}"
        );
        let data = random_bytes(1 << 20, 4);
        let src = registered(&initiator, 1 << 20, &data);
        initiator
            .transfer_sync(
                &[Request {
                    op: Op::Write,
                    local: src.addr(),
                    len: 1 << 20,
                    peer,
                    remote: target.addr,
                }],
                BatchOptions::default(),
            )
            .unwrap();
        assert!(read_back(&initiator, peer, target.addr, 1 << 20) == data, "{uri}");
        assert!(matches!(initiator.open_segment("nobody"), Err(Error::SegmentNotFound { .. })));
        drop(initiator);
    }
}

#[test]
fn a_killed_engine_disappears_when_its_lease_expires() {
    for kv in Kv::both() {
        let uri = kv.uri();
        let mut target = child(&uri, "victim", 5);
        let probe = Engine::new(config(&uri, "observer")).unwrap();
        probe.open_segment("victim").unwrap();
        target.kill();
        let start = Instant::now();
        let fresh = Engine::new(config(&uri, "observer-2")).unwrap();
        let gone = eventually(TTL * 8, || {
            matches!(fresh.open_segment("victim"), Err(Error::SegmentNotFound { .. }))
        });
        assert!(gone, "{uri}: the descriptor outlived its lease");
        assert!(start.elapsed() < TTL * 8, "{uri}");
    }
}

#[test]
fn a_changed_or_restarted_peer_invalidates_the_cache_without_traffic() {
    for kv in Kv::both() {
        let uri = kv.uri();
        let target = Engine::new(config(&uri, "changing")).unwrap();
        let initiator = Engine::new(config(&uri, "watcher")).unwrap();
        let peer = initiator.open_segment("changing").unwrap();
        assert!(initiator.peer_descriptor(peer).unwrap().regions.is_empty());
        // A registration on the target reaches the initiator's cache through the watch.
        let addr = target.allocate_shared(4096).unwrap();
        let seen = eventually(Duration::from_secs(5), || {
            initiator.peer_descriptor(peer).is_ok_and(|d| d.regions.iter().any(|r| r.addr == addr))
        });
        assert!(seen, "{uri}: the cached descriptor was not refreshed");
        // A restart under the same name (no connection was ever made) replaces the cache.
        drop(target);
        let restarted = Engine::new(config(&uri, "changing")).unwrap();
        let replaced = eventually(Duration::from_secs(5), || {
            initiator.peer_descriptor(peer).is_ok_and(|d| d.instance_id == restarted.instance_id())
        });
        assert!(replaced, "{uri}: the restarted peer's descriptor was not picked up");
    }
}

#[test]
fn a_metadata_server_restart_keeps_open_peers_working_and_republishes() {
    for mut kv in Kv::both() {
        let uri = kv.uri();
        let target = Engine::new(config(&uri, "steady")).unwrap();
        let remote = target.allocate_shared(65536).unwrap();
        let initiator = Engine::new(config(&uri, "client")).unwrap();
        let peer = initiator.open_segment("steady").unwrap();
        let data = random_bytes(65536, 6);
        let src = registered(&initiator, 65536, &data);
        let write = Request { op: Op::Write, local: src.addr(), len: 65536, peer, remote };
        initiator.transfer_sync(&[write], BatchOptions::default()).unwrap();
        match &mut kv {
            Kv::Etcd(s) => s[0].kill(),
            Kv::Redis(s) => s.kill(),
        }
        // Transfers to the open peer keep working; new opens and publications fail clearly.
        initiator.transfer_sync(&[write], BatchOptions::default()).unwrap();
        let e = initiator.open_segment("someone-else").unwrap_err();
        assert!(matches!(e, Error::MetadataUnreachable { .. }), "{uri}: {e}");
        assert!(
            matches!(target.allocate_shared(4096), Err(Error::MetadataUnreachable { .. })),
            "{uri}"
        );
        match &mut kv {
            Kv::Etcd(s) => s[0].start(),
            Kv::Redis(s) => s.start(),
        }
        // Back: the target's descriptor is published again by itself.
        let fresh = Engine::new(config(&uri, "late-joiner")).unwrap();
        let back = eventually(Duration::from_secs(10), || {
            fresh.open_segment("steady").is_ok_and(|p| {
                fresh.peer_descriptor(p).is_ok_and(|d| d.instance_id == target.instance_id())
            })
        });
        assert!(back, "{uri}: the descriptor was not published again");
        initiator.transfer_sync(&[write], BatchOptions::default()).unwrap();
        drop(initiator);
    }
}

#[test]
fn an_etcd_member_killed_fails_over_to_the_others() {
    let Some(mut members) = etcd_cluster(3) else { return };
    let uri =
        format!("etcd://{}", members.iter().map(Server::endpoint).collect::<Vec<_>>().join(","));
    let target = Engine::new(config(&uri, "ha-target")).unwrap();
    let remote = target.allocate_shared(4096).unwrap();
    members[0].kill();
    // Electing a new leader is etcd's business (slow on a loaded machine); what is tested is
    // that our client, whose first endpoint is now dead, fails over to the others.
    let elected = eventually(Duration::from_secs(40), || {
        etcd_put(&members[1].endpoint(), "tidewire-test/leader", b"1").is_ok()
    });
    assert!(elected, "the surviving members elected no leader");
    let initiator = Engine::new(config(&uri, "ha-initiator")).unwrap();
    let peer = initiator.open_segment("ha-target").unwrap();
    assert!(initiator.peer_descriptor(peer).unwrap().regions.iter().any(|r| r.addr == remote));
    // Publication goes on through the remaining members.
    let more = target.allocate_shared(4096).unwrap();
    let seen = eventually(Duration::from_secs(5), || {
        initiator.peer_descriptor(peer).is_ok_and(|d| d.regions.iter().any(|r| r.addr == more))
    });
    assert!(seen);
    drop(initiator);
}

#[test]
fn malformed_or_foreign_values_are_typed_errors_naming_the_key() {
    for kv in Kv::both() {
        let uri = kv.uri();
        kv.put_raw("tidewire/default/segments/garbage", b"{not json");
        kv.put_raw("tidewire/default/segments/foreign", b"{\"hello\": \"world\"}");
        let e = Engine::new(config(&uri, "reader")).unwrap();
        for name in ["garbage", "foreign"] {
            match e.open_segment(name) {
                Err(Error::Metadata { key, .. }) => {
                    assert_eq!(key, format!("tidewire/default/segments/{name}"))
                }
                other => panic!("{uri}: expected a metadata error naming the key, got {other:?}"),
            }
        }
    }
}

#[test]
fn unreachable_servers_are_named_within_the_connect_deadline() {
    let closed = [common::free_port(), common::free_port()];
    for uri in [
        format!("etcd://127.0.0.1:{},127.0.0.1:{}", closed[0], closed[1]),
        format!("redis://127.0.0.1:{}", closed[0]),
    ] {
        let start = Instant::now();
        let e = Engine::new(config(&uri, "lonely")).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(6));
        let text = e.to_string();
        assert!(matches!(e, Error::MetadataUnreachable { .. }), "{text}");
        assert!(text.contains(&closed[0].to_string()), "{text}");
        if uri.starts_with("etcd") {
            assert!(text.contains(&closed[1].to_string()), "every endpoint is named: {text}");
        }
    }
}
