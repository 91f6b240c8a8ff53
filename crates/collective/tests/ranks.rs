//! Groups of ranks as threads of one process, each with its own engine (same host: shm rings),
//! every collective against a reference computed here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use tidewire::{Engine, EngineConfig};
use tidewire_collective::{
    finish_avg, reduce_into, Comm, DType, Error, PeerInfo, ReduceOp, Region,
};

/// Runs `body(rank, comm)` on `n` connected ranks (rings of `cap` bytes); returns their results.
fn group<T: Send + 'static>(
    n: usize,
    cap: u64,
    body: impl Fn(usize, &mut Comm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    group_with(n, cap, Duration::from_secs(20), body)
}

/// As [`group`], with the group's timeout.
fn group_with<T: Send + 'static>(
    n: usize,
    cap: u64,
    timeout: Duration,
    body: impl Fn(usize, &mut Comm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    group_via(n, cap, timeout, false, body)
}

/// As [`group_with`]; with `tcp`, every rank's engine moves bytes over tcp and every peer is
/// reached through engine transfers (what ranks on other hosts get).
fn group_via<T: Send + 'static>(
    n: usize,
    cap: u64,
    timeout: Duration,
    tcp: bool,
    body: impl Fn(usize, &mut Comm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    group_as(n, cap, timeout, tcp, true, body)
}

