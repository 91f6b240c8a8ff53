"""One rank of an EP buffer test on two GPUs (started by test_ep.py):
`ep_rank.py BODY RANK SIZE PORT [ARG]`; prints one JSON line ({"ok": ...} or {"error": ...}).

The checks follow DeepEP's low-latency test: x = rank - 128 with the last 128 channels set to
the token index; ten random -1 routing slots; every received row, count, source index and
layout entry against what the ranks' all-gathered routing says (rows packed per local expert,
our own first, then the other ranks' from ours on, each source's tokens in token order); combine with an identity expert
against the weighted sum computed here.

ARG is `key=value,...`: backend (nccl | gloo), experts, hidden (a list, `a/b/c`), p2p (1, or 0
for disable_p2p), leave (die | stall | none), graph (replays), host (1: each rank on its own
"host", so that no GPU path reaches the other)."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist

T, K = 128, 8


def parse(arg: str) -> Dict[str, str]:
    return dict(kv.split("=", 1) for kv in arg.split(",") if kv)


def setup(rank: int, size: int, port: int, backend: str) -> None:
    from rank_main import gpu_of

    # The ranks share the host's CPUs: torch's own thread pool per rank (one thread per CPU
    # each, by default) had eight ranks' checks thrash sixteen CPUs.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    torch.cuda.set_device(gpu_of(rank))
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=timedelta(seconds=60),
        device_id=torch.device("cuda", gpu_of(rank)) if backend == "nccl" else None,
    )


def inputs(rank: int, H: int, E: int, seed: int, n: int = T, device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(seed * 100 + rank)
    x = torch.full((T, H), float(rank - 128), dtype=torch.bfloat16, device=device)
    x[:, -128:] = torch.arange(T, device=device).to(torch.bfloat16).view(-1, 1)
    scores = torch.randn(T, E, device=device, generator=g).abs() + 1
    topk = scores.topk(K, dim=-1).indices
    flat = topk.view(-1)
    drop = torch.randperm(flat.numel(), device=device, generator=g)[:10]
    flat[drop] = -1
    w = torch.rand(T, K, device=device, generator=g)
    return x[:n].contiguous(), topk[:n].contiguous(), w[:n].contiguous()


def first_selections(topk: torch.Tensor) -> torch.Tensor:
    """Which routing slots select an expert ([tokens, k] bool): valid, and not a repeat of an
    expert earlier in the token's row (computed slot by slot here, not as the buffer does)."""
    keep = torch.zeros(topk.shape, dtype=torch.bool)
    rows = topk.cpu().tolist()
    for t, row in enumerate(rows):
        for j, e in enumerate(row):
            keep[t, j] = e >= 0 and e not in row[:j]
    return keep.to(topk.device)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() + 1, y.double() + 1
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom)


def gather_topk(topk: torch.Tensor, size: int) -> List[torch.Tensor]:
    """Every rank's routing (of any length), on the host."""
    n = torch.tensor([topk.shape[0]])
    ns = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather_object(ns, n)
    pad = torch.full((T, K), -1, dtype=torch.int64)
    pad[: topk.shape[0]] = topk.cpu()
    out: List[Any] = [None] * size
    dist.all_gather_object(out, pad)
    return [out[r][: int(ns[r])] for r in range(size)]


