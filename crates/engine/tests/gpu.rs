//! GPU transports between two processes, one GPU each. Random data, poisoned destinations,
//! every byte checked.
//!
//! The tests that need two GPUs with peer access are `#[ignore]`d, so that a plain
//! `cargo test` on a machine without them reports them as ignored rather than passed;
//! `scripts/gpu-test.sh` runs them with `--ignored --skip zz_` on a GPU host. Run on a machine
//! without the GPUs, they fail and say what is missing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin};
use std::time::{Duration, Instant};

use common::{random_bytes, status};
use tidewire::gpu::alloc::{self, AllocKind};
use tidewire::{BatchOptions, Engine, EngineConfig, Error, Op, PeerId, Request};

const CHILD: &str = "zz_gpu_child_entry";
/// The child registers its region this far into its allocation (a sub-allocation).
const OFFSET: u64 = 1 << 20;

/// Not a test: the body of the child target process the tests below start.
#[test]
#[ignore = "helper, not a test: the body of the child processes other tests start"]
fn zz_gpu_child_entry() {
    let Ok(kind) = std::env::var("TW_GPU_KIND") else { return };
    let len: u64 = std::env::var("TW_GPU_LEN").unwrap().parse().unwrap();
    let seed: u64 = std::env::var("TW_GPU_SEED").unwrap().parse().unwrap();
    let kind = if kind == "vmm" { AllocKind::VmmPosixFd } else { AllocKind::Malloc };
    let port = std::env::var("TW_GPU_PORT").ok().map(|p| p.parse().unwrap());
    let e = Engine::new(EngineConfig { port, ..EngineConfig::default() }).unwrap();
    let a = alloc::alloc_device(len + 2 * OFFSET, 1, Some(kind)).unwrap();
    let addr = a.ptr + OFFSET;
    fill(addr, &random_bytes(len as usize, seed));
    // SAFETY: inside a live allocation that this process never frees.
    unsafe { e.register(addr, len, "cuda:1").unwrap() };
    if let Ok(shape) = std::env::var("TW_GPU_LAYOUT") {
        // "layers pages page_size": a KV layout "kv" over the region, layer after layer.
        let v: Vec<u64> = shape.split_whitespace().map(|x| x.parse().unwrap()).collect();
        let layers: Vec<u64> = (0..v[0]).map(|l| addr + l * v[1] * v[2]).collect();
        e.register_layout("kv", &layers, v[1], v[2]).unwrap();
    }
    println!("READY {} {addr}", e.name());
    let mut lines = std::io::stdin().lock().lines();
    while let Some(Ok(line)) = lines.next() {
        if line.trim() == "unregister" {
            e.unregister(addr).unwrap();
            println!("UNREGISTERED");
        }
    }
    std::process::exit(0);
}

struct GpuChild {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    name: String,
    addr: u64,
}

impl GpuChild {
    fn spawn(kind: &str, len: u64, seed: u64) -> Self {
        Self::spawn_with(kind, len, seed, None, None)
    }

    /// As `spawn`, bound to RPC port `port` (the same segment name as an earlier child's).
    fn spawn_on(kind: &str, len: u64, seed: u64, port: Option<u16>) -> Self {
        Self::spawn_with(kind, len, seed, port, None)
    }

    /// As `spawn_on`, registering the layout "kv" of `(layers, pages, page size)` over its
    /// region when `layout` is given.
    fn spawn_with(
        kind: &str,
        len: u64,
        seed: u64,
        port: Option<u16>,
        layout: Option<(u64, u64, u64)>,
    ) -> Self {
        let mut env = vec![
            ("TW_GPU_KIND", kind.to_string()),
            ("TW_GPU_LEN", len.to_string()),
            ("TW_GPU_SEED", seed.to_string()),
        ];
        if let Some(p) = port {
            env.push(("TW_GPU_PORT", p.to_string()));
        }
        if let Some((layers, pages, page)) = layout {
            env.push(("TW_GPU_LAYOUT", format!("{layers} {pages} {page}")));
        }
        let (mut child, rx, ready) = common::spawn_child(CHILD, &env, Duration::from_secs(60));
        let mut parts = ready.split_whitespace();
        let name = parts.next().unwrap().to_string();
        let addr = parts.next().unwrap().parse().unwrap();
        let stdin = child.stdin.take();
        Self { child, stdin, lines: rx, name, addr }
    }