/// As [`group_via`]; without `pids`, no rank publishes its process id, so no pair reads the
/// other directly: large collectives go round the rings.
fn group_as<T: Send + 'static>(
    n: usize,
    cap: u64,
    timeout: Duration,
    tcp: bool,
    pids: bool,
    body: impl Fn(usize, &mut Comm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let infos = Arc::new(Mutex::new(vec![None; n]));
    let ready = Arc::new(Barrier::new(n));
    let body = Arc::new(body);
    let handles: Vec<_> = (0..n)
        .map(|rank| {
            let (infos, ready, body) = (infos.clone(), ready.clone(), body.clone());
            std::thread::spawn(move || {
                let mut cfg = EngineConfig { port: Some(0), ..EngineConfig::default() };
                if tcp {
                    cfg = cfg.apply_env(|k| (k == "MC_FORCE_TCP").then(|| "1".into())).unwrap();
                }
                let engine = Arc::new(Engine::new(cfg).unwrap());
                let region = Region::allocate(&engine, n, cap).unwrap();
                infos.lock().unwrap()[rank] = Some(PeerInfo {
                    name: engine.name().to_string(),
                    region: region.addr,
                    pid: pids.then(std::process::id),
                });
                ready.wait();
                let peers: Vec<PeerInfo> =
                    infos.lock().unwrap().iter().map(|p| p.clone().unwrap()).collect();
                let mut comm =
                    Comm::connect_with(engine.clone(), rank, region, &peers, timeout, tcp).unwrap();
                // A rank whose body panics still reaches the barrier (the others would wait
                // for it forever), then fails the test with its panic.
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    body(rank, &mut comm)
                }));
                ready.wait();
                drop(comm);
                out.unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// What rank `rank` of `n` holds after an all_to_all in which rank `s` sends `split(s, d)`
/// bytes to rank `d`, byte `i` of rank `s`'s input being `byte(s, i)`.
fn a2a_want(
    n: usize,
    rank: usize,
    split: impl Fn(usize, usize) -> usize,
    byte: impl Fn(usize, usize) -> u8,
) -> Vec<u8> {
    let mut want = Vec::new();
    for s in 0..n {
        let start: usize = (0..rank).map(|d| split(s, d)).sum();
        want.extend((start..start + split(s, rank)).map(|i| byte(s, i)));
    }
    want
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

fn values(rank: usize, count: usize) -> Vec<f32> {
    (0..count).map(|i| ((rank * 7919 + i * 31) % 1013) as f32 - 500.0).collect()
}

/// The reduction of every rank's `values`, in rank order (as the ranks compute it).
fn reference(n: usize, count: usize, op: ReduceOp) -> Vec<u8> {
    let mut acc = f32s(&values(0, count));
    for r in 1..n {
        reduce_into(&mut acc, &f32s(&values(r, count)), DType::F32, op);
    }
    acc
}

#[test]
fn all_reduce_direct_and_ring_match_the_reference_on_1_2_and_4_ranks() {
    for n in [1, 2, 4] {
        // 1,000 floats go to every rank at once; 300,000 (1.2 MB, bigger than the 256 KiB
        // rings; not staged here) go round the ring in pieces, or (process ids known) by
        // direct reads.
        for (count, pids) in [(1000usize, true), (300_000, false), (300_000, true)] {
            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
                let got = group_as(
                    n,
                    256 << 10,
                    Duration::from_secs(20),
                    false,
                    pids,
                    move |rank, comm| {
                        assert!(pids || !comm.reads_directly(), "no process ids, yet direct reads");
                        comm.set_staged_sizes(usize::MAX, 0); // nothing staged
                        let mut buf = f32s(&values(rank, count));
                        comm.all_reduce(&mut buf, DType::F32, op).unwrap();
                        buf
                    },
                );
                let want = reference(n, count, op);
                for (rank, buf) in got.iter().enumerate() {
                    assert!(
                        *buf == want,
                        "n={n} count={count} pids={pids} {op:?}: rank {rank} differs"
                    );
                }
            }
        }
    }
}

#[test]
fn gather_scatter_broadcast_all_to_all_and_reduce_scatter_move_every_byte() {
    let n = 4;
    let got = group(n, 64 << 10, move |rank, comm| {
        let len = 100_003; // odd, bigger than a ring
        let mine: Vec<u8> = (0..len).map(|i| (i * 13 + rank * 101) as u8).collect();
        let mut all = vec![0u8; n * len];
        comm.all_gather(&mut all, &mine).unwrap();
        let mut b = if rank == 2 { mine.clone() } else { vec![0u8; len] };
        comm.broadcast(&mut b, 2).unwrap();
        let mut g = vec![0u8; if rank == 1 { n * len } else { 0 }];
        comm.gather(&mut g, &mine, 1).unwrap();
        let mut s = vec![0u8; len];
        comm.scatter(&mut s, if rank == 3 { &all } else { &[] }, 3).unwrap();
        // Uneven all-to-all: rank r sends (r + 1) * (d + 1) * 1000 bytes to rank d.
        let in_splits: Vec<usize> = (0..n).map(|d| (rank + 1) * (d + 1) * 1000).collect();
        let out_splits: Vec<usize> = (0..n).map(|src| (src + 1) * (rank + 1) * 1000).collect();
        let input: Vec<u8> =
            (0..in_splits.iter().sum::<usize>()).map(|i| (i % 251) as u8 ^ rank as u8).collect();
        let mut out = vec![0u8; out_splits.iter().sum()];
        comm.all_to_all(&mut out, &out_splits, &input, &in_splits).unwrap();
        let count = 10_000;
        let rs_in = f32s(&(0..n).flat_map(|_| values(rank, count)).collect::<Vec<f32>>());
        let mut rs = vec![0u8; count * 4];
        comm.reduce_scatter(&mut rs, &rs_in, DType::F32, ReduceOp::Sum).unwrap();
        let mut red = f32s(&values(rank, count));
        comm.reduce(&mut red, DType::F32, ReduceOp::Sum, 0).unwrap();
        comm.barrier().unwrap();
        (mine, all, b, g, s, out, rs, red)
    });
    let mines: Vec<Vec<u8>> = got.iter().map(|g| g.0.clone()).collect();
    let concat: Vec<u8> = mines.concat();
    let sum = reference(n, 10_000, ReduceOp::Sum);
    for (rank, (_, all, b, g, s, out, rs, red)) in got.iter().enumerate() {
        assert!(*all == concat, "all_gather on rank {rank}");
        assert!(*b == mines[2], "broadcast on rank {rank}");
        if rank == 1 {
            assert!(*g == concat, "gather on the root");
        }
        assert!(*s == mines[rank], "scatter on rank {rank}");
        let want =
            a2a_want(n, rank, |s, d| (s + 1) * (d + 1) * 1000, |s, i| (i % 251) as u8 ^ s as u8);
        assert!(*out == want, "all_to_all on rank {rank}");
        assert!(*rs == sum, "reduce_scatter on rank {rank}");
        if rank == 0 {
            assert!(*red == sum, "reduce on the root");
        }
    }
}

/// Bytes from rank `s` to rank `d` in the large all-to-all: large, except between ranks 0 and
/// 1 (a pair below the direct-read size goes round its ring within the same call).
fn a2a_bytes(s: usize, d: usize) -> usize {
    if s + d == 1 {
        1000 + d
    } else {
        (s + 1) * (d + 2) * 100_000 + d
    }
}

#[test]
fn large_all_gather_all_to_all_and_all_reduce_read_peers_directly_and_match_the_reference() {
    // Past 1 MiB, ranks of one host read each other's buffers (`process_vm_readv`; here the
    // ranks are threads of one process, which reads its own memory the same way).
    let n = 3;
    let got = group(n, 64 << 10, move |rank, comm| {
        assert!(comm.reads_directly(), "rank {rank}: threads of one process read each other");
        comm.set_staged_sizes(usize::MAX, 0); // nothing staged: the direct reads
        let len = 700_001;
        let mine: Vec<u8> = (0..len).map(|i| (i * 7 + rank * 31) as u8).collect();
        let mut all = vec![0u8; n * len];
        comm.all_gather(&mut all, &mine).unwrap();
        let in_splits: Vec<usize> = (0..n).map(|d| a2a_bytes(rank, d)).collect();
        let out_splits: Vec<usize> = (0..n).map(|s| a2a_bytes(s, rank)).collect();
        let input: Vec<u8> =
            (0..in_splits.iter().sum::<usize>()).map(|i| (i % 253) as u8 ^ rank as u8).collect();
        let mut out = vec![0xA5u8; out_splits.iter().sum()];
        comm.all_to_all(&mut out, &out_splits, &input, &in_splits).unwrap();
        let mut red = f32s(&values(rank, 300_001));
        comm.all_reduce(&mut red, DType::F32, ReduceOp::Sum).unwrap();
        let mut mx = f32s(&values(rank, 300_001));
        comm.all_reduce(&mut mx, DType::F32, ReduceOp::Max).unwrap();
        (mine, all, out, red, mx)
    });
    let (sum, max) = (reference(n, 300_001, ReduceOp::Sum), reference(n, 300_001, ReduceOp::Max));
    let concat: Vec<u8> = got.iter().flat_map(|g| g.0.clone()).collect();
    for (rank, (_, all, out, red, mx)) in got.iter().enumerate() {
        assert!(*all == concat, "all_gather on rank {rank}");
        assert!(*red == sum, "all_reduce sum on rank {rank}");
        assert!(*mx == max, "all_reduce max on rank {rank}");
        let want = a2a_want(n, rank, a2a_bytes, |s, i| (i % 253) as u8 ^ s as u8);
        assert!(*out == want, "all_to_all on rank {rank}");
    }
}

#[test]
fn a_four_rank_all_to_all_of_uneven_large_blocks_moves_every_byte_once_by_pipes_and_by_reads() {
    // Every pair but (0, 1) moves its blocks in one copy (each rank with two or three peers
    // at once): through pipes on one thread and on three, then by direct reads. Uneven
    // blocks of odd lengths, the output poisoned before each call, every byte checked.
    let n = 4;
    let ways = [(1, "pipes"), (3, "pipes"), (1, "direct_reads")];
    let got = group(n, 64 << 10, move |rank, comm| {
        let in_splits: Vec<usize> = (0..n).map(|d| a2a_bytes(rank, d)).collect();
        let out_splits: Vec<usize> = (0..n).map(|s| a2a_bytes(s, rank)).collect();
        let input: Vec<u8> =
            (0..in_splits.iter().sum::<usize>()).map(|i| (i * 13 + rank * 71) as u8).collect();
        let mut outs = Vec::new();
        for (threads, label) in ways {
            comm.set_readers(threads);
            if label == "direct_reads" {
                comm.drop_pipes();
            }
            let mut out = vec![0xA5u8; out_splits.iter().sum()];
            comm.all_to_all(&mut out, &out_splits, &input, &in_splits).unwrap();
            assert_eq!(comm.algorithm(), label, "rank {rank}, {threads} threads");
            outs.push(out);
        }
        outs
    });
    for (rank, outs) in got.iter().enumerate() {
        let want = a2a_want(n, rank, a2a_bytes, |s, i| (i * 13 + s * 71) as u8);
        for (out, (threads, label)) in outs.iter().zip(ways) {
            assert!(*out == want, "all_to_all on rank {rank} ({label}, {threads} threads)");
        }
    }
}

#[test]
fn a_rank_that_refuses_pipes_reads_with_its_peers_while_the_others_use_theirs() {
    // Rank 0 makes no pipes: its pairs agree to read; the pair (1, 2) sends through its
    // pipes, in the same calls (the reads' address and token rounds beside the pipes).
    let n = 3;
    let got = group(n, 64 << 10, move |rank, comm| {
        if rank == 0 {
            comm.refuse_pipes_for_test();
        }
        let in_splits: Vec<usize> = (0..n).map(|d| a2a_bytes(rank, d) + 300_000).collect();
        let out_splits: Vec<usize> = (0..n).map(|s| a2a_bytes(s, rank) + 300_000).collect();
        let input: Vec<u8> =
            (0..in_splits.iter().sum::<usize>()).map(|i| (i * 11 + rank * 29) as u8).collect();
        let mut outs = Vec::new();
        for _ in 0..2 {
            let mut out = vec![0xA5u8; out_splits.iter().sum()];
            comm.all_to_all(&mut out, &out_splits, &input, &in_splits).unwrap();
            outs.push(out);
        }
        (outs, comm.algorithm(), comm.piped_for_test())
    });
    let want_piped = [vec![], vec![2], vec![1]];
    for (rank, (outs, label, piped)) in got.iter().enumerate() {
        assert_eq!(*label, "direct_reads", "rank {rank}: a pair reads, so the call is labelled so");
        assert_eq!(*piped, want_piped[rank], "rank {rank}'s pairs with pipes");
        let want =
            a2a_want(n, rank, |s, d| a2a_bytes(s, d) + 300_000, |s, i| (i * 11 + s * 29) as u8);
        for (k, out) in outs.iter().enumerate() {
            assert!(*out == want, "all_to_all {k} on rank {rank}");
        }
    }
}

#[test]
fn two_ranks_move_a_pair_of_1_to_8_mib_through_pipes_and_other_sizes_by_reads() {
    // The pair's bytes both ways: 300,000 (read), 3 MiB (pipes), 9 MiB (read, over threads).
    let sizes = [(300_000usize, "direct_reads"), (3 << 20, "pipes"), (9 << 20, "direct_reads")];
    let bytes = |rank: usize, total: usize| -> Vec<u8> {
        (0..total).map(|i| (i * 7 + rank * 13 + total) as u8).collect()
    };
    let got = group(2, 64 << 10, move |rank, comm| {
        comm.set_readers(3);
        let mut outs = Vec::new();
        for (total, _) in sizes {
            let half = [total / 2; 2];
            let mut out = vec![0xA5u8; total];
            comm.all_to_all(&mut out, &half, &bytes(rank, total), &half).unwrap();
            outs.push((out, comm.algorithm()));
        }
        outs
    });
    for (rank, outs) in got.iter().enumerate() {
        for ((out, label), (total, want_label)) in outs.iter().zip(sizes) {
            assert_eq!(*label, want_label, "rank {rank}, {total} bytes");
            let half = total / 2;
            let want: Vec<u8> = (0..2)
                .flat_map(|src| bytes(src, total)[rank * half..(rank + 1) * half].to_vec())
                .collect();
            assert!(*out == want, "rank {rank}, {total} bytes ({label})");
        }
    }
}

#[test]
fn an_all_to_all_whose_splits_differ_between_a_pair_fails_at_once_naming_the_sender() {
    // Three ranks (every direct pair through pipes). Rank 0 sends 300,000 bytes to rank 1,
    // which expects 400,000: through the pipes the block's header says so, and ranks 0 and 1
    // fail at once (not at the timeout, not with bytes of the next call taken for this one's).
    // Rank 2 may have finished its pairs before rank 1 failed (its bytes are whole then); its
    // next call fails at once.
    let n = 3;
    let got = group_with(n, 64 << 10, Duration::from_secs(20), move |rank, comm| {
        let outs = vec![300_000usize; n];
        let mut ins = vec![300_000usize; n];
        if rank == 1 {
            ins[0] = 400_000;
        }
        let input = vec![rank as u8 + 1; outs.iter().sum()];
        let mut out = vec![0u8; ins.iter().sum()];
        let start = std::time::Instant::now();
        let first = comm.all_to_all(&mut out, &ins, &input, &outs).map_err(|e| e.to_string());
        let label = comm.algorithm();
        let whole = first.is_ok()
            && (0..n)
                .all(|s| out[s * 300_000..(s + 1) * 300_000].iter().all(|&b| b == s as u8 + 1));
        let next =
            comm.all_reduce(&mut [0u8; 8], DType::U8, ReduceOp::Sum).map_err(|e| e.to_string());
        (first, whole, next, start.elapsed(), label)
    });
    for (rank, (first, whole, next, took, label)) in got.iter().enumerate() {
        assert_eq!(*label, "pipes", "rank {rank}");
        assert!(*took < Duration::from_secs(10), "rank {rank} waited {took:?}: {first:?} {next:?}");
        let err = match first {
            Err(e) => e.clone(),
            Ok(()) => {
                assert!(
                    rank == 2 && *whole,
                    "rank {rank} returned from the call (whole bytes: {whole})"
                );
                next.clone().expect_err("rank 2's next call after rank 1 failed")
            }
        };
        assert!(err.contains("rank 0") || err.contains("rank 1"), "rank {rank}: {err}");
        assert!(next.is_err(), "rank {rank}'s next call");
    }
    let err1 = got[1].0.as_ref().expect_err("rank 1");
    assert!(
        err1.contains("rank 0 sends 300000 bytes for a block of 400000 here"),
        "rank 1: {err1}"
    );
}

#[test]
fn large_direct_reads_spread_over_threads_match_the_reference() {
    // Blocks past 2 MiB are read (and all_reduce's and reduce_scatter's reduced) by several
    // threads, each its own piece: every byte must still land once, in the right place,
    // reduced in one order.
    let n = 2;
    let count = (5 << 20) / 4 + 3;
    let got = group(n, 64 << 10, move |rank, comm| {
        comm.set_readers(3);
        comm.set_staged_sizes(usize::MAX, 0); // nothing staged: the direct reads
        let mut red = f32s(&values(rank, count));
        comm.all_reduce(&mut red, DType::F32, ReduceOp::Sum).unwrap();
        assert_eq!(comm.algorithm(), "direct_reads", "rank {rank}: the metrics' label");
        let len = (3 << 20) + 5;
        let mine: Vec<u8> = (0..len).map(|i| (i * 13 + rank * 7) as u8).collect();
        let mut all = vec![0u8; n * len];
        comm.all_gather(&mut all, &mine).unwrap();
        let mut rs = vec![0u8; count * 4];
        comm.reduce_scatter(&mut rs, &f32s(&values(rank, n * count)), DType::F32, ReduceOp::Max)
            .unwrap();
        (mine, all, red, rs)
    });
    let sum = reference(n, count, ReduceOp::Sum);
    let max = reference(n, n * count, ReduceOp::Max);
    let concat: Vec<u8> = got.iter().flat_map(|g| g.0.clone()).collect();
    for (rank, (_, all, red, rs)) in got.iter().enumerate() {
        assert!(*red == sum, "all_reduce sum on rank {rank}");
        assert!(*all == concat, "all_gather on rank {rank}");
        assert!(
            *rs == max[rank * count * 4..(rank + 1) * count * 4],
            "reduce_scatter on rank {rank}"
        );
    }
}

#[test]
fn pending_sends_and_receives_in_both_directions_do_not_deadlock() {
    // Both ranks post a send bigger than the ring before their receive: progress interleaves.
    let got = group(2, 4096, |rank, comm| {
        let peer = 1 - rank;
        let out: Vec<u8> = (0..1_000_000).map(|i| (i % 256) as u8 ^ rank as u8).collect();
        let mut inp = vec![0u8; out.len()];
        // SAFETY: both buffers live until the waits below return.
        let (s, r) = unsafe {
            let s = comm.isend(peer, out.as_ptr() as u64, out.len() as u64, 7).unwrap();
            let r = comm.irecv(peer, inp.as_mut_ptr() as u64, inp.len() as u64, 7).unwrap();
            (s, r)
        };
        comm.wait(s, "send").unwrap();
        comm.wait(r, "recv").unwrap();
        // Empty messages pair too (their headers travel).
        // SAFETY: no bytes are read or written.
        let (s, r) =
            unsafe { (comm.isend(peer, 0, 0, 9).unwrap(), comm.irecv(peer, 0, 0, 9).unwrap()) };
        comm.wait(s, "send").unwrap();
        comm.wait(r, "recv").unwrap();
        inp
    });
    for (rank, inp) in got.iter().enumerate() {
        let want: Vec<u8> = (0..1_000_000).map(|i| (i % 256) as u8 ^ (1 - rank) as u8).collect();
        assert!(*inp == want, "rank {rank}");
    }
}

#[test]
fn a_message_of_another_tag_or_length_fails_the_receive_naming_both() {
    // Rank 0 sends tag 1 then tag 2; rank 1 receives tag 2 first (or a wrong length): an
    // error at once, naming what came and what was expected, and nothing written into the
    // receive's buffer.
    for (tag, len) in [(2u64, 64usize), (1, 32), (1, 0)] {
        let got = group(2, 4096, move |rank, comm| {
            let data = [0x11u8; 64];
            if rank == 0 {
                // SAFETY: `data` lives until the waits below return (or the group fails).
                let ids = unsafe {
                    [
                        comm.isend(1, data.as_ptr() as u64, 64, 1),
                        comm.isend(1, data.as_ptr() as u64, 64, 2),
                    ]
                };
                let _ = ids.map(|id| id.map(|id| comm.wait(id, "send")));
                return None;
            }
            let mut buf = vec![0xA5u8; len];
            // SAFETY: `buf` lives until the wait returns.
            let id = unsafe { comm.irecv(0, buf.as_mut_ptr() as u64, len as u64, tag) };
            let err = id.and_then(|id| comm.wait(id, "recv")).err().map(|e| e.to_string());
            Some((err, buf.iter().all(|&b| b == 0xA5)))
        });
        let (err, untouched) = got[1].clone().unwrap_or_else(|| panic!("rank 1 reported"));
        let err = err.unwrap_or_else(|| panic!("tag {tag}, {len} bytes: the receive succeeded"));
        assert!(
            err.contains("tag 1 and 64 bytes")
                && err.contains(&format!("expects tag {tag} and {len} bytes")),
            "{err}"
        );
        assert!(untouched, "the receive's buffer was written");
    }
}

/// Message `k` of rank `r` to the receives from any rank: `len` bytes of its own.
fn any_msg(r: usize, k: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + r * 31 + k * 101) as u8).collect()
}

