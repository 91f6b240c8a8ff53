//! A peer's freed shared region is unmapped by the initiators that copied into it (they cache
//! the mapping for reuse): a process whose peers allocate and free regions again and again
//! does not keep their memory mapped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use tidewire::{BatchOptions, Op, Request};

#[test]
fn a_freed_shared_region_is_unmapped_by_the_initiators_that_used_it() {
    let target = common::engine();
    let e = common::engine();
    let peer = e.open_segment(target.name()).unwrap();
    let buf = common::registered(&e, 4096, &[7u8; 4096]);
    // Each round's region is allocated while the previous one still lives (a freed region's
    // address may come back for the next allocation, which a cached descriptor would still
    // name: `map_peer` re-reads it, `submit` does not yet).
    let mut live = target.allocate_shared(1 << 20).unwrap();
    for round in 0..3 {
        let req = Request { op: Op::Write, local: buf.addr(), len: 4096, peer, remote: live };
        e.transfer_sync(&[req], BatchOptions::default()).unwrap();
        assert_eq!(common::status(&e, peer).mappings, 1, "round {round}: the region is mapped");
        let next = target.allocate_shared(1 << 20).unwrap();
        target.free_shared(live).unwrap();
        live = next;
        assert_eq!(
            common::status(&e, peer).mappings,
            0,
            "round {round}: the freed region is unmapped here"
        );
    }
    drop((e, target));
}

#[test]
fn a_region_allocated_where_a_freed_one_was_is_reached_after_one_refusal() {
    let target = common::engine();
    let e = common::engine();
    let peer = e.open_segment(target.name()).unwrap();
    let buf = common::registered(&e, 4096, &[9u8; 4096]);
    let first = target.allocate_shared(1 << 20).unwrap();
    let write = |remote| Request { op: Op::Write, local: buf.addr(), len: 4096, peer, remote };
    e.transfer_sync(&[write(first)], BatchOptions::default()).unwrap();
    target.free_shared(first).unwrap();
    // The allocator usually hands the same addresses back (a mapping of the same size, at the
    // same start or overlapping the old one), which the cached descriptor still names as the
    // freed region: the first write may be refused, with the reason, and the next one must
    // reach the new region.
    let second = target.allocate_shared(1 << 20).unwrap();
    if let Err(err) = e.transfer_sync(&[write(second)], BatchOptions::default()) {
        let overlaps = second < first + (1 << 20) && first < second + (1 << 20);
        assert!(
            overlaps,
            "only a reused address range may be refused ({first:#x}, {second:#x}): {err}"
        );
        assert!(matches!(err, tidewire::Error::RemoteAccessDenied { .. }), "{err}");
    }
    e.transfer_sync(&[write(second)], BatchOptions::default()).unwrap();
    drop((e, target));
}