    fn say(&mut self, cmd: &str, expect: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        loop {
            let line = self.lines.recv_timeout(Duration::from_secs(30)).expect("child answered");
            if line.contains(expect) {
                return;
            }
        }
    }
}

impl Drop for GpuChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails the test, saying what is missing, unless GPUs 0 and 1 exist and reach each other:
/// an ignored test that was asked to run must not pass having done nothing.
fn require_two_gpus() {
    let missing = match tidewire::gpu::topology() {
        Err(e) => format!("no GPU ({e})"),
        Ok(t) if t.gpus.len() < 2 => format!("found {} GPU(s)", t.gpus.len()),
        Ok(t) if !(t.peer_access[0][1] && t.peer_access[1][0]) => {
            "GPUs 0 and 1 have no peer access".to_string()
        }
        Ok(_) => return,
    };
    panic!("this test needs two CUDA GPUs with peer access on one host: {missing}");
}

fn fill(addr: u64, data: &[u8]) {
    // SAFETY: the callers pass live allocations at least `data.len()` long.
    unsafe { alloc::copy_sync(addr, data.as_ptr() as u64, data.len() as u64).unwrap() };
}

fn fetch(addr: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    // SAFETY: as in `fill`.
    unsafe { alloc::copy_sync(out.as_mut_ptr() as u64, addr, len).unwrap() };
    out
}

/// Local memory of one kind on cuda:0 (or pinned host), registered; returns its address.
fn local(engine: &Engine, kind: AllocKind, len: u64) -> u64 {
    if kind == AllocKind::Malloc {
        // A sub-allocation, as PyTorch's caching allocator hands out.
        let a = alloc::alloc_device(len + 2 * OFFSET, 0, Some(kind)).unwrap();
        // SAFETY: inside a live allocation freed only when the process ends.
        unsafe { engine.register(a.ptr + OFFSET, len, "cuda:0").unwrap() };
        return a.ptr + OFFSET;
    }
    engine.allocate_device(len, 0, Some(kind)).unwrap().ptr
}

/// A child target serving `len` bytes of `kind` memory on cuda:1, an engine made with `cfg`
/// that has it open as a peer, and `len` bytes of our own device memory on cuda:0.
fn pair(kind: &str, len: u64, seed: u64, cfg: EngineConfig) -> (GpuChild, Engine, PeerId, u64) {
    let child = GpuChild::spawn(kind, len, seed);
    let engine = Engine::new(cfg).unwrap();
    let peer = engine.open_segment(&child.name).unwrap();
    let mine = engine.allocate_device(len, 0, None).unwrap().ptr;
    (child, engine, peer, mine)
}

/// Scattered pages, a large run and an odd-sized, odd-aligned run, both directions.
fn round_trip(engine: &Engine, peer: PeerId, mine: u64, theirs: u64, len: u64, seed: u64) {
    let page = 4096u64;
    let pages = (len / 2 / page).min(2048);
    let big = len / 4;
    let mut order: Vec<u64> = (0..pages).collect();
    order.reverse();
    let mut reqs: Vec<(u64, u64, u64)> = order
        .iter()
        .enumerate()
        .map(|(i, &p)| (i as u64 * page, p * page, page)) // (local, remote, len)
        .collect();
    reqs.push((len / 2, len / 2, big));
    reqs.push((len / 2 + big + 3, len / 2 + big + 5, 4093));
    let batch = |op| -> Vec<Request> {
        reqs.iter()
            .map(|&(l, r, n)| Request { op, local: mine + l, len: n, peer, remote: theirs + r })
            .collect()
    };
    // READ what the child wrote.
    fill(mine, &vec![0xA5; len as usize]);
    engine.transfer_sync(&batch(Op::Read), BatchOptions::default()).unwrap();
    let remote_now = random_bytes(len as usize, seed);
    let got = fetch(mine, len);
    for &(l, r, n) in &reqs {
        let (l, r, n) = (l as usize, r as usize, n as usize);
        assert!(got[l..l + n] == remote_now[r..r + n], "READ mismatch at local {l} (+{n})");
    }
    // WRITE fresh data, then READ it back into poisoned memory.
    let fresh = random_bytes(len as usize, seed ^ 0x5555);
    fill(mine, &fresh);
    engine.transfer_sync(&batch(Op::Write), BatchOptions::default()).unwrap();
    fill(mine, &vec![0x3C; len as usize]);
    engine.transfer_sync(&batch(Op::Read), BatchOptions::default()).unwrap();
    let back = fetch(mine, len);
    for &(l, _, n) in &reqs {
        let (l, n) = (l as usize, n as usize);
        assert!(back[l..l + n] == fresh[l..l + n], "WRITE/READ mismatch at local {l} (+{n})");
    }
}