#[test]
fn receives_from_any_rank_take_every_message_once_and_name_its_sender() {
    // Ranks 1-3 each send two messages of tag 5 (8,104 bytes: more than the 4 KiB rings; after
    // connecting's 64 bytes, the second header of ranks 2 and 3 straddles the ring's end); rank 1 sends a message of tag 9 before its two,
    // which a named receive posted after the receives from any rank takes (they pass over
    // it). Rank 0 posts six receives from any rank: each message lands once, whole, with its
    // sender named, each sender's two in the order sent; a collective afterwards still meets
    // every rank at a message boundary. Over the shm rings and over engine transfers (tcp).
    const LEN: usize = 8104;
    for tcp in [false, true] {
        let got = group_via(4, 4096, Duration::from_secs(20), tcp, |rank, comm| {
            let mut msgs: Vec<(usize, Vec<u8>)> = Vec::new();
            if rank == 0 {
                let mut bufs = vec![vec![0xA5u8; LEN]; 6];
                let mut nine = vec![0xA5u8; 100];
                // SAFETY: every buffer lives until the waits below return.
                let (anys, named) = unsafe {
                    let anys: Vec<_> = bufs
                        .iter_mut()
                        .map(|b| comm.irecv_any(b.as_mut_ptr() as u64, LEN as u64, 5).unwrap())
                        .collect();
                    (anys, comm.irecv(1, nine.as_mut_ptr() as u64, 100, 9).unwrap())
                };
                comm.wait(named, "recv of tag 9").unwrap();
                assert_eq!(nine, vec![9u8; 100], "the named receive");
                for (id, b) in anys.into_iter().zip(bufs) {
                    comm.wait(id, "recv from any rank").unwrap();
                    let from = comm.take_source(id).expect("a bound receive names its sender");
                    assert_eq!(comm.take_source(id), None, "the sender is told once");
                    msgs.push((from, b));
                }
            } else {
                let data: Vec<Vec<u8>> = (0..2).map(|k| any_msg(rank, k, LEN)).collect();
                let nine = [9u8; 100];
                // SAFETY: `data` and `nine` live until the waits below return.
                unsafe {
                    if rank == 1 {
                        let id = comm.isend(0, nine.as_ptr() as u64, 100, 9).unwrap();
                        comm.wait(id, "send of tag 9").unwrap();
                    }
                    for d in &data {
                        let id = comm.isend(0, d.as_ptr() as u64, LEN as u64, 5).unwrap();
                        comm.wait(id, "send").unwrap();
                    }
                }
            }
            let mut buf = f32s(&values(rank, 1000));
            comm.all_reduce(&mut buf, DType::F32, ReduceOp::Sum).unwrap();
            assert!(buf == reference(4, 1000, ReduceOp::Sum), "all_reduce after, rank {rank}");
            msgs
        });
        let mut seen = [0usize; 4];
        for (from, b) in &got[0] {
            assert!((1..4).contains(from), "sender {from}");
            assert!(
                *b == any_msg(*from, seen[*from], LEN),
                "message {} of rank {from}",
                seen[*from]
            );
            seen[*from] += 1;
        }
        assert_eq!(seen, [0, 2, 2, 2], "tcp {tcp}");
    }
}

