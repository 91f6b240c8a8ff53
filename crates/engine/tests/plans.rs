//! Prepared plans and the paged KV API: stale plans refused with nothing moved; pages moved by
//! index arrays byte for byte the same as the same transfer given as raw descriptors.
//! (A plan executed 1,000 times on every transport is in conformance.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{peek, poke, random_bytes, registered, ChildTarget};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tidewire::{BatchOptions, Engine, EngineConfig, Error, Op, PageTransfer, PeerId, Request};

const CHILD: &str = "zz_child_process_entry";

/// A page transfer between two layouts of `peer`.
fn transfer<'a>(
    peer: PeerId,
    op: Op,
    local: &'a str,
    remote: &'a str,
    lp: &'a [u64],
    rp: &'a [u64],
) -> PageTransfer<'a> {
    PageTransfer { peer, op, local, remote, local_pages: lp, remote_pages: rp }
}
const PAGE: u64 = 4096;
const POISON: u8 = 0xA5;

/// Not a test: the body of the child target process the tests below start.
#[test]
#[ignore = "helper, not a test: the body of the child processes other tests start"]
fn zz_child_process_entry() {
    common::child_main();
}

/// 64 pages scattered (a fixed permutation) from `local` to `remote`.
fn scattered(op: Op, peer: PeerId, local: u64, remote: u64) -> Vec<Request> {
    let mut order: Vec<u64> = (0..64).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(5));
    order
        .iter()
        .enumerate()
        .map(|(i, &p)| Request {
            op,
            local: local + i as u64 * PAGE,
            len: PAGE,
            peer,
            remote: remote + p * PAGE,
        })
        .collect()
}

#[test]
fn a_plan_whose_peer_died_is_stale_and_a_new_one_reaches_the_restarted_peer() {
    let mut target = ChildTarget::spawn(CHILD, 0, 64 * PAGE, 1);
    let port = common::port_of(&target.name);
    let e = common::engine();
    let src = registered(&e, 64 * PAGE as usize, &random_bytes(64 * PAGE as usize, 2));
    let peer = e.open_segment(&target.name).unwrap();
    let plan = e.prepare(&scattered(Op::Write, peer, src.addr(), target.addr)).unwrap();
    e.execute(&plan, BatchOptions::default()).unwrap().wait().unwrap();
    target.kill();
    let stale = common::eventually(std::time::Duration::from_secs(5), || {
        matches!(e.execute(&plan, BatchOptions::default()), Err(Error::StalePlan { .. }))
    });
    assert!(stale, "a plan of a dead peer is stale");
    match e.execute(&plan, BatchOptions::default()) {
        Err(Error::StalePlan { reason }) => {
            assert!(reason.contains("prepare the plan again"), "{reason}")
        }
        other => panic!("expected a stale plan, got {other:?}"),
    }
    // Re-prepared against the restarted peer (same name, new instance): it moves every byte.
    let restarted = ChildTarget::spawn(CHILD, port, 64 * PAGE, 3);
    let back = registered(&e, 64 * PAGE as usize, &[POISON; 64 * PAGE as usize]);
    let again = e.prepare(&scattered(Op::Write, peer, src.addr(), restarted.addr)).unwrap();
    e.execute(&again, BatchOptions::default()).unwrap().wait().unwrap();
    let read = e.prepare(&scattered(Op::Read, peer, back.addr(), restarted.addr)).unwrap();
    e.execute(&read, BatchOptions::default()).unwrap().wait().unwrap();
    assert!(back.to_vec() == src.to_vec());
    drop(restarted);
}

#[test]
fn a_plan_over_an_unregistered_local_region_is_stale_and_moves_nothing() {
    let target = common::engine();
    let remote = target.allocate_shared(64 * PAGE).unwrap();
    poke(remote, &vec![POISON; 64 * PAGE as usize]);
    let e = common::engine();
    let src = registered(&e, 64 * PAGE as usize, &random_bytes(64 * PAGE as usize, 4));
    let peer = e.open_segment(target.name()).unwrap();
    let plan = e.prepare(&scattered(Op::Write, peer, src.addr(), remote)).unwrap();
    e.unregister(src.addr()).unwrap();
    let err = e.execute(&plan, BatchOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::StalePlan { reason } if reason.contains("unregistered")),
        "{err}"
    );
    assert!(peek(remote, 64 * PAGE as usize) == vec![POISON; 64 * PAGE as usize]);
    let other = common::engine();
    let foreign = other.execute(&plan, BatchOptions::default()).unwrap_err();
    assert!(matches!(foreign, Error::InvalidArgument { .. }), "{foreign}");
    drop(src);
}

/// A KV cache on each side: `layers` page arrays of `pages` pages inside one registered region.
struct Kv {
    base: u64,
    layers: Vec<u64>,
}

fn kv(e: &Engine, name: &str, layers: usize, pages: u64, shared: bool, fill: u64) -> Kv {
    let len = layers as u64 * pages * PAGE + PAGE;
    let base = if shared {
        e.allocate_shared(len).unwrap()
    } else {
        let b = registered(e, len as usize, &[]);
        let a = b.addr();
        std::mem::forget(b); // lives until the process ends; the engine unregisters it
        a
    };
    poke(base, &random_bytes(len as usize, fill));
    // Layers a page apart from the region start, so no layer starts at the region's base.
    let layers: Vec<u64> = (0..layers as u64).map(|l| base + PAGE + l * pages * PAGE).collect();
    e.register_layout(name, &layers, pages, PAGE).unwrap();
    Kv { base, layers }
}