#[test]
#[ignore = "needs two CUDA GPUs with peer access on one host; scripts/gpu-test.sh runs it"]
fn every_memory_kind_moves_every_byte_both_ways() {
    require_two_gpus();
    const LEN: u64 = 32 << 20;
    for (remote_kind, ipc) in [("vmm", false), ("malloc", false), ("vmm", true)] {
        let child = GpuChild::spawn(remote_kind, LEN, 7);
        let mut cfg = EngineConfig::default();
        cfg.transports.prefer_ipc = ipc;
        let engine = Engine::new(cfg).unwrap();
        let peer = engine.open_segment(&child.name).unwrap();
        for kind in [AllocKind::VmmPosixFd, AllocKind::Malloc, AllocKind::HostPinned] {
            let mine = local(&engine, kind, LEN);
            let info = engine.explain_from(peer, Some(mine)).unwrap();
            let decision = info.regions[0].decision.as_ref().map(|c| c.reason.clone());
            eprintln!("remote {remote_kind} ← local {}: {decision:?}", kind.name());
            assert!(decision.is_ok(), "{decision:?}");
            round_trip(&engine, peer, mine, child.addr, LEN, 7);
            // Restore the child's bytes for the next local kind.
            fill(mine, &random_bytes(LEN as usize, 7));
            let restore =
                Request { op: Op::Write, local: mine, len: LEN, peer, remote: child.addr };
            engine.transfer_sync(&[restore], BatchOptions::default()).unwrap();
        }
    }
}

#[test]
#[ignore = "needs two CUDA GPUs with peer access on one host; scripts/gpu-test.sh runs it"]
fn unregister_while_mapped_fails_the_next_request_cleanly() {
    require_two_gpus();
    const LEN: u64 = 4 << 20;
    let (mut child, engine, peer, mine) = pair("malloc", LEN, 3, EngineConfig::default());
    let req = Request { op: Op::Write, local: mine, len: LEN, peer, remote: child.addr };
    engine.transfer_sync(&[req], BatchOptions::default()).unwrap();
    child.say("unregister", "UNREGISTERED");
    let err = engine.transfer_sync(&[req], BatchOptions::default()).unwrap_err();
    assert!(matches!(err, Error::RemoteAccessDenied { .. }), "{err}");
    eprintln!("after unregister: {err}");
}

