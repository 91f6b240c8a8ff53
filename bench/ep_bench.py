"""EP buffer benchmark: dispatch and combine latency of `tidewire.ep.Buffer` on the GPUs of one
host, the way DeepEP reports its low-latency kernels:

    python bench/ep_bench.py [--tokens 128,512,1024] [--hidden 7168] [--topk 8] [--experts 256] [--iters 1000]

One process per GPU, uniform random routing, FP8 dispatch and bf16 combine. For each T it
prints, on rank 0: per-call p50 / p99 (CUDA events around one call, host launch included), the
kernels' own time (torch.profiler: the send and receive kernels of each call), and GB/s counted
DeepEP's way (per selection: dispatch H + H/128·4 + 16 bytes, 2·H + 16 for bf16, combine 2·H),
and the bytes that crossed NVLink per second (dispatch: a row per token and other rank owning
an expert it selects; combine: a row per selection whose expert is on another rank). Run
`bench/ref/collectives_reference.py ep` in the same command for the all_to_all_single exchange.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")


def pct(v: List[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(len(s) * q))]


def rank_main(rank: int, n: int, port: int, args: argparse.Namespace) -> None:
    import tidewire.ep

    # One GPU per rank; with fewer GPUs than ranks they share (correctness and a rough figure
    # only: the contexts time-slice and the peers' rows never cross NVLink).
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    H, K, E = args.hidden, args.topk, args.experts
    tokens = [int(t) for t in args.tokens.split(",")]
    buf = tidewire.ep.Buffer(dist.group.WORLD, tidewire.ep.Buffer.get_ep_buffer_size_hint(max(tokens), H, n, E))
    active = torch.ones(n, dtype=torch.int32, device="cuda")
    if rank == 0:
        print(f"# tidewire.ep: ranks {n} H {H} topk {K} experts {E}, {args.dispatch} dispatch / bf16 combine; paths {buf.paths}; TIDEWIRE_EP_SEND_TASKS={os.environ.get('TIDEWIRE_EP_SEND_TASKS', 'default')}")
    for T in tokens:
        g = torch.Generator(device="cuda").manual_seed(rank)
        x = torch.randn(T, H, dtype=torch.bfloat16, device="cuda", generator=g)
        topk = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=-1).indices
        w = torch.rand(T, K, device="cuda", generator=g)
        selections = int((topk >= 0).sum())
        fp8 = args.dispatch == "fp8"
        # A dispatched row's bytes (e4m3 and its scales, or bf16) and its source word.
        row_bytes = (H + H // 128 * 4 if fp8 else 2 * H) + 16
        d_bytes = selections * row_bytes
        c_bytes = selections * 2 * H

        def dispatch():
            return buf.dispatch(x, topk, active, max(tokens), E, 10_000_000, use_fp8=fp8)

        for _ in range(20):
            packed, _, h, _, _ = dispatch()
            if fp8:
                q, sc = packed
                y = q.float().mul_(sc.repeat_interleave(128, dim=-1)).to(torch.bfloat16)
            else:
                y = packed
            buf.combine(y, topk, w, active, 10_000_000, h)
        torch.cuda.synchronize()
        dist.barrier()
        td: List[float] = []
        tc: List[float] = []
        for _ in range(args.iters):
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            _, _, h, _, _ = dispatch()
            e1.record()
            buf.combine(y, topk, w, active, 10_000_000, h)
            e2.record()
            e2.synchronize()
            td.append(e0.elapsed_time(e1) * 1000)
            tc.append(e1.elapsed_time(e2) * 1000)
        dist.barrier()
        # Kernel time per call, as the profiler records it (median over the profiled calls; a
        # receive kernel's time includes waiting for the peer's sends). The calls are replayed
        # from a CUDA graph, so that the GPUs run them back to back and a rank's host lag is
        # not counted as a receive kernel waiting (SGLang's decode runs them in graphs too).
        per_graph, replays = 10, 20
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                _, _, h, _, _ = dispatch()
                buf.combine(y, topk, w, active, 10_000_000, h)
        graph.replay()
        torch.cuda.synchronize()
        dist.barrier()
        g0, g1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g0.record()
        for _ in range(replays):
            graph.replay()
        g1.record()
        g1.synchronize()
        graph_pair = g0.elapsed_time(g1) * 1000 / (replays * per_graph)
        dist.barrier()
        prof_iters = per_graph * replays
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                graph.replay()
            torch.cuda.synchronize()
        # Each rank's trace stays in --trace-dir when given (to compare the ranks' kernels).
        os.makedirs(args.trace_dir or "/tmp", exist_ok=True)
        trace = os.path.join(args.trace_dir or "/tmp", f"ep_bench_trace_T{T}_rank{rank}.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
        durs: Dict[str, List[float]] = {}
        for ev in events:
            if ev.get("cat") == "kernel" and str(ev.get("name", "")).startswith("tw_ep_"):
                durs.setdefault(ev["name"], []).append(float(ev["dur"]))
        mine = {k: (statistics.median(v), pct(v, 0.99)) for k, v in durs.items()}
        # A receive kernel's time includes waiting for the other rank; whichever rank runs
        # behind never waits, so each kernel's figure is the lower of the ranks' medians.
        every: List[Dict[str, Tuple[float, float]]] = [dict() for _ in range(n)]
        dist.all_gather_object(every, mine)
        kernel = {k: min(r[k][0] for r in every if k in r) for k in mine}
        kernel99 = {k: min(r[k][1] for r in every if k in r) for k in mine}
        # SGLang's two-batch overlap: two micro-batches alternating on the buffer, hook mode.
        x2 = x.roll(1, 0).contiguous()
        k2 = topk.roll(1, 0).contiguous()
        dist.barrier()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        tbo_iters = 200
        e0.record()
        for _ in range(tbo_iters):
            _, _, ha, _, hook_a = buf.dispatch(x, topk, active, max(tokens), E, 10_000_000, use_fp8=fp8, return_recv_hook=True)
            _, _, hb, _, hook_b = buf.dispatch(x2, k2, active, max(tokens), E, 10_000_000, use_fp8=fp8, return_recv_hook=True)
            hook_a()
            _, _, ca = buf.combine(y, topk, w, active, 10_000_000, ha, return_recv_hook=True)
            hook_b()
            ca()
            _, _, cb = buf.combine(y, k2, w, active, 10_000_000, hb, return_recv_hook=True)
            cb()
        e1.record()
        e1.synchronize()
        tbo = e0.elapsed_time(e1) * 1000 / tbo_iters
        # The bytes that crossed NVLink: a dispatched token once to each other rank owning an
        # expert it selects (its row, and a 4-byte index per such selection), a combined row
        # per selection whose expert is on another rank.
        el = E // n
        remote = int(((topk >= 0) & (topk // el != rank)).sum())
        hit = torch.zeros(T, n, dtype=torch.bool, device="cuda")
        hit.scatter_(1, (topk // el).clamp(min=0), topk >= 0)
        hit[:, rank] = False
        crossing = int(hit.sum())
        dist.barrier()
        if rank == 0:
            kd = kernel.get("tw_ep_dispatch_send", 0) + kernel.get("tw_ep_dispatch_recv", 0)
            kc = kernel.get("tw_ep_combine_send", 0) + kernel.get("tw_ep_combine_recv", 0)
            d_link = crossing * (row_bytes - 16) + remote * 4
            c_link = remote * 2 * H
            print(f"T {T}: per call (CUDA events, launch included) dispatch p50 {pct(td, .5):.1f} p99 {pct(td, .99):.1f} us, combine p50 {pct(tc, .5):.1f} p99 {pct(tc, .99):.1f} us ({args.iters} calls)")
            print(
                f"T {T}: kernels (median of {prof_iters}) dispatch {kd:.1f} us ({d_bytes / kd / 1e3 if kd else 0:.0f} GB/s DeepEP-counted, "
                f"{d_link / kd / 1e3 if kd else 0:.0f} GB/s over NVLink), combine {kc:.1f} us ({c_bytes / kc / 1e3 if kc else 0:.0f} GB/s, "
                f"{c_link / kc / 1e3 if kc else 0:.0f} GB/s over NVLink)"
            )
            print("T {}: per kernel p50 / p99 us: ".format(T) + ", ".join(f"{k} {v:.1f} / {kernel99[k]:.1f}" for k, v in sorted(kernel.items())))
            print(f"T {T}: dispatch + combine replayed from a CUDA graph: {graph_pair:.1f} us per pair")
            print(f"T {T}: SGLang pattern (hook mode, two micro-batches alternating): {tbo:.1f} us per pair of dispatch + combine rounds")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="128")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--ranks", type=int, default=0)
    p.add_argument("--dispatch", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--trace-dir", default="", help="keep each rank's profiler trace (chrome JSON) here")
    args = p.parse_args()
    n = args.ranks or torch.cuda.device_count()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(n, port, args), nprocs=n)


if __name__ == "__main__":
    main()