#[test]
fn a_receive_from_any_rank_fails_on_another_length_on_silence_and_alone() {
    // A message of its tag and another length: an error naming both, nothing written.
    let got = group_with(2, 4096, Duration::from_secs(5), |rank, comm| {
        let data = [0x11u8; 64];
        if rank == 1 {
            // SAFETY: `data` lives until the wait returns (or the group fails).
            let id = unsafe { comm.isend(0, data.as_ptr() as u64, 64, 3) };
            let _ = id.map(|id| comm.wait(id, "send"));
            return None;
        }
        let mut buf = vec![0xA5u8; 32];
        // SAFETY: `buf` lives until the wait returns.
        let id = unsafe { comm.irecv_any(buf.as_mut_ptr() as u64, 32, 3) };
        let err = id.and_then(|id| comm.wait(id, "recv from any rank")).err();
        Some((err.map(|e| e.to_string()), buf.iter().all(|&b| b == 0xA5)))
    });
    let (err, untouched) = got[0].clone().unwrap_or_else(|| panic!("rank 0 reported"));
    let err = err.unwrap_or_else(|| panic!("the receive of 32 bytes took 64"));
    assert!(err.contains("rank 1 has 64 bytes") && err.contains("expects 32"), "{err}");
    assert!(untouched, "the receive's buffer was written");

    // Nobody sends: a timeout within the group's that blames no rank (any might have sent).
    let got = group_with(3, 4096, Duration::from_millis(500), |rank, comm| {
        if rank != 0 {
            return None;
        }
        let mut buf = [0u8; 8];
        // SAFETY: `buf` lives until the wait returns.
        let id = unsafe { comm.irecv_any(buf.as_mut_ptr() as u64, 8, 0) }.unwrap();
        Some(comm.wait(id, "recv from any rank").err())
    });
    match got.into_iter().next().flatten() {
        Some(Some(e @ Error::Timeout { .. })) => {
            assert!(e.ranks().is_empty() && e.to_string().contains("any rank"), "{e}")
        }
        other => panic!("not a timeout: {other:?}"),
    }

    // Alone in its group: refused at once.
    let got = group(1, 4096, |_, comm| {
        let mut buf = [0u8; 8];
        // SAFETY: nothing is queued (refused).
        unsafe { comm.irecv_any(buf.as_mut_ptr() as u64, 8, 0) }.err().map(|e| e.to_string())
    });
    let err = got[0].clone().unwrap_or_else(|| panic!("a rank alone received from any rank"));
    assert!(err.contains("alone"), "{err}");
}