#[test]
#[ignore = "needs two CUDA GPUs with peer access on one host; scripts/gpu-test.sh runs it"]
fn a_bad_request_after_launched_pages_fails_submit_with_nothing_in_flight() {
    require_two_gpus();
    const LEN: u64 = 16 << 20;
    const PAGE: u64 = 4096;
    let (mut child, engine, peer, mine) = pair("vmm", LEN, 5, EngineConfig::default());
    let pages: Vec<Request> = (0..LEN / PAGE)
        .map(|i| Request {
            op: Op::Write,
            local: mine + i * PAGE,
            len: PAGE,
            peer,
            remote: child.addr + ((i * 7919) % (LEN / PAGE)) * PAGE,
        })
        .collect();
    // 4 096 good pages (the first 2 048 are launched while the rest are checked), then one
    // past the end of the peer's region: the submission fails and waits for what it launched.
    let mut bad = pages.clone();
    bad.push(Request { remote: child.addr + LEN - PAGE / 2, ..pages[0] });
    let err = engine.submit(&bad, BatchOptions::default()).expect_err("submit refuses");
    assert!(matches!(err, Error::RemoteAccessDenied { .. }), "{err}");
    // The marks and pins of the launched part were released: a good batch moves every byte,
    // and the peer's unregister returns at once.
    let data: Vec<u8> = (0..LEN).map(|i| (i * 13 + 7) as u8).collect();
    fill(mine, &data);
    engine.transfer_sync(&pages, BatchOptions::default()).unwrap();
    let back = engine.allocate_device(LEN, 0, None).unwrap().ptr;
    fill(back, &vec![0xA5; LEN as usize]);
    let reads: Vec<Request> = pages
        .iter()
        .map(|r| Request { op: Op::Read, local: r.local - mine + back, ..*r })
        .collect();
    engine.transfer_sync(&reads, BatchOptions::default()).unwrap();
    assert!(fetch(back, LEN) == data, "every page written and read back");
    child.say("unregister", "UNREGISTERED");
    let err = engine.transfer_sync(&pages[..1], BatchOptions::default()).unwrap_err();
    assert!(matches!(err, Error::RemoteAccessDenied { .. }), "{err}");
}

/// Free memory on cuda:1, as the driver counts it for the whole device.
fn free_on_gpu1() -> u64 {
    tidewire::gpu::Gpu::get(1).unwrap().mem_info().unwrap().0
}

/// The peer (`kind` memory on cuda:1) is SIGKILLed while batches of copies stream to it: the
/// first failure comes within a second, every call after the death fails, the mappings held
/// for it drop to zero and its GPU memory is back on cuda:1 (our import no longer keeps it);
/// the same name restarted is reached again and verified byte for byte.
fn killed_mid_stream(kind: &str, seed: u64) {
    const LEN: u64 = 256 << 20;
    let free_before = free_on_gpu1();
    let (mut child, engine, peer, mine) = pair(kind, LEN, seed, EngineConfig::default());
    let port = common::port_of(&child.name);
    let reqs: Vec<Request> = (0..64)
        .map(|i| {
            let off = i * (LEN / 64);
            Request {
                op: Op::Write,
                local: mine + off,
                len: LEN / 64,
                peer,
                remote: child.addr + off,
            }
        })
        .collect();
    engine.transfer_sync(&reqs, BatchOptions::default()).unwrap();
    let held = status(&engine, peer).mappings;
    assert!(held > 0, "{kind}: the peer's memory is mapped");
    let free_mapped = free_on_gpu1();
    eprintln!("{kind}: {held} mappings; cuda:1 free {free_before} before, {free_mapped} mapped");

    let (mut results, mut killed) = (Vec::new(), None);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let t0 = Instant::now();
        let r = engine.submit(&reqs, BatchOptions::default()).and_then(|b| b.wait());
        results.push((t0, Instant::now(), r));
        if killed.is_none() && start.elapsed() > Duration::from_millis(300) {
            let _ = child.child.kill();
            let _ = child.child.wait();
            killed = Some(Instant::now());
        }
        let failures = results.iter().filter(|(.., r)| r.is_err()).count();
        if failures >= 20 {
            break;
        }
    }
    let killed = killed.expect("the peer was killed");
    let first = results.iter().position(|(.., r)| r.is_err()).expect("a call failed");
    let (_, end, err) = &results[first];
    let after = end.saturating_duration_since(killed);
    eprintln!("{kind}: first failure {after:?} after the death: {:?}", err.as_ref().unwrap_err());
    assert!(after < Duration::from_secs(1), "{kind}: first failure {after:?} after the death");
    assert!(results[first..].iter().all(|(.., r)| r.is_err()), "no success after a failure");
    assert!(results.iter().filter(|(s, ..)| *s > killed).all(|(.., r)| r.is_err()));
    let longest = results.iter().map(|(s, e, _)| *e - *s).max().unwrap();
    assert!(longest < engine.config().deadlines.transfer, "a call took {longest:?}");
    for (.., r) in &results[first..] {
        match r.as_ref().unwrap_err() {
            Error::PeerFailed { peer: p, reason, .. } => {
                assert_eq!((&p.name, p.id), (&child.name, Some(peer)));
                assert!(reason.contains("the peer process exited"), "{reason}");
            }
            other => panic!("{kind}: unexpected error after the death: {other}"),
        }
    }
    let released =
        common::eventually(Duration::from_secs(5), || status(&engine, peer).mappings == 0);
    assert!(released, "{kind}: mappings of the dead peer: {:?}", status(&engine, peer));
    let t = Instant::now();
    let slack = 64 << 20;
    let back =
        common::eventually(Duration::from_secs(10), || free_on_gpu1() + slack >= free_before);
    eprintln!("{kind}: cuda:1 free {} after {:?}", free_on_gpu1(), t.elapsed());
    assert!(back, "{kind}: the dead peer's {LEN} bytes on cuda:1 are not back");

    let name = child.name.clone();
    drop(child);
    let restarted = GpuChild::spawn_on(kind, LEN, seed + 1, Some(port));
    assert_eq!(restarted.name, name);
    round_trip(&engine, peer, mine, restarted.addr, LEN, seed + 1);
    let s = status(&engine, peer);
    assert_eq!(s.state, tidewire::PeerState::Open);
    assert!(s.mappings > 0);
}