def dequant(packed: Any, fp8: bool, el: int, R: int, H: int) -> torch.Tensor:
    if not fp8:
        return packed
    q, sc = packed
    return (q.float().view(el, R * T, H // 128, 128) * sc.unsqueeze(-1)).view(el, R * T, H).to(torch.bfloat16)


def check_dispatch(rank: int, R: int, E: int, H: int, fp8: bool, all_topk: List[torch.Tensor], recv_x: torch.Tensor,
                   recv_count: torch.Tensor, handle: Tuple[Any, ...], what: str, bad: List[str]) -> None:
    el = E // R
    src_info, layout_range = handle[0].cpu(), handle[1].cpu()
    rc = recv_count.cpu()
    # Per source, which of its tokens select each of our experts ([tokens, el]); only the rows
    # a layout range covers are read back (the whole of recv_x is E·T rows of H).
    ours = torch.arange(rank * el, (rank + 1) * el)
    picks = [(all_topk[s].cpu().unsqueeze(-1) == ours).any(1) for s in range(R)]
    # Every expert's counted rows in one copy (one synchronisation, not one per range).
    counts = [min(max(int(rc[l]), 0), R * T) for l in range(el)]
    starts = [sum(counts[:l]) for l in range(el)]
    host = torch.cat([recv_x[l, : counts[l]] for l in range(el)]).float().cpu()
    for l in range(el):
        e = rank * el + l
        run = 0
        for s in [(rank + o) % R for o in range(R)]:  # our own rows first, then from rank + 1 on
            want_tokens = picks[s][:, l].nonzero().flatten().tolist()
            begin, cnt = int(layout_range[l, s]) >> 32, int(layout_range[l, s]) & 0xFFFFFFFF
            if (begin, cnt) != (run, len(want_tokens)):
                bad.append(f"{what} expert {e} from {s}: layout ({begin}, {cnt}) != ({run}, {len(want_tokens)})")
                return
            run += cnt
            if src_info[l, begin : begin + cnt].tolist() != want_tokens:
                bad.append(f"{what} expert {e} from {s}: sources differ")
            if begin + cnt > counts[l]:
                bad.append(f"{what} expert {e} from {s}: range ({begin}, {cnt}) past its {counts[l]} rows")
                return
            rows = host[starts[l] + begin : starts[l] + begin + cnt]
            want_idx = torch.tensor(want_tokens).float().view(-1, 1).expand(-1, 128)
            idx_ok = torch.allclose(rows[:, -128:], want_idx, rtol=0.07, atol=0.5) if fp8 else torch.equal(rows[:, -128:], want_idx)
            if cnt and not (bool((rows[:, :-128] == s - 128).all()) and idx_ok):
                bad.append(f"{what} expert {e} from {s}: rows differ (fp8 {fp8})")
        if int(rc[l]) != run:
            bad.append(f"{what} expert {e}: recv_count {int(rc[l])} != {run}")


def round_trip(buf: Any, rank: int, R: int, E: int, H: int, fp8: bool, mode: str, seed: int, bad: List[str], n: int = T) -> None:
    """One dispatch + combine (mode: plain, hook or async), checked."""
    import tidewire.ep

    x, topk, w = inputs(rank, H, E, seed, n)
    all_topk = gather_topk(topk, R)
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    hook_mode, async_mode = mode == "hook", mode == "async"
    packed, recv_count, handle, ev, hook = buf.dispatch(
        x, topk, active, T, E, 10_000_000, use_fp8=fp8, async_finish=async_mode, return_recv_hook=hook_mode
    )
    if hook_mode:
        # The combine waits for the hook: refused before it (the layout is not written yet).
        try:
            buf.combine(x, topk, w, active, 10_000_000, handle)
            bad.append(f"seed {seed}: a combine before the dispatch's receive hook was not refused")
        except RuntimeError as e:
            if "before that dispatch's receive hook ran" not in str(e):
                bad.append(f"seed {seed}: combine before the hook: {e}")
        hook()
        try:
            hook()
            bad.append(f"seed {seed}: a receive hook ran twice")
        except RuntimeError as e:
            if "receive hook already ran" not in str(e):
                bad.append(f"seed {seed}: the dispatch hook's second run: {e}")
    if async_mode:
        assert isinstance(ev, tidewire.ep.EventOverlap)
        ev.current_stream_wait()
    torch.cuda.synchronize()
    what = f"H {H} E {E} {mode} fp8 {fp8} seed {seed} n {n}"
    el = E // R
    recv_x = dequant(packed, fp8, el, R, H)
    check_dispatch(rank, R, E, H, fp8, all_topk, recv_x, recv_count, handle, what, bad)
    # Combine with an identity expert: out[t] = x[t] * (sum of the weights of its valid slots).
    out, ev, chook = buf.combine(recv_x, topk, w, active, 10_000_000, handle, async_finish=async_mode, return_recv_hook=hook_mode)
    if hook_mode:
        chook()
        try:
            chook()
            bad.append(f"seed {seed}: a combine's receive hook ran twice")
        except RuntimeError as e:
            if "receive hook already ran" not in str(e):
                bad.append(f"seed {seed}: the combine hook's second run: {e}")
    if async_mode:
        with ev:
            pass
    torch.cuda.synchronize()
    want = x.float() * (w * (topk >= 0).float()).sum(1, keepdim=True)
    if out.shape[0] != n:
        bad.append(f"{what}: combine shape {tuple(out.shape)}")
    elif n:
        # The fp8 bound applies to random data; these rows are exact in e4m3 but for the index.
        diff = calc_diff(out.float(), want)
        if diff > (9e-4 if fp8 else 1e-5):
            bad.append(f"{what}: combine diff {diff:.2e}")
    if int(active.sum()) != R:
        bad.append(f"{what}: active {active.tolist()}")


def known_round_trip(buf: Any, rank: int, R: int, E: int, H: int, active: torch.Tensor, seed: int, fp8: bool, what: str,
                     bad: List[str], device: str = "cuda") -> None:
    """One dispatch + combine whose results every rank checks against what it computes from
    the seeds alone (no collective: some ranks may be gone). Ranks marked 0 in `active` send
    nothing and own no expert the others reach."""
    on = active.cpu().tolist()
    x, topk, w = inputs(rank, H, E, seed, T, device)
    empty = torch.empty((0, K), dtype=torch.int64)
    all_topk = [inputs(s, H, E, seed, T, device)[1].cpu() if on[s] else empty for s in range(R)]
    packed, count, handle, _, _ = buf.dispatch(x, topk, active, T, E, 5_000_000, use_fp8=fp8)
    rx = dequant(packed, fp8, E // R, R, H)
    check_dispatch(rank, R, E, H, fp8, all_topk, rx, count, handle, what, bad)
    out, _, _ = buf.combine(rx, topk, w, active, 5_000_000, handle)
    if device == "cuda":
        torch.cuda.synchronize()
    owner_on = torch.tensor(on, device=topk.device)[topk.clamp(min=0) // (E // R)] != 0
    want = x.float() * (w * ((topk >= 0) & owner_on).float()).sum(1, keepdim=True)
    d = calc_diff(out.float(), want)
    if d > (9e-4 if fp8 else 1e-5):
        bad.append(f"{what}: combine diff {d:.2e} (active {on})")


def random_fp8_combine(buf: Any, rank: int, R: int, E: int, H: int, bad: List[str]) -> None:
    """DeepEP's fp8 bound on random data: the combine of dequantized rows against bf16."""
    g = torch.Generator(device="cuda").manual_seed(7 + rank)
    x = torch.randn(T, H, dtype=torch.bfloat16, device="cuda", generator=g)
    topk = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=-1).indices
    w = torch.rand(T, K, device="cuda", generator=g)
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    packed, _, handle, _, _ = buf.dispatch(x, topk, active, T, E, 10_000_000, use_fp8=True)
    out, _, _ = buf.combine(dequant(packed, True, E // R, R, H), topk, w, active, 10_000_000, handle)
    torch.cuda.synchronize()
    diff = calc_diff(out.float(), x.float() * w.sum(1, keepdim=True))
    if diff > 9e-4:
        bad.append(f"random fp8: combine diff {diff:.2e}")


def captured_round(buf: Any, x: torch.Tensor, topk: torch.Tensor, w: torch.Tensor, active: torch.Tensor, E: int) -> Any:
    """Dispatch -> hook -> combine -> hook of `x` (bf16) captured in a CUDA graph: the graph,
    the dispatch's receive counts and the combine's output (static tensors of its replays)."""
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        p, cnt, h, _, hook = buf.dispatch(x, topk, active, T, E, 10_000_000, use_fp8=False, return_recv_hook=True)
        hook()
        o, _, chook = buf.combine(p, topk, w, active, 10_000_000, h, return_recv_hook=True)
        chook()
    return g, cnt, o


def graph_replays(buf: Any, rank: int, R: int, E: int, H: int, replays: int, bad: List[str], update_at: int = -1) -> None:
    """Dispatch -> hook -> combine -> hook captured once, replayed with new inputs, each replay
    against eager execution of the same inputs; before replay `update_at` every rank calls
    update_ep_member (new buffers, mapped anew): the graph follows them."""
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    x_s, k_s, w_s = (t.clone() for t in inputs(rank, H, E, 50))
    g, c_s, o_s = captured_round(buf, x_s, k_s, w_s, active, E)
    for it in range(replays):
        if it == update_at:
            buf.update_ep_member()
        x, topk, w = inputs(rank, H, E, 60 + it)
        x_s.copy_(x)
        k_s.copy_(topk)
        w_s.copy_(w)
        g.replay()
        got_out, got_cnt = o_s.clone(), c_s.clone()
        torch.cuda.synchronize()
        # Against the truth too, not only eager (both read the same table): every rank active,
        # the combine the weighted row.
        d = calc_diff(got_out.float(), x.float() * (w * (topk >= 0).float()).sum(1, keepdim=True))
        if not bool(active.all()) or d > 1e-5:
            bad.append(f"graph replay {it}: active {active.tolist()}, combine diff {d:.2e}")
            break
        rx, cnt, h, _, _ = buf.dispatch(x, topk, active, T, E, 10_000_000, use_fp8=False)
        out, _, _ = buf.combine(rx, topk, w, active, 10_000_000, h)
        torch.cuda.synchronize()
        if not torch.equal(got_cnt, cnt) or not torch.equal(got_out, out):
            bad.append(f"graph replay {it}: differs from eager")
            break


def two_dispatchers(buf: Any, rank: int, R: int, E: int, H: int, bad: List[str]) -> None:
    """SGLang's two-batch overlap: two micro-batches alternate on one buffer, hook mode, each
    dispatch's receive and combine interleaved with the other's."""
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    a, b = inputs(rank, H, E, 80), inputs(rank, H, E, 81)
    for _ in range(3):
        pa, _, ha, _, hook_a = buf.dispatch(a[0], a[1], active, T, E, 10_000_000, use_fp8=False, return_recv_hook=True)
        pb, _, hb, _, hook_b = buf.dispatch(b[0], b[1], active, T, E, 10_000_000, use_fp8=False, return_recv_hook=True)
        hook_a()
        oa, _, ca = buf.combine(pa, a[1], a[2], active, 10_000_000, ha, return_recv_hook=True)
        hook_b()
        ca()
        ob, _, cb = buf.combine(pb, b[1], b[2], active, 10_000_000, hb, return_recv_hook=True)
        cb()
        torch.cuda.synchronize()
        for (x, topk, w), out, name in ((a, oa, "a"), (b, ob, "b")):
            d = calc_diff(out.float(), x.float() * (w * (topk >= 0).float()).sum(1, keepdim=True))
            if d > 1e-5:
                bad.append(f"two dispatchers: batch {name} diff {d:.2e}")


def leave(buf: Any, rank: int, R: int, E: int, H: int, how: str, info: Dict[str, Any], bad: List[str]) -> None:
    """Both ranks dispatch; rank 1 then dies (or stops answering) before its combine: rank 0's
    combine ends within the timeout + 1 s with rank 1 inactive and only its own experts' rows
    summed."""
    el = E // R
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    x, topk, w = inputs(rank, H, E, 7)
    rx, _, h, _, _ = buf.dispatch(x, topk, active, T, E, 2_000_000, use_fp8=False)
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 1:
        if how == "stall":
            time.sleep(30)
        os._exit(0)
    time.sleep(0.2)
    t0 = time.monotonic()
    out, _, _ = buf.combine(rx, topk, w, active, 2_000_000, h)
    torch.cuda.synchronize()
    info["leave_took_s"] = time.monotonic() - t0
    info["active_after"] = active.tolist()
    mine = ((topk >= 0) & (topk // el == rank)).float()
    d = calc_diff(out.float(), x.float() * (w * mine).sum(1, keepdim=True))
    if d > 1e-5:
        bad.append(f"after rank 1 left: combine diff {d:.2e}")
    # Later calls skip the rank: a dispatch + combine with it inactive come back at once.
    x, topk, w = inputs(rank, H, E, 8)
    t0 = time.monotonic()
    rx, cnt, h, _, _ = buf.dispatch(x, topk, active, T, E, 2_000_000, use_fp8=False)
    out, _, _ = buf.combine(rx, topk, w, active, 2_000_000, h)
    torch.cuda.synchronize()
    info["after_took_s"] = time.monotonic() - t0
    own = [int((topk == rank * el + l).sum()) for l in range(el)]
    if cnt.cpu().tolist() != own:
        bad.append("after rank 1 left: counts include it")
    mine = ((topk >= 0) & (topk // el == rank)).float()
    d = calc_diff(out.float(), x.float() * (w * mine).sum(1, keepdim=True))
    if d > 1e-5:
        bad.append(f"after rank 1 left, next call: combine diff {d:.2e}")
    import tidewire

    info["ep_metrics"] = [l for l in tidewire.metrics_text().splitlines() if l.startswith("tidewire_ep_")]


def body_suite(rank: int, size: int, port: int, arg: str) -> Any:
    o = parse(arg)
    if o.get("host") == "1":
        os.environ["TIDEWIRE_HOST_ID"] = f"ep-test-host-{rank}"
    import tidewire.ep

    setup(rank, size, port, o.get("backend", "nccl"))
    R, E = size, int(o.get("experts", 256))
    hiddens = [int(h) for h in o.get("hidden", "7168").split("/")]
    p2p = o.get("p2p", "1") == "1"
    bad: List[str] = []
    buf = tidewire.ep.Buffer(dist.group.WORLD, tidewire.ep.Buffer.get_ep_buffer_size_hint(T, max(hiddens), R, E), disable_p2p=not p2p)
    info: Dict[str, Any] = {"paths": buf.paths, "fallback": buf.fallback}
    seed = 0
    for i, H in enumerate(hiddens):
        # The first shape: every mode × dtype, three calls in a row each (the halves turn over).
        modes = [(fp8, mode) for fp8 in (True, False) for mode in ("plain", "hook", "async")] if i == 0 else [(True, "hook"), (False, "plain")]
        for fp8, mode in modes:
            for _ in range(3 if i == 0 else 1):
                seed += 1
                round_trip(buf, rank, R, E, H, fp8, mode, seed, bad)
    H = hiddens[0]
    random_fp8_combine(buf, rank, R, E, H, bad)
    # Few tokens: 0, 1 and T on the ranks in turn.
    for n in (0, 1, T):
        round_trip(buf, rank, R, E, H, False, "plain", 90 + n, bad, n=n if rank == 0 else (T - n if n != T else 1))
    if p2p and buf.fallback is None:
        replays = int(o.get("graph", "100"))
        graph_replays(buf, rank, R, E, H, replays, bad, update_at=replays // 2)
        info["graph_replays"] = replays
        two_dispatchers(buf, rank, R, E, H, bad)
        # Every rank re-exchanges and maps the buffers again (what a rank that came back
        # needs): later calls run as before, numbered after the highest counter.
        buf.update_ep_member()
        info["updated"] = True
        round_trip(buf, rank, R, E, H, True, "hook", 120, bad)
    how = o.get("leave", "none")
    if how != "none":
        leave(buf, rank, R, E, H, how, info, bad)
    info["bad"] = bad
    return info


def body_lifetime(rank: int, size: int, port: int, arg: str) -> Any:
    """A buffer made and destroyed 100 times: GPU memory, threads and mappings do not grow."""
    import tidewire.ep

    setup(rank, size, port, "gloo")
    R, E, H = size, 256, 2048
    size_hint = tidewire.ep.Buffer.get_ep_buffer_size_hint(T, H, R, E)

    def state() -> Tuple[int, int, int]:
        torch.cuda.synchronize()
        free, _ = torch.cuda.mem_get_info()
        with open("/proc/self/maps") as f:
            maps = sum(1 for _ in f)
        return free, len(os.listdir("/proc/self/task")), maps

    def once() -> None:
        buf = tidewire.ep.Buffer(dist.group.WORLD, size_hint)
        active = torch.ones(R, dtype=torch.int32, device="cuda")
        x, topk, w = inputs(rank, H, E, 3)
        rx, _, h, _, _ = buf.dispatch(x, topk, active, T, E, 10_000_000, use_fp8=False)
        buf.combine(rx, topk, w, active, 10_000_000, h)
        buf.destroy()
        dist.barrier()

    stray = stray_replay(rank, R, E, H, size_hint)
    for _ in range(3):
        once()
    before = state()
    for _ in range(100):
        once()
    after = state()
    return {"before": before, "after": after, "stray": stray}


def stray_replay(rank: int, R: int, E: int, H: int, size_hint: int) -> Dict[str, Any]:
    """A graph captured on a buffer, replayed (checked), then replayed again after the buffer
    was destroyed: the replay reads the zeroed table — it writes into no rank's buffer, marks
    the other ranks inactive, receives nothing and combines zeros."""
    import tidewire.ep

    buf = tidewire.ep.Buffer(dist.group.WORLD, size_hint)
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    x, topk, w = inputs(rank, H, E, 4)
    g, cnt, o = captured_round(buf, x, topk, w, active, E)
    g.replay()
    torch.cuda.synchronize()
    live = calc_diff(o.float(), x.float() * (w * (topk >= 0).float()).sum(1, keepdim=True))
    dist.barrier()
    buf.destroy()
    dist.barrier()
    o.fill_(1.0)
    g.replay()
    torch.cuda.synchronize()
    return {"live_diff": live, "active": active.tolist(), "out_zero": bool((o == 0).all()), "received": int(cnt.sum())}


class _HostBuffer:
    """What the collective fallback reads of a buffer, for host tensors (no GPU)."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.group_size = rank, size
        self._seqs: Dict[int, Any] = {}


def body_fallback_cpu(rank: int, size: int, port: int, arg: str) -> Any:
    """The collective fallback on host tensors over Gloo (CI has no GPU): the same checks as
    the kernels' (bf16 and fp8), with a rank marking an expert's owner inactive."""
    import tidewire.ep

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=timedelta(seconds=60))
    R, E, H = size, 16 * size, 256
    el = E // R
    coll = tidewire.ep._Collective(dist.group.WORLD)
    fake = _HostBuffer(rank, size)
    bad: List[str] = []
    for seed, fp8, n in ((1, False, T), (2, True, T), (3, False, 5 * rank), (4, True, 1), (5, False, T)):
        x, topk, w = inputs(rank, H, E, seed, n, device="cpu")
        if seed == 5:
            # Repeated experts in a token's row (padding rows often repeat one id): the token
            # reaches each expert once, its repeats select nothing, as in the kernels.
            topk[:, K // 2 :] = topk[:, : K // 2]
            topk[::3] = topk[::3, :1].expand(-1, K)
        all_topk = gather_topk(topk, R)
        active = torch.ones(R, dtype=torch.int32)
        packed, recv_count, handle, _, _ = coll.dispatch(fake, x, topk, active, T, E, fp8, False, False)
        recv_x = dequant(packed, fp8, el, R, H)
        check_dispatch(rank, R, E, H, fp8, all_topk, recv_x, recv_count, handle, f"seed {seed}", bad)
        state = fake._seqs.pop(handle[0].data_ptr())[0]
        out = torch.empty((n, H), dtype=torch.bfloat16)
        coll.combine(fake, recv_x, w, state, out, False, False)
        want = x.float() * (w * first_selections(topk).float()).sum(1, keepdim=True)
        if n and calc_diff(out.float(), want) > (9e-4 if fp8 else 1e-5):
            bad.append(f"seed {seed}: combine diff {calc_diff(out.float(), want):.2e}")
    return bad


def body_shapes(rank: int, size: int, port: int, arg: str) -> Any:
    """Ranks that call with another shape: a round trip of one shape passes, then rank 1
    dispatches with another hidden size (or `arg`: experts, tokens, fp8) than rank 0. Every
    rank's kernels must read none of the other's rows, mark it inactive, and its next call
    must raise naming it. Returns what each saw."""
    import tidewire.ep

    o = parse(arg)
    setup(rank, size, port, "gloo")
    R, E, H = size, 256, 7168
    bad: List[str] = []
    buf = tidewire.ep.Buffer(dist.group.WORLD, tidewire.ep.Buffer.get_ep_buffer_size_hint(T, H, R, E))
    round_trip(buf, rank, R, E, H, True, "plain", 1, bad)
    what = o.get("differ", "hidden")
    mine = {"hidden": (2048, E, T, True), "experts": (H, E // 2, T, True), "tokens": (H, E, T // 2, True), "fp8": (H, E, T, False)}
    h, e, t, fp8 = mine[what] if rank == 1 else (H, E, T, True)
    x, topk, _ = inputs(rank, h, e, 2, n=min(t, T))
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    t0 = time.monotonic()
    buf.dispatch(x, topk, active, t, e, 20_000_000, use_fp8=fp8)
    torch.cuda.synchronize()
    took = time.monotonic() - t0
    out: Dict[str, Any] = {"active": active.tolist(), "took_s": took, "bad": bad}
    try:
        buf.dispatch(x, topk, torch.ones(R, dtype=torch.int32, device="cuda"), t, e, 20_000_000, use_fp8=fp8)
        out["next_call"] = None
    except RuntimeError as err:
        out["next_call"] = str(err)
    buf.destroy()
    return out


def body_refusals(rank: int, size: int, port: int, arg: str) -> Any:
    """A buffer (the collective fallback: no GPU path is asked for) refuses bad arguments
    before anything moves, naming the rank and the call, and the call then runs when they are
    mended. Returns the messages and what went wrong."""
    import tidewire.ep

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=timedelta(seconds=60))
    R, E, H = size, 16 * size, 256
    buf = tidewire.ep.Buffer(dist.group.WORLD, disable_p2p=True)
    dev = f"cuda:{buf.device}" if buf.device is not None else "cpu"
    x, topk, w = inputs(rank, H, E, 6, T, device=dev)
    active = torch.ones(R, dtype=torch.int32, device=dev)
    said: Dict[str, str] = {}
    bad: List[str] = []

    def refused(name: str, call: Any) -> None:
        try:
            call()
            bad.append(f"{name}: not refused")
        except (ValueError, TypeError, RuntimeError) as e:
            said[name] = str(e)
            if f"rank {rank}" not in str(e):
                bad.append(f"{name}: the message does not name rank {rank}: {e}")

    refused("dispatch, active_ranks one too long", lambda: buf.dispatch(x, topk, torch.ones(R + 1, dtype=torch.int32, device=dev), T, E))
    refused("dispatch, active_ranks 2-D", lambda: buf.dispatch(x, topk, torch.ones(1, R, dtype=torch.int32, device=dev), T, E))
    refused("dispatch, x float32", lambda: buf.dispatch(x.float(), topk, active, T, E))
    recv_x, _, handle, _, _ = buf.dispatch(x, topk, active, T, E, use_fp8=False)
    refused("combine, active_ranks one too short", lambda: buf.combine(recv_x, topk, w, torch.ones(R - 1, dtype=torch.int32, device=dev), -1, handle))
    refused("combine, out on another device", lambda: buf.combine(recv_x, topk, w, active, -1, handle, out=torch.empty((T, H), dtype=torch.bfloat16, device="meta")))
    # Mended, the same handle's combine runs (the refusals left its dispatch open): with the
    # received rows as an identity expert's output, each token's row times its weights' sum.
    out, _, _ = buf.combine(recv_x, topk, w, active, -1, handle)
    want = x.float() * (w * first_selections(topk).float()).sum(1, keepdim=True)
    if tuple(out.shape) != (T, H) or calc_diff(out.float(), want) > 1e-5 or int(active.sum()) != R:
        bad.append(f"the mended combine: out {tuple(out.shape)}, active {active.tolist()}")
    # Receive hooks: a combine before its dispatch's hook is refused, each hook runs once.
    recv_x, _, handle, _, hook = buf.dispatch(x, topk, active, T, E, use_fp8=False, return_recv_hook=True)
    refused("combine before the dispatch's hook", lambda: buf.combine(recv_x, topk, w, active, -1, handle))
    hook()
    refused("a dispatch's hook again", hook)
    out, _, chook = buf.combine(recv_x, topk, w, active, -1, handle, return_recv_hook=True)
    chook()
    refused("a combine's hook again", chook)
    if calc_diff(out.float(), want) > 1e-5:
        bad.append("the combine with hooks: out differs")
    buf.destroy()
    return {"said": said, "bad": bad}


def body_silent(rank: int, size: int, port: int, arg: str) -> Any:
    """Rank 1 joins the group but never takes part in the EP exchange: rank 0's exchange raises
    within its deadline, naming rank 1."""
    import tidewire.ep

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=timedelta(seconds=60))
    if rank == 1:
        time.sleep(8)
        return None
    t0 = time.monotonic()
    try:
        tidewire.ep.exchange(dist.group.WORLD, "silent-test", [1, 2], timeout=timedelta(seconds=2))
    except TimeoutError as e:
        return {"error": str(e), "took_s": time.monotonic() - t0}
    return {"error": None, "took_s": time.monotonic() - t0}


BODIES = {
    "suite": body_suite,
    "lifetime": body_lifetime,
    "fallback_cpu": body_fallback_cpu,
    "refusals": body_refusals,
    "shapes": body_shapes,
    "silent": body_silent,
}

if __name__ == "__main__":
    from rank_main import main

    main(BODIES, hard_exit=True)