#[test]
fn ranks_out_of_step_fail_at_once_naming_both_calls_and_leave_the_buffers_alone() {
    // Rank 1 receives straight into the caller's buffer in each case, so a round that took
    // another call's bytes would write it: another collective (all_gather's slot of rank 0);
    // the same collective a call later (rank 1 ran a broadcast of nothing first); a
    // point-to-point message where a collective's round was due.
    for case in 0..3 {
        let got = group_with(2, 4096, Duration::from_secs(5), move |rank, comm| {
            let mut buf = vec![0xA5u8; 64];
            let data = [0x11u8; 64];
            match (case, rank) {
                (0, 0) => comm.all_reduce(&mut buf, DType::U8, ReduceOp::Sum).err(),
                (0, 1) => {
                    let mut out = vec![0xA5u8; 128];
                    let e = comm.all_gather(&mut out, &data).err();
                    // Its own block is copied first; rank 0's slot must stay as it was.
                    assert!(out[..64].iter().all(|&b| b == 0xA5), "all_gather took bytes");
                    e
                }
                (1, 0) => {
                    // The root only sends (into a ring with room): it may finish.
                    let _ = comm.broadcast(&mut buf.clone(), 0);
                    return None;
                }
                (1, 1) => {
                    comm.broadcast(&mut [], 0).unwrap();
                    comm.broadcast(&mut buf, 0).err()
                }
                (2, 0) => {
                    // SAFETY: `data` lives until the wait returns.
                    let id = unsafe { comm.isend(1, data.as_ptr() as u64, 64, 7) }.unwrap();
                    let _ = comm.wait(id, "send");
                    return None;
                }
                _ => comm.broadcast(&mut buf, 0).err(),
            }
            .map(|e| (e.to_string(), buf.iter().all(|&b| b == 0xA5)))
        });
        let (err, untouched) =
            got[1].clone().unwrap_or_else(|| panic!("case {case}: rank 1 succeeded"));
        let (theirs, ours) = match case {
            0 => ("collective call #1 (all_reduce)", "collective call #1 (all_gather)"),
            1 => ("collective call #1 (broadcast)", "collective call #2 (broadcast)"),
            _ => ("a point-to-point message (tag 7, 64 bytes)", "collective call #1 (broadcast)"),
        };
        assert!(
            err.contains(&format!("rank 0's next message is {theirs}"))
                && err.contains(&format!("this rank is in {ours}")),
            "case {case}: {err}"
        );
        assert!(untouched, "case {case}: rank 1's buffer was written");
        if case == 0 {
            let (err0, untouched0) =
                got[0].clone().unwrap_or_else(|| panic!("case {case}: rank 0 succeeded"));
            assert!(
                err0.contains("rank 1's next message is collective call"),
                "case {case}: {err0}"
            );
            assert!(untouched0, "case {case}: rank 0's buffer was written");
        }
    }
}