#[test]
#[ignore = "needs two CUDA GPUs with peer access on one host; scripts/gpu-test.sh runs it"]
fn a_killed_peer_fails_fast_its_gpu_memory_comes_back_and_its_restart_is_reached() {
    require_two_gpus();
    killed_mid_stream("vmm", 5);
    killed_mid_stream("malloc", 7);
}

#[test]
fn host_memory_registered_as_a_gpu_is_refused() {
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let buf = vec![0u8; 4096];
    // SAFETY: a live vector; the registration is expected to fail.
    let r = unsafe { engine.register(buf.as_ptr() as u64, 4096, "cuda:0") };
    assert!(matches!(r, Err(Error::LocationMismatch { .. })), "{r:?}");
}

/// Reads the 32-bit liveness word at `addr` (pinned host memory of this process).
fn flag(addr: u64) -> u32 {
    // SAFETY: the address comes from a live `MappedPeer`, whose flag is a pinned word.
    unsafe { std::ptr::read_volatile(addr as *const u32) }
}

#[test]
#[ignore = "needs two CUDA GPUs with peer access on one host; scripts/gpu-test.sh runs it"]
fn a_mapped_gpu_peer_is_written_through_its_device_pointer_and_its_flag_drops_at_death() {
    require_two_gpus();
    const LEN: u64 = 64 << 20;
    let free_before = free_on_gpu1();
    let (mut child, engine, peer, mine) = pair("vmm", LEN, 41, EngineConfig::default());
    let m = engine.map_peer(peer, child.addr, LEN, Some(0)).unwrap();
    assert_eq!(m.device(), Some(0));
    assert_eq!(m.transport(), tidewire::core::select::TransportKind::Nvlink);
    let word = m.alive_flag().expect("a device-visible flag");
    assert_eq!(flag(word), 1);
    // The peer's bytes through the device pointer, then new bytes written through it and read
    // back by the engine into poisoned memory.
    // The mapping is valid in cuda:0's context (the owner is cuda:1): copy there.
    let mut seen = vec![0u8; LEN as usize];
    // SAFETY: a host vector of LEN bytes and the live mapping of LEN bytes.
    unsafe { alloc::copy_sync_on(0, seen.as_mut_ptr() as u64, m.addr(), LEN).unwrap() };
    assert!(seen == random_bytes(LEN as usize, 41));
    let data = random_bytes(LEN as usize, 42);
    // SAFETY: as above.
    unsafe { alloc::copy_sync_on(0, m.addr(), data.as_ptr() as u64, LEN).unwrap() };
    fill(mine, &vec![0xA5; LEN as usize]);
    let read = Request { op: Op::Read, local: mine, len: LEN, peer, remote: child.addr };
    engine.transfer_sync(&[read], BatchOptions::default()).unwrap();
    assert!(fetch(mine, LEN) == data, "written through the mapping, read by the engine");

    let _ = child.child.kill();
    let _ = child.child.wait();
    assert!(common::eventually(Duration::from_secs(1), || flag(word) == 0), "the flag drops");
    assert!(!m.is_alive());
    drop(m);
    assert!(common::eventually(Duration::from_secs(5), || status(&engine, peer).mappings == 0));
    let back =
        common::eventually(Duration::from_secs(10), || free_on_gpu1() + (64 << 20) >= free_before);
    assert!(back, "the dead peer's memory on cuda:1 is back once the handle is dropped");
}

