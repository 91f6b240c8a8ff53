"""One rank of an EP buffer test on two GPUs (started by test_ep.py):
`ep_rank.py BODY RANK SIZE PORT [ARG]`; prints one JSON line ({"ok": ...} or {"error": ...}).

The checks follow DeepEP's low-latency test: x = rank - 128 with the last 128 channels set to
the token index; ten random -1 routing slots; every received row, count, source index and
layout entry against what the ranks' all-gathered routing says; combine with an identity
expert against the weighted sum computed here."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any, Dict, List

import torch
import torch.distributed as dist

import tidewire.ep


def setup(rank: int, size: int, port: int) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size, timeout=timedelta(seconds=60))


def inputs(rank: int, T: int, H: int, K: int, E: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed * 100 + rank)
    x = torch.full((T, H), float(rank - 128), dtype=torch.bfloat16, device="cuda")
    x[:, -128:] = torch.arange(T, device="cuda").to(torch.bfloat16).view(-1, 1)
    scores = torch.randn(T, E, device="cuda", generator=g).abs() + 1
    topk = scores.topk(K, dim=-1).indices
    flat = topk.view(-1)
    drop = torch.randperm(flat.numel(), device="cuda", generator=g)[:10]
    flat[drop] = -1
    w = torch.rand(T, K, device="cuda", generator=g)
    return x, topk, w


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() + 1, y.double() + 1
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom)


def body_roundtrip(rank: int, size: int, port: int, arg: str) -> Any:
    setup(rank, size, port)
    T, H, K, E = 128, int(arg or 7168), 8, 256
    R, el = size, 256 // size
    bad: List[str] = []
    buf = tidewire.ep.Buffer(dist.group.WORLD, tidewire.ep.Buffer.get_ep_buffer_size_hint(T, H, R, E))
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    info: Dict[str, Any] = {"paths": buf.paths}
    for it in range(8):
        hook_mode = it % 2 == 1
        fp8 = it >= 4
        x, topk, w = inputs(rank, T, H, K, E, it)
        all_topk = [torch.empty_like(topk.cpu()) for _ in range(R)]
        dist.all_gather(all_topk, topk.cpu())
        packed, recv_count, handle, _, hook = buf.dispatch(x, topk, active, T, E, 10_000_000, use_fp8=fp8, return_recv_hook=hook_mode)
        if hook_mode:
            hook()
        torch.cuda.synchronize()
        src_info, layout_range = handle[0].cpu(), handle[1].cpu()
        if fp8:
            q, sc = packed
            # Dequantized: e4m3 times the group's scale (exact for the constant channels, within
            # e4m3's precision for the token index).
            recv_x = (q.float().view(el, R * T, H // 128, 128) * sc.unsqueeze(-1)).view(el, R * T, H).to(torch.bfloat16)
        else:
            recv_x = packed
        rc, rx = recv_count.cpu(), recv_x.float().cpu()
        for l in range(el):
            e = rank * el + l
            want_total = sum(int((t == e).sum()) for t in all_topk)
            if int(rc[l]) != want_total:
                bad.append(f"it {it} expert {e}: recv_count {int(rc[l])} != {want_total}")
            for s in range(R):
                want_tokens = [t for t in range(T) if bool((all_topk[s][t] == e).any())]
                begin, cnt = int(layout_range[l, s]) >> 32, int(layout_range[l, s]) & 0xFFFFFFFF
                if (begin, cnt) != (s * T, len(want_tokens)):
                    bad.append(f"it {it} expert {e} from {s}: layout ({begin}, {cnt}) != ({s * T}, {len(want_tokens)})")
                    continue
                got_src = src_info[l, begin : begin + cnt].tolist()
                if got_src != want_tokens:
                    bad.append(f"it {it} expert {e} from {s}: sources differ")
                rows = rx[l, begin : begin + cnt]
                want_idx = torch.tensor(want_tokens).float().view(-1, 1).expand(-1, 128)
                idx_ok = torch.allclose(rows[:, -128:], want_idx, rtol=0.07, atol=0.5) if fp8 else torch.equal(rows[:, -128:], want_idx)
                if cnt and not (bool((rows[:, :-128] == s - 128).all()) and idx_ok):
                    bad.append(f"it {it} expert {e} from {s}: rows differ (fp8 {fp8})")
        # Combine with an identity expert: out[t] = x[t] * (sum of the weights of its valid slots).
        out, _, chook = buf.combine(recv_x, topk, w, active, 10_000_000, handle, return_recv_hook=hook_mode)
        if hook_mode:
            chook()
        torch.cuda.synchronize()
        valid = (topk >= 0).float()
        want = (x.float() * (w * valid).sum(1, keepdim=True))
        diff = calc_diff(out.float(), want)
        if diff > (9e-4 if fp8 else 1e-5):
            bad.append(f"it {it}: combine diff {diff:.2e} (fp8 {fp8})")
        if int(active.sum()) != R:
            bad.append(f"it {it}: active {active.tolist()}")
    # Few tokens: rank 0 sends none, rank 1 one (num_tokens 0 and 1).
    x, topk, w = inputs(rank, T, H, K, E, 40)
    n_mine = 0 if rank == 0 else 1
    xs, ks, ws = x[:n_mine].contiguous(), topk[:n_mine].contiguous(), w[:n_mine].contiguous()
    all_k = [torch.empty_like(topk[:1].cpu()) for _ in range(R)]
    dist.all_gather(all_k, topk[:1].cpu())
    all_k = [all_k[r][: (0 if r == 0 else 1)] for r in range(R)]
    packed, cnt, h, _, _ = buf.dispatch(xs, ks, active, T, E, 10_000_000, use_fp8=False)
    out, _, _ = buf.combine(packed, ks, ws, active, 10_000_000, h)
    torch.cuda.synchronize()
    want_cnt = [sum(int((t == rank * el + l).sum()) for t in all_k) for l in range(el)]
    if cnt.cpu().tolist() != want_cnt:
        bad.append("few tokens: counts differ")
    if out.shape[0] != n_mine or (n_mine and calc_diff(out.float(), xs.float() * (ws * (ks >= 0).float()).sum(1, keepdim=True)) > 1e-5):
        bad.append("few tokens: combine differs")
    # CUDA graph: one dispatch + combine captured on static inputs, replayed with new ones
    # (each replay numbers its dispatch afresh, on the GPU).
    x_s, k_s, w_s = (t.clone() for t in inputs(rank, T, H, K, E, 50))
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        p_s, c_s, h_s, _, _ = buf.dispatch(x_s, k_s, active, T, E, 10_000_000, use_fp8=False)
        o_s, _, _ = buf.combine(p_s, k_s, w_s, active, 10_000_000, h_s)
    for it in range(3):
        x, topk, w = inputs(rank, T, H, K, E, 60 + it)
        x_s.copy_(x)
        k_s.copy_(topk)
        w_s.copy_(w)
        g.replay()
        torch.cuda.synchronize()
        all_topk = [torch.empty_like(topk.cpu()) for _ in range(R)]
        dist.all_gather(all_topk, topk.cpu())
        counts = [sum(int((t == rank * el + l).sum()) for t in all_topk) for l in range(el)]
        if c_s.cpu().tolist() != counts:
            bad.append(f"graph replay {it}: counts differ")
        want = x.float() * (w * (topk >= 0).float()).sum(1, keepdim=True)
        d = calc_diff(o_s.float(), want)
        if d > 1e-5:
            bad.append(f"graph replay {it}: combine diff {d:.2e}")
    info["graph_replays_checked"] = 3
    # Speed: a few timed rounds of dispatch + combine (no checks), for the record.
    x, topk, w = inputs(rank, T, H, K, E, 99)
    for _ in range(5):
        rx, _, h, _, _ = buf.dispatch(x, topk, active, T, E, 10_000_000, use_fp8=False)
        buf.combine(rx, topk, w, active, 10_000_000, h)
    torch.cuda.synchronize()
    dist.barrier()
    td, tc = [], []
    for _ in range(50):
        s0, s1, s2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        s0.record()
        rx, _, h, _, _ = buf.dispatch(x, topk, active, T, E, 10_000_000, use_fp8=False)
        s1.record()
        buf.combine(rx, topk, w, active, 10_000_000, h)
        s2.record()
        s2.synchronize()
        td.append(s0.elapsed_time(s1) * 1000)
        tc.append(s1.elapsed_time(s2) * 1000)
    tf = []
    for _ in range(50):
        s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s0.record()
        _, _, h, _, _ = buf.dispatch(x, topk, active, T, E, 10_000_000, use_fp8=True)
        s1.record()
        s1.synchronize()
        tf.append(s0.elapsed_time(s1) * 1000)
        buf._seqs.clear()  # these dispatches are not combined
    info["dispatch_fp8_us_p50"] = sorted(tf)[len(tf) // 2]
    info["dispatch_us_p50"] = sorted(td)[len(td) // 2]
    info["combine_us_p50"] = sorted(tc)[len(tc) // 2]
    # Back to back (host work overlapping the GPU's): the average of a dispatch + combine pair.
    dist.barrier()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(50):
        rx, _, h, _, _ = buf.dispatch(x, topk, active, T, E, 10_000_000, use_fp8=False)
        buf.combine(rx, topk, w, active, 10_000_000, h)
    b.record()
    b.synchronize()
    info["pair_us_avg"] = a.elapsed_time(b) * 1000 / 50
    # A rank that dies (arg "die": its process exits) or stops answering (arg "stall": it
    # sleeps in its teardown): rank 0's next dispatch and combine end within the timeout with
    # rank 1 marked inactive, and only its own tokens come back.
    dist.barrier()
    if rank == 1:
        if os.environ.get("TW_EP_LEAVE") == "stall":
            time.sleep(30)
        os._exit(0)
    time.sleep(0.5)
    x, topk, w = inputs(rank, T, H, K, E, 7)
    t0 = time.monotonic()
    recv_x, recv_count, handle, _, _ = buf.dispatch(x, topk, active, T, E, 2_000_000, use_fp8=False)
    out, _, _ = buf.combine(recv_x, topk, w, active, 2_000_000, handle)
    torch.cuda.synchronize()
    info["dead_took_s"] = time.monotonic() - t0
    info["active_after"] = active.tolist()
    own = [int((topk == rank * el + l).sum()) for l in range(el)]
    if recv_count.cpu().tolist() != own:
        bad.append("after the death: counts include the dead rank")
    mine = ((topk >= 0) & (topk // el == rank)).float()
    want = x.float() * (w * mine).sum(1, keepdim=True)
    d = calc_diff(out.float(), want)
    if d > 1e-5:
        bad.append(f"after the death: combine diff {d:.2e}")
    info["bad"] = bad
    return info


BODIES = {"roundtrip": body_roundtrip}

if __name__ == "__main__":
    from rank_main import main

    main(BODIES)