#[test]
fn a_rank_late_to_a_direct_read_call_fails_it_instead_of_returning_reused_bytes() {
    // Rank 1 pauses after the addresses are swapped, before its reads (a stopped process).
    // Rank 0 reads, sends its token, times out on rank 1's, returns the error and reuses its
    // input (0xEE) while rank 1 is still paused. Rank 1 then reads that, and rank 0's token is
    // already there: only rank 0's abort word tells rank 1 its call failed.
    let len = 1 << 20;
    let got = group_with(2, 64 << 10, Duration::from_millis(300), move |rank, comm| {
        comm.set_staged_sizes(usize::MAX, 0); // nothing staged: the direct reads
        let mut mine = vec![rank as u8 + 1; len];
        let mut all = vec![0u8; 2 * len];
        if rank == 1 {
            comm.be_late_for_test(Duration::from_millis(1000));
        }
        let out = comm.all_gather(&mut all, &mine).map_err(|e| e.to_string());
        if rank == 0 {
            assert!(out.is_err(), "rank 0 waited past its timeout for rank 1: {out:?}");
            mine.fill(0xEE);
            // Its buffer stays (reused) while rank 1 reads it.
            std::thread::sleep(Duration::from_millis(1500));
        }
        out.map(|()| all.iter().filter(|&&b| b == 0xEE).count())
    });
    match &got[1] {
        Ok(reused) => {
            panic!("rank 1's all_gather succeeded ({reused} bytes of rank 0's reused buffer)")
        }
        Err(e) => assert!(e.contains("rank 1") || e.contains("rank 0"), "{e}"),
    }
}

#[test]
fn a_rank_late_to_an_all_to_all_through_pipes_fails_it_instead_of_returning_reused_bytes() {
    // As the test above, through the pipes: rank 1 pauses before its pipes, its blocks larger
    // than a pipe. The others time out waiting for its block, return the error and reuse their
    // inputs (0xEE) while it is paused; the pipes hold references to their pages, not a copy:
    // rank 1 must not return what it then takes (it fails waiting for its own block to be
    // taken).
    a_late_rank_fails_every_rank(1 << 20, |comm| {
        comm.be_late_for_test(Duration::from_millis(1000));
    });
}

#[test]
fn a_rank_stopped_between_its_sends_and_its_reads_fails_instead_of_returning_reused_bytes() {
    // Blocks that fit in a pipe: rank 1 sends its blocks, then pauses before it reads the
    // others'. Ranks 0 and 2 take rank 1's blocks, time out waiting for it to take theirs,
    // and reuse their inputs while it is paused: rank 1 then reads the reused bytes and every
    // pipe of its completes; only the abort words, read after the pipes, fail its call.
    a_late_rank_fails_every_rank(140_000, |comm| {
        comm.pause_in_pipes_for_test(Duration::from_millis(1000));
    });
}

/// Three ranks' all_to_all of `len`-byte blocks through pipes (300 ms timeout), rank 1 held up
/// for 1 s by `stall`; ranks 0 and 2 fail, then reuse their inputs (0xEE) while it is held up.
/// Every rank must fail naming rank 1, none return the reused bytes.
fn a_late_rank_fails_every_rank(len: usize, stall: fn(&mut Comm)) {
    let n = 3;
    let got = group_with(n, 64 << 10, Duration::from_millis(300), move |rank, comm| {
        let mut mine = vec![rank as u8 + 1; n * len];
        let mut out = vec![0u8; n * len];
        if rank == 1 {
            stall(comm);
        }
        let res = comm.all_to_all(&mut out, &[len; 3], &mine, &[len; 3]);
        let res = res.map_err(|e| e.to_string());
        if rank != 1 {
            assert!(res.is_err(), "rank {rank} waited past its timeout for rank 1: {res:?}");
            mine.fill(0xEE);
            std::thread::sleep(Duration::from_millis(1500));
        }
        (res.map(|()| out.iter().filter(|&&b| b == 0xEE).count()), comm.algorithm())
    });
    assert_eq!(got[1].1, "pipes", "the pairs moved their blocks through pipes");
    for (rank, (res, _)) in got.iter().enumerate() {
        match res {
            Ok(reused) => panic!("rank {rank}'s all_to_all succeeded ({reused} reused bytes)"),
            // Everyone names the rank that was late.
            Err(e) => assert!(e.contains("rank 1"), "rank {rank}: {e}"),
        }
    }
}