#[test]
#[ignore = "needs two CUDA GPUs with peer access on one host; scripts/gpu-test.sh runs it"]
fn a_prepared_gpu_plan_runs_many_times_and_goes_stale_when_the_peer_dies() {
    require_two_gpus();
    const LEN: u64 = 16 << 20;
    let page = 4096u64;
    let pages = 2048u64;
    let (mut child, engine, peer, mine) = pair("vmm", LEN, 51, EngineConfig::default());
    let back = engine.allocate_device(LEN, 0, None).unwrap().ptr;
    let scatter = |op: Op, local: u64| -> Vec<Request> {
        (0..pages)
            .map(|i| Request {
                op,
                local: local + i * page,
                len: page,
                peer,
                remote: child.addr + ((i * 7919) % pages) * page,
            })
            .collect()
    };
    let writes = engine.prepare(&scatter(Op::Write, mine)).unwrap();
    let reads = engine.prepare(&scatter(Op::Read, back)).unwrap();
    for round in 0..100u64 {
        let data = random_bytes((pages * page) as usize, 1000 + round);
        fill(mine, &data);
        fill(back, &vec![0xA5; (pages * page) as usize]);
        engine.execute(&writes, BatchOptions::default()).unwrap().wait().unwrap();
        engine.execute(&reads, BatchOptions::default()).unwrap().wait().unwrap();
        assert!(fetch(back, pages * page) == data, "round {round}: every byte");
    }
    let _ = child.child.kill();
    let _ = child.child.wait();
    let stale = common::eventually(Duration::from_secs(2), || {
        matches!(engine.execute(&writes, BatchOptions::default()), Err(Error::StalePlan { .. }))
    });
    assert!(stale, "a plan of a dead peer is stale");
    drop((writes, reads));
    assert!(common::eventually(Duration::from_secs(5), || status(&engine, peer).mappings == 0));
}

/// Page index arrays of `n` pairs out of `pages`: mostly single pairs, every eighth a run of up
/// to 4 consecutive pairs (they coalesce), at shuffled places on each side; no page is used
/// twice on either side.
fn page_pairs(n: usize, pages: u64, seed: u64) -> (Vec<u64>, Vec<u64>) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut lb, mut rb): (Vec<u64>, Vec<u64>) =
        ((0..pages / 4).collect(), (0..pages / 4).collect());
    lb.shuffle(&mut rng);
    rb.shuffle(&mut rng);
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for (j, (l, r)) in lb.iter().zip(&rb).enumerate() {
        let run = if j % 8 == 0 { 1 + (j as u64 / 8) % 4 } else { 1 };
        local.extend((0..run).map(|p| l * 4 + p));
        remote.extend((0..run).map(|p| r * 4 + p));
        if local.len() >= n {
            break;
        }
    }
    local.truncate(n);
    remote.truncate(n);
    (local, remote)
}

