//! Threads do not grow with peers: an initiator talking to 64 peers (over tcp, then over shm)
//! runs no more threads than one talking to a single peer (plus a small constant), and a
//! process serving those peers' connections runs none per connection.
//!
//! This file holds one test (and the child's entry), so that no other test of the same binary
//! starts threads while it counts them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{random_bytes, registered, spawn_child};
use tidewire::{BatchOptions, Engine, EngineConfig, HostBuffer, Op, Request};

const CHILD: &str = "zz_threads_targets";
const PEERS: usize = 64;
/// Threads a process may gain between 1 and 64 peers (timers, a late-starting helper).
const SLACK: usize = 4;

/// Not a test: the body of the child process holding the target engines.
#[test]
#[ignore = "helper, not a test: the body of the child process the test below starts"]
fn zz_threads_targets() {
    let Ok(n) = std::env::var("TW_THREADS_TARGETS") else { return };
    let n: usize = n.parse().unwrap();
    let shm = std::env::var("TW_THREADS_SHM").is_ok();
    let engines: Vec<(Engine, u64)> = (0..n)
        .map(|_| {
            let cfg = EngineConfig { port: Some(0), enable_shm: shm, ..EngineConfig::default() };
            let e = Engine::new(cfg).unwrap();
            if shm {
                let addr = e.allocate_shared(4096).unwrap();
                return (e, addr);
            }
            // Plain host memory: reached by tcp only.
            let buf = Arc::new(HostBuffer::new(4096).unwrap());
            let addr = buf.addr();
            e.register_buffer(buf, "cpu").unwrap();
            (e, addr)
        })
        .collect();
    let list: Vec<String> = engines.iter().map(|(e, a)| format!("{},{a}", e.name())).collect();
    println!("READY {}", list.join(" "));
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    std::process::exit(0);
}

fn threads_of(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count()
}

/// One test (see the file's doc): tcp peers, then shm peers.
#[test]
fn threads_do_not_grow_with_tcp_or_shm_peers() {
    count_threads(false);
    count_threads(true);
}

fn count_threads(shm: bool) {
    let mut env = vec![("TW_THREADS_TARGETS", PEERS.to_string())];
    if shm {
        env.push(("TW_THREADS_SHM", "1".into()));
    }
    let (mut child, _lines, ready) = spawn_child(CHILD, &env, Duration::from_secs(60));
    let child_pid = child.id().to_string();
    let targets: Vec<(String, u64)> = ready
        .split_whitespace()
        .map(|t| {
            let (name, addr) = t.split_once(',').unwrap();
            (name.to_string(), addr.parse().unwrap())
        })
        .collect();
    assert_eq!(targets.len(), PEERS);

    let force = |k: &str| (k == "MC_FORCE_TCP" && !shm).then(|| "1".into());
    let cfg = common::config().apply_env(force).unwrap();
    let initiator = Engine::new(cfg).unwrap();
    let data = random_bytes(4096, 3);
    let local = registered(&initiator, 4096, &data);
    let back = registered(&initiator, 4096, &[]);
    // Opens the peer and moves bytes both ways, so that every lane to it is connected.
    let touch = |(name, remote): &(String, u64)| {
        let peer = initiator.open_segment(name).unwrap();
        let write =
            Request { op: Op::Write, local: local.addr(), len: 4096, peer, remote: *remote };
        let read = Request { op: Op::Read, local: back.addr(), len: 4096, peer, remote: *remote };
        initiator.transfer_sync(&[write], BatchOptions::default()).unwrap();
        initiator.transfer_sync(&[read], BatchOptions::default()).unwrap();
        assert!(back.to_vec() == data, "read back what was written to {name}");
    };
    let child_before = threads_of(&child_pid);
    touch(&targets[0]);
    let (mine_1, child_1) = (threads_of("self"), threads_of(&child_pid));
    for t in &targets[1..] {
        touch(t);
    }
    let (mine_64, child_64) = (threads_of("self"), threads_of(&child_pid));
    // Shown with --nocapture; also in the failure message.
    let via = if shm { "shm" } else { "tcp" };
    let counts = format!(
        "{via}: initiator process: {mine_1} threads with 1 peer, {mine_64} with {PEERS}; \
         target process ({PEERS} engines): {child_before} before any connection, {child_1} \
         with 1 initiator peer connected, {child_64} with {PEERS}"
    );
    println!("{counts}");
    drop(initiator);
    let _ = child.kill();
    let _ = child.wait();
    assert!(mine_64 <= mine_1 + SLACK, "{counts}");
    assert!(child_64 <= child_1 + SLACK, "{counts}");
}