#[test]
fn a_poisoned_group_moves_no_more_bytes_into_a_pending_receive() {
    // Rank 0 posts a receive, then a collective that fails (rank 1 is not in it): the group
    // is poisoned. Rank 1 sends the message after that; testing the receive must not take it
    // into a buffer whose operation already failed.
    let sent = Arc::new(Barrier::new(2));
    let got = group_with(2, 4096, Duration::from_millis(300), move |rank, comm| {
        let data = [0x11u8; 64];
        if rank == 1 {
            sent.wait();
            // SAFETY: `data` lives until the wait returns.
            if let Ok(id) = unsafe { comm.isend(0, data.as_ptr() as u64, 64, 7) } {
                let _ = comm.wait(id, "send");
            }
            sent.wait();
            return None;
        }
        let mut x = vec![0xA5u8; 64];
        // SAFETY: `x` lives until the end of the body, after the communicator's last use.
        let id = unsafe { comm.irecv(1, x.as_mut_ptr() as u64, 64, 7) }.unwrap();
        let failed = comm.all_reduce(&mut [0u8; 8], DType::U8, ReduceOp::Sum).is_err();
        sent.wait();
        sent.wait();
        let done = (0..100).any(|_| comm.test(id));
        let waited = comm.wait(id, "recv").map_err(|e| e.to_string());
        Some((failed, done, waited, x.iter().all(|&b| b == 0xA5)))
    });
    let (failed, done, waited, untouched) = got[0].clone().unwrap();
    assert!(failed, "rank 0's all_reduce without rank 1 must fail");
    assert!(!done, "a receive of a poisoned group completed");
    assert!(waited.is_err(), "its wait must fail");
    assert!(untouched, "the message was taken into the receive's buffer after the group failed");
}

#[test]
fn all_to_all_splits_that_overflow_when_summed_are_refused() {
    let got = group(2, 4096, |_, comm| {
        let (mut out, input) = ([0u8; 1], [0u8; 1]);
        comm.all_to_all(&mut out, &[usize::MAX, 2], &input, &[1, 0]).unwrap_err().to_string()
    });
    for e in got {
        assert!(e.contains("do not match"), "{e}");
    }
}

#[test]
fn staged_collectives_of_different_sizes_on_the_ranks_fail_naming_both() {
    // Rank 1 passes half as much again as rank 0: reading past what rank 0 staged (bytes of
    // no call) must fail the call on both ranks, not return them.
    for case in 0..3 {
        let got = group(2, 64 << 10, move |rank, comm| {
            comm.set_staged_sizes(0, usize::MAX);
            let len = if rank == 0 { 1 << 20 } else { 3 << 19 };
            let out = match case {
                0 => comm.all_reduce(&mut vec![1u8; len], DType::F32, ReduceOp::Sum),
                1 => comm.all_gather(&mut vec![0u8; 2 * len], &vec![1u8; len]),
                _ => comm.reduce_scatter(
                    &mut vec![0u8; len],
                    &vec![1u8; 2 * len],
                    DType::F32,
                    ReduceOp::Sum,
                ),
            };
            (comm.algorithm(), out.map_err(|e| e.to_string()))
        });
        for (rank, (algorithm, out)) in got.into_iter().enumerate() {
            assert_eq!(algorithm, "staged", "case {case}, rank {rank}");
            let e = out.expect_err("a staged call of different sizes succeeded");
            assert!(
                e.contains("different sizes") && e.contains("rank"),
                "case {case}, rank {rank}: {e}"
            );
        }
    }
}

#[test]
fn a_rank_that_never_comes_is_a_timeout_naming_it() {
    let got = group_with(2, 4096, Duration::from_millis(300), |rank, comm| {
        if rank == 0 {
            let mut buf = vec![0u8; 64];
            // Rank 1 never joins this all_reduce: rank 0's times out, naming rank 1.
            let err = comm.all_reduce(&mut buf, DType::U8, ReduceOp::Sum).unwrap_err();
            let again = comm.barrier().unwrap_err();
            Some((err, again))
        } else {
            None
        }
    });
    let (err, again) = got[0].clone().unwrap();
    match err {
        Error::Timeout { ranks, .. } => assert_eq!(ranks, vec![1]),
        other => panic!("expected a timeout, got {other}"),
    }
    assert!(matches!(again, Error::Poisoned { .. }), "{again}");
    // A later operation names the rank the first failure named (a failure a poll found in
    // `test()` reaches its caller only that way).
    assert_eq!(again.ranks(), vec![1], "{again}");
}

#[test]
fn a_rank_that_fails_tells_every_peer_reached_over_tcp_whom_it_blames() {
    // Ranks reached through engine transfers learn of a failure by a write into their ring's
    // abort word (both peers told at once). Rank 0's receive from rank 1 times out (rank 1
    // sends nothing); ranks 1 and 2 then wait for rank 0 in a barrier: they fail at once
    // naming rank 1, the rank rank 0 blamed, where without the word they would time out
    // naming rank 0.
    let failed = Arc::new(Barrier::new(3));
    let got = group_via(3, 4096, Duration::from_millis(400), true, move |rank, comm| {
        if rank == 0 {
            let mut x = [0u8; 8];
            // SAFETY: `x` lives until the wait returns.
            let id = unsafe { comm.irecv(1, x.as_mut_ptr() as u64, 8, 3) }.unwrap();
            let e = comm.wait(id, "recv").unwrap_err();
            failed.wait();
            return e;
        }
        failed.wait();
        comm.barrier().unwrap_err()
    });
    assert_eq!(got[0].ranks(), vec![1], "rank 0: {}", got[0]);
    for (rank, e) in got.iter().enumerate().skip(1) {
        match e {
            Error::RankFailed { rank: r, reason, .. } => {
                assert_eq!(*r, 1, "rank {rank}: {e}");
                assert!(reason.contains("rank 0 failed"), "rank {rank}: {e}");
            }
            other => panic!("rank {rank}: expected the failure rank 0 told, got {other}"),
        }
    }
}