#[test]
#[ignore = "needs two CUDA GPUs with peer access on one host; scripts/gpu-test.sh runs it"]
fn paged_nvlink_transfers_match_raw_descriptors_byte_for_byte() {
    require_two_gpus();
    const PAGE: u64 = 4096;
    const PAGES: u64 = 16384;
    const LAYERS: u64 = 2;
    const LEN: u64 = LAYERS * PAGES * PAGE;
    let child = GpuChild::spawn_with("vmm", LEN, 21, None, Some((LAYERS, PAGES, PAGE)));
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let peer = engine.open_segment(&child.name).unwrap();
    let mine = engine.allocate_device(LEN, 0, None).unwrap().ptr;
    let layers: Vec<u64> = (0..LAYERS).map(|l| mine + l * PAGES * PAGE).collect();
    engine.register_layout("kv", &layers, PAGES, PAGE).unwrap();
    // 4,000 pairs, some coalesced: ≈ 3,500 requests per layer, more than one launch window
    // (the first window ends inside layer 0, the second spans both layers).
    let (local_pages, remote_pages) = page_pairs(4000, PAGES, 5);
    let t = |op| tidewire::PageTransfer {
        peer,
        op,
        local: "kv",
        remote: "kv",
        local_pages: &local_pages,
        remote_pages: &remote_pages,
    };
    let runs = engine.page_requests(&t(Op::Write)).unwrap().len() as u64;
    assert!(runs < 4000 * LAYERS && runs > 4096, "some pairs coalesce ({runs} requests)");
    // WRITE: the child's region afterwards is its own bytes with our pages in place.
    let ours = random_bytes(LEN as usize, 6);
    fill(mine, &ours);
    let batch = engine.transfer_pages(&t(Op::Write), BatchOptions::default()).unwrap();
    batch.wait().unwrap();
    assert_eq!(batch.statuses().len() as u64, runs, "one status per coalesced request");
    let mut expect = random_bytes(LEN as usize, 21);
    for l in 0..LAYERS {
        for (&lp, &rp) in local_pages.iter().zip(&remote_pages) {
            let (src, dst) =
                (((l * PAGES + lp) * PAGE) as usize, ((l * PAGES + rp) * PAGE) as usize);
            expect[dst..dst + PAGE as usize].copy_from_slice(&ours[src..src + PAGE as usize]);
        }
    }
    let whole = Request { op: Op::Read, local: mine, len: LEN, peer, remote: child.addr };
    fill(mine, &vec![0xA5; LEN as usize]);
    engine.transfer_sync(&[whole], BatchOptions::default()).unwrap();
    assert!(fetch(mine, LEN) == expect, "paged WRITE == the same pages as raw descriptors");
    // READ into poisoned pages: each local page holds its remote page, the rest stays poisoned.
    fill(mine, &vec![0x3C; LEN as usize]);
    engine.transfer_pages(&t(Op::Read), BatchOptions::default()).unwrap().wait().unwrap();
    let mut want = vec![0x3Cu8; LEN as usize];
    for l in 0..LAYERS {
        for (&lp, &rp) in local_pages.iter().zip(&remote_pages) {
            let (dst, src) =
                (((l * PAGES + lp) * PAGE) as usize, ((l * PAGES + rp) * PAGE) as usize);
            want[dst..dst + PAGE as usize].copy_from_slice(&expect[src..src + PAGE as usize]);
        }
    }
    assert!(fetch(mine, LEN) == want, "paged READ == the same pages as raw descriptors");
    // An index past the layout is refused before anything moves.
    let bad = [PAGES];
    let err = engine
        .transfer_pages(
            &tidewire::PageTransfer { local_pages: &bad, remote_pages: &bad, ..t(Op::Write) },
            BatchOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    // Past the first launch window: refused too (the launched part waited for), and the next
    // transfer runs.
    let (mut far_l, far_r): (Vec<u64>, Vec<u64>) = ((0..4000).collect(), (0..4000).rev().collect());
    far_l[3000] = PAGES + 7;
    let far = tidewire::PageTransfer { local_pages: &far_l, remote_pages: &far_r, ..t(Op::Write) };
    let err = engine.transfer_pages(&far, BatchOptions::default()).unwrap_err();
    assert!(err.to_string().contains(&format!("local page {} (index 3000)", PAGES + 7)), "{err}");
    engine.transfer_pages(&t(Op::Read), BatchOptions::default()).unwrap().wait().unwrap();
}
