//! The metrics endpoint scraped during two-process runs: the counters match what the test
//! moved (bytes, requests by transport, operation and peer), a killed peer's failures are
//! counted by error kind and its mappings go back to zero. One test: the registry is the
//! process's, so nothing else runs in this binary meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{eventually, random_bytes, registered, ChildTarget};
use tidewire::{BatchOptions, Engine, EngineConfig, Op, Request};

const CHILD: &str = "zz_child_process_entry";
const LEN: u64 = 1 << 20;
const PAGE: u64 = 4096;

#[test]
#[ignore = "helper, not a test: the body of the child processes other tests start"]
fn zz_child_process_entry() {
    common::child_main();
}

/// The value of the sample `name{labels}` in a scrape (labels in the order they are written).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: String =
        labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect::<Vec<_>>().join(",");
    let head = if labels.is_empty() { format!("{name} ") } else { format!("{name}{{{want}}} ") };
    text.lines().find_map(|l| l.strip_prefix(&head)).and_then(|v| v.trim().parse().ok())
}

fn scrape(e: &Engine) -> String {
    let addr = e.metrics_addr().expect("the endpoint runs");
    ureq::get(&format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(5))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

fn writes(peer: tidewire::PeerId, local: u64, remote: u64) -> Vec<Request> {
    (0..64)
        .map(|i| Request {
            op: Op::Write,
            local: local + i * PAGE,
            len: PAGE,
            peer,
            remote: remote + i * PAGE,
        })
        .collect()
}

#[test]
fn counters_match_what_moved_and_a_killed_peer_is_counted_and_released() {
    // Set before the registry exists (the first engine below starts it).
    std::env::set_var("TIDEWIRE_METRICS_MAX_PEERS", "8");
    // tcp: bytes and requests by transport, op and peer.
    let target = ChildTarget::spawn(CHILD, 0, LEN, 1);
    let cfg = EngineConfig { metrics_addr: Some("127.0.0.1:0".into()), ..common::tcp_config() };
    let e = Engine::new(cfg).unwrap();
    let src = registered(&e, LEN as usize, &random_bytes(LEN as usize, 2));
    let peer = e.open_segment(&target.name).unwrap();
    for _ in 0..10 {
        e.transfer_sync(&writes(peer, src.addr(), target.addr), BatchOptions::default()).unwrap();
    }
    let read = Request { op: Op::Read, local: src.addr(), len: LEN, peer, remote: target.addr };
    e.transfer_sync(&[read], BatchOptions::default()).unwrap();
    let text = scrape(&e);
    let w = [("transport", "tcp"), ("op", "write"), ("peer", target.name.as_str())];
    let r = [("transport", "tcp"), ("op", "read"), ("peer", target.name.as_str())];
    assert_eq!(sample(&text, "tidewire_bytes_total", &w), Some((10 * 64 * PAGE) as f64), "{text}");
    assert_eq!(sample(&text, "tidewire_requests_total", &w), Some(640.0));
    assert_eq!(sample(&text, "tidewire_bytes_total", &r), Some(LEN as f64));
    assert_eq!(sample(&text, "tidewire_batches_total", &[("outcome", "ok")]), Some(11.0));
    assert!(sample(&text, "tidewire_batch_seconds_count", &[("transport", "tcp")]) == Some(11.0));
    assert!(
        sample(&text, "tidewire_first_byte_seconds_count", &[("transport", "tcp")]) == Some(11.0)
    );
    assert!(sample(&text, "tidewire_open_peers", &[]).is_some_and(|n| n >= 1.0), "{text}");
    assert!(sample(&text, "tidewire_threads", &[]).is_some_and(|n| n >= 1.0));
    assert!(text.lines().any(|l| l.starts_with("tidewire_registered_bytes{kind=")), "{text}");

    // shm: mappings held for the peer, a killed peer's failure by kind, mappings back to 0.
    let mut shm_target = ChildTarget::spawn(CHILD, 0, LEN, 3);
    let s = Engine::new(common::config()).unwrap();
    let src2 = registered(&s, LEN as usize, &random_bytes(LEN as usize, 4));
    let p2 = s.open_segment(&shm_target.name).unwrap();
    s.transfer_sync(&writes(p2, src2.addr(), shm_target.addr), BatchOptions::default()).unwrap();
    let text = scrape(&e);
    let held = sample(&text, "tidewire_mappings", &[("peer", shm_target.name.as_str())]);
    assert!(held.is_some_and(|n| n >= 1.0), "the shm peer is mapped: {held:?}\n{text}");
    shm_target.kill();
    let err = s.transfer_sync(&writes(p2, src2.addr(), shm_target.addr), BatchOptions::default());
    let kind = format!("{:?}", err.unwrap_err().kind());
    let gone = eventually(Duration::from_secs(5), || {
        sample(&scrape(&e), "tidewire_mappings", &[("peer", shm_target.name.as_str())]) == Some(0.0)
    });
    assert!(gone, "the dead peer's mappings are released: {}", scrape(&e));
    // Counted under the transport that carried it, or `none` when the submission itself was
    // refused (the peer known dead before anything moved).
    let text = scrape(&e);
    let failed: f64 = ["shm", "none"]
        .iter()
        .filter_map(|t| {
            let f = [("kind", kind.as_str()), ("transport", t), ("peer", shm_target.name.as_str())];
            sample(&text, "tidewire_failures_total", &f)
        })
        .sum();
    assert!(failed >= 64.0, "the 64 failed requests are counted as {kind}: {text}");
    drop(target);

    // 1,000 short-lived peers: each started, written to once and stopped. The peer label takes
    // at most TIDEWIRE_METRICS_MAX_PEERS values and `other`.
    let small = registered(&e, PAGE as usize, &random_bytes(PAGE as usize, 5));
    let started = std::time::Instant::now();
    for _ in 0..1000 {
        let t = common::engine();
        let remote = t.allocate_shared(PAGE).unwrap();
        let p = e.open_segment(t.name()).unwrap();
        let req = Request { op: Op::Write, local: small.addr(), len: PAGE, peer: p, remote };
        e.transfer_sync(&[req], BatchOptions::default()).unwrap();
    }
    let text = scrape(&e);
    let mut peers: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tidewire_requests_total{"))
        .filter_map(|l| l.split("peer=\"").nth(1)?.split('"').next())
        .collect();
    peers.sort_unstable();
    peers.dedup();
    assert!(peers.len() <= 9 && peers.contains(&"other"), "{peers:?}");
    let other = [("transport", "tcp"), ("op", "write"), ("peer", "other")];
    let folded = sample(&text, "tidewire_requests_total", &other).unwrap_or(0.0);
    assert!(folded >= 1000.0 - 8.0, "the peers past the limit are counted under other: {folded}");
    eprintln!("1,000 peers in {:?}", started.elapsed());
}