#[test]
fn reductions_out_of_the_ring_survive_elements_split_by_its_end() {
    // A 1-byte barrier token first, so the 8-byte elements that follow sit across the end of
    // the 4 KiB rings now and then; the ring all_reduce reduces them straight out of the ring.
    for n in [2, 3] {
        let got = group(n, 4096, move |rank, comm| {
            comm.barrier().unwrap();
            let v: Vec<u8> =
                (0..20_000u64).flat_map(|i| ((i * 7 + rank as u64) as f64).to_ne_bytes()).collect();
            let mut buf = v.clone();
            comm.all_reduce(&mut buf, DType::F64, ReduceOp::Sum).unwrap();
            buf
        });
        let want: Vec<u8> = (0..20_000u64)
            .flat_map(|i| ((0..n as u64).map(|r| (i * 7 + r) as f64).sum::<f64>()).to_ne_bytes())
            .collect();
        for (rank, buf) in got.iter().enumerate() {
            assert!(*buf == want, "{n} ranks: rank {rank} differs");
        }
    }
}

#[test]
fn ranks_reached_through_engine_transfers_over_tcp_run_every_collective() {
    // What ranks on other hosts get: rings written with one-sided WRITEs, counters read with
    // READs, all over the engine's tcp transport.
    for n in [2, 3] {
        let got = group_via(n, 4096, Duration::from_secs(20), true, move |rank, comm| {
            let channels = comm.channels();
            assert!(
                channels
                    .iter()
                    .enumerate()
                    .all(|(r, c)| *c == if r == rank { "self" } else { "engine" }),
                "{channels:?}"
            );
            comm.barrier().unwrap();
            let v: Vec<u8> =
                (0..30_000u64).flat_map(|i| ((i + rank as u64) as f64).to_ne_bytes()).collect();
            let mut sum = v.clone();
            comm.all_reduce(&mut sum, DType::F64, ReduceOp::Sum).unwrap();
            let mine: Vec<u8> = (0..5000).map(|i| (i * 3 + rank * 7) as u8).collect();
            let mut all = vec![0u8; n * mine.len()];
            comm.all_gather(&mut all, &mine).unwrap();
            (sum, all, mine)
        });
        let want: Vec<u8> = (0..30_000u64)
            .flat_map(|i| ((0..n as u64).map(|r| (i + r) as f64).sum::<f64>()).to_ne_bytes())
            .collect();
        let concat: Vec<u8> = got.iter().flat_map(|g| g.2.clone()).collect();
        for (rank, (sum, all, _)) in got.iter().enumerate() {
            assert!(*sum == want, "{n} ranks over tcp: all_reduce on rank {rank}");
            assert!(*all == concat, "{n} ranks over tcp: all_gather on rank {rank}");
        }
    }
}

#[test]
fn collectives_staged_through_shared_memory_in_pieces_match_the_reference() {
    // Staged from the first byte to any size: larger than the 8 MiB stage, the collectives run
    // in pieces; odd sizes leave pieces and blocks of any length.
    let n = 3;
    let count = (20 << 20) / 4 + 7;
    let rs = (3 << 20) / 4 + 3;
    let count64 = (9 << 20) / 8 + 5;
    let f64s = |rank: usize, count: usize| -> Vec<u8> {
        values(rank, count).iter().flat_map(|&x| f64::from(x).to_ne_bytes()).collect()
    };
    let got = group(n, 64 << 10, move |rank, comm| {
        assert!(comm.reads_directly(), "rank {rank}: threads of one process read each other");
        comm.set_staged_sizes(0, usize::MAX);
        let mut sum = f32s(&values(rank, count));
        comm.all_reduce(&mut sum, DType::F32, ReduceOp::Sum).unwrap();
        assert_eq!(comm.algorithm(), "staged", "rank {rank}: the metrics' label");
        let mut small = f32s(&values(rank, 70_001));
        comm.all_reduce(&mut small, DType::F32, ReduceOp::Max).unwrap();
        let mut gathered = Vec::new();
        for len in [1usize, 4099, (9 << 20) + 5] {
            let mine: Vec<u8> = (0..len).map(|i| (i * 7 + rank * 31) as u8).collect();
            let mut all = vec![0xA5u8; n * len];
            comm.all_gather(&mut all, &mine).unwrap();
            assert_eq!(comm.algorithm(), "staged", "rank {rank}: all_gather of {len}");
            gathered.push((mine, all));
        }
        let mut scattered = Vec::new();
        for c in [1usize, rs] {
            let mut out = vec![0xA5u8; c * 4];
            comm.reduce_scatter(&mut out, &f32s(&values(rank, n * c)), DType::F32, ReduceOp::Min)
                .unwrap();
            assert_eq!(comm.algorithm(), "staged", "rank {rank}: reduce_scatter of {c}");
            scattered.push(out);
        }
        // 8-byte elements and AVG (finished after the pieces) across piece edges.
        let mut avg: Vec<u8> = f64s(rank, count64);
        comm.all_reduce(&mut avg, DType::F64, ReduceOp::Avg).unwrap();
        assert_eq!(comm.algorithm(), "staged", "rank {rank}: all_reduce of f64");
        (sum, small, gathered, scattered, avg)
    });
    let mut avg = f64s(0, count64);
    for r in 1..n {
        reduce_into(&mut avg, &f64s(r, count64), DType::F64, ReduceOp::Sum);
    }
    finish_avg(&mut avg, DType::F64, n);
    let sum = reference(n, count, ReduceOp::Sum);
    let max = reference(n, 70_001, ReduceOp::Max);
    for (rank, (s, m, gathered, scattered, a)) in got.iter().enumerate() {
        assert!(*a == avg, "staged all_reduce avg of f64 on rank {rank}");
        assert!(*s == sum, "staged all_reduce sum on rank {rank}");
        assert!(*m == max, "staged all_reduce max on rank {rank}");
        for (i, (_, all)) in gathered.iter().enumerate() {
            let concat: Vec<u8> = got.iter().flat_map(|g| g.2[i].0.clone()).collect();
            assert!(*all == concat, "staged all_gather {i} on rank {rank}");
        }
        for (out, c) in scattered.iter().zip([1usize, rs]) {
            let min = reference(n, n * c, ReduceOp::Min);
            assert!(*out == min[rank * c * 4..(rank + 1) * c * 4], "staged reduce_scatter of {c}");
        }
    }
}