/// Pages moved by index arrays land exactly where the same transfer given as raw descriptors
/// puts them, on shm and tcp, both directions; consecutive pages coalesce.
fn paged_matches_raw(initiator_cfg: EngineConfig, shared: bool) {
    let (layers, pages) = (3usize, 32u64);
    let target = common::engine();
    let theirs = kv(&target, "kv", layers, pages, shared, 10);
    let mirror = kv(&target, "mirror", layers, pages, shared, 10);
    let e = Engine::new(initiator_cfg).unwrap();
    let mine = kv(&e, "kv", layers, pages, false, 11);
    let peer = e.open_segment(target.name()).unwrap();
    // Some consecutive pairs (they coalesce) and some scattered ones.
    let local: Vec<u64> = vec![0, 1, 2, 3, 9, 31, 17, 18, 5];
    let remote: Vec<u64> = vec![4, 5, 6, 7, 0, 1, 30, 31, 12];
    let reqs = e.page_requests(&transfer(peer, Op::Write, "kv", "kv", &local, &remote)).unwrap();
    // Five runs: 0..4 -> 4..8, 9 -> 0, 31 -> 1, 17..19 -> 30..32, 5 -> 12; in every layer.
    assert_eq!(reqs.len(), layers * 5, "runs of consecutive pages are one request each");
    e.transfer_pages(
        &transfer(peer, Op::Write, "kv", "kv", &local, &remote),
        BatchOptions::default(),
    )
    .unwrap()
    .wait()
    .unwrap();
    // The same pages as raw descriptors, one per page, into the mirror layout.
    let raw: Vec<Request> = (0..layers)
        .flat_map(|l| {
            let (mine, mirror) = (&mine, &mirror);
            local.iter().zip(&remote).map(move |(&lp, &rp)| Request {
                op: Op::Write,
                local: mine.layers[l] + lp * PAGE,
                len: PAGE,
                peer,
                remote: mirror.layers[l] + rp * PAGE,
            })
        })
        .collect();
    e.transfer_sync(&raw, BatchOptions::default()).unwrap();
    let span = (layers as u64 * pages * PAGE + PAGE) as usize;
    assert!(peek(theirs.base, span) == peek(mirror.base, span), "paged == raw, byte for byte");
    // READ back through the paged API into poisoned pages, then compare with the source.
    for &l in &mine.layers {
        poke(l, &vec![POISON; (pages * PAGE) as usize]);
    }
    let before = peek(theirs.base, span);
    let plan = e.prepare_pages(&transfer(peer, Op::Read, "kv", "kv", &local, &remote)).unwrap();
    e.execute(&plan, BatchOptions::default()).unwrap().wait().unwrap();
    for (l, &lb) in mine.layers.iter().enumerate() {
        for (&lp, &rp) in local.iter().zip(&remote) {
            let there = (theirs.layers[l] + rp * PAGE - theirs.base) as usize;
            let got = peek(lb + lp * PAGE, PAGE as usize);
            assert!(got == before[there..there + PAGE as usize], "layer {l} page {lp}");
        }
    }
    drop((e, target));
}

#[test]
fn paged_transfers_match_raw_descriptors_over_shm() {
    paged_matches_raw(common::config(), true);
}

#[test]
fn paged_transfers_match_raw_descriptors_over_tcp() {
    paged_matches_raw(common::tcp_config(), false);
}

#[test]
fn bad_layouts_and_page_arrays_are_refused_with_the_reason() {
    let target = common::engine();
    let _theirs = kv(&target, "kv", 2, 8, true, 1);
    let e = common::engine();
    let _mine = kv(&e, "kv", 2, 8, false, 2);
    let peer = e.open_segment(target.name()).unwrap();
    let msg = |r: Result<Vec<Request>, Error>| match r {
        Err(Error::InvalidArgument { reason }) => reason,
        other => panic!("expected InvalidArgument, got {other:?}"),
    };
    let out = msg(e.page_requests(&transfer(peer, Op::Write, "kv", "kv", &[0, 8], &[0, 1])));
    assert!(out.contains("page 8 (index 1)"), "{out}");
    let uneven = msg(e.page_requests(&transfer(peer, Op::Write, "kv", "kv", &[0, 1], &[0])));
    assert!(uneven.contains("2 local pages against 1"), "{uneven}");
    assert!(
        msg(e.page_requests(&transfer(peer, Op::Write, "nope", "kv", &[0], &[0]))).contains("nope")
    );
    assert!(
        msg(e.page_requests(&transfer(peer, Op::Write, "kv", "nope", &[0], &[0]))).contains("nope")
    );
    // A layout outside registered memory, a duplicate name, a zero page size.
    let outside = e.register_layout("far", &[0x1000], 4, PAGE).unwrap_err();
    assert!(matches!(outside, Error::InvalidArgument { .. }), "{outside}");
    let twice = e.register_layout("kv", &[_mine.layers[0]], 1, PAGE).unwrap_err();
    assert!(matches!(twice, Error::InvalidArgument { .. }), "{twice}");
    assert!(e.register_layout("z", &[_mine.layers[0]], 1, 0).is_err());
    // A layout the peer registers after it was opened is found (its descriptor re-read).
    let late = kv(&target, "late", 2, 8, true, 3);
    let reqs = e.page_requests(&transfer(peer, Op::Write, "kv", "late", &[0], &[7])).unwrap();
    assert_eq!(reqs[0].remote, late.layers[0] + 7 * PAGE);
    target.unregister_layout("late").unwrap();
    assert!(target.unregister_layout("late").is_err(), "gone once unregistered");
}
