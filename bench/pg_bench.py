"""Collective benchmark, nccl-tests-style rows, for the tidewire torch.distributed backend and
torch's own backends in the same run:

    python bench/pg_bench.py [--backends tidewire,gloo] [--ranks 2] [--max-bytes 64M] [--device cpu] [--graph]

(`--one-gpu` puts every rank on cuda:0 to compare two builds of tidewire's kernels on a host
with one GPU: two ranks under MPS, or the ranks' spinning kernels share the GPU by time slices and
every call waits for the next slice. Not more than two under MPS: every rank's launch must be
resident at once, and 4 × 128 blocks do not fit; such calls wait for their deadline.)

(`mooncake-cpu` / `mooncake` as a backend: tidewire's Mooncake-compatible groups, with elastic
membership running.)

For every backend: one process per rank; all_reduce, all_gather (into tensor), reduce_scatter
(tensor) and all_to_all_single from 8 bytes up to --max-bytes (×--step); each size timed as
the median over --iters groups of back-to-back calls. busbw follows nccl-tests (all_reduce
2(n−1)/n, the others (n−1)/n; all_gather sized by its output). Rank 0 prints the rows, then a
table of tidewire against each other backend (time ratio, busbw ratio). With --graph (CUDA),
each batch of calls is captured once in a CUDA graph and the replays are timed.

With --interleave, every backend runs in the same processes (the first as the default group,
the others as `new_group(backend=...)`) and their batches alternate at every size (the order
turned round at each iteration): each backend's median is taken over the same stretch of the
host's time, so a host that speeds up or slows down during the run moves both alike (run one
after the other, a backend's rows can land on a slower stretch than the other's).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

DT = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "int32": torch.int32}


def parse_size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def rank_main(rank: int, n: int, backend_list: str, port: int, args: argparse.Namespace, out_path: str) -> None:
    if os.environ.get("PG_BENCH_TRACE_AFTER"):
        # Diagnosis of a run that never ends: every thread's stack after that many seconds.
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["PG_BENCH_TRACE_AFTER"]), exit=True)
    opts = {}
    backends = backend_list.split(",")
    backend = backends[0]
    if "tidewire" in backends:
        import tidewire.distributed  # noqa: F401
    if backend.startswith("mooncake"):
        # tidewire's Mooncake-compatible groups: elastic membership on (heartbeats, masks).
        import tidewire.mooncake

        tidewire.mooncake.install()
        from mooncake.pg import MooncakeBackendOptions  # type: ignore[import-not-found]

        opts["pg_options"] = MooncakeBackendOptions(torch.ones(n, dtype=torch.int32))
    dev = torch.device(args.device, 0 if args.one_gpu else rank) if args.device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n, **opts)
    # The other backends (--interleave): groups of every rank, in the same processes.
    groups = [None] + [dist.new_group(list(range(n)), backend=b) for b in backends[1:]]
    dt = DT[args.dtype]
    esz = torch.tensor([], dtype=dt).element_size()
    rows: Dict[str, List[dict]] = {b: [] for b in backends}
    graphs: List["torch.cuda.CUDAGraph"] = []
    size = 8
    while size < args.min_bytes:
        size *= args.step
    first = True
    while size <= args.max_bytes:
        count = max(n, size // esz) // n * n
        nbytes = count * esz
        x = torch.ones(count, dtype=dt, device=dev)
        outs = torch.empty(count * n, dtype=dt, device=dev)
        rs_out = torch.empty(count // n, dtype=dt, device=dev)
        a2a_out = torch.empty(count, dtype=dt, device=dev)
        def ops(g):  # type: ignore[no-untyped-def]
            return {
                "all_reduce": (lambda: dist.all_reduce(x, group=g), 2 * (n - 1) / n),
                "all_gather": (lambda: dist.all_gather_into_tensor(outs, x, group=g), (n - 1) / n),
                "reduce_scatter": (lambda: dist.reduce_scatter_tensor(rs_out, x, group=g), (n - 1) / n),
                "all_to_all": (lambda: dist.all_to_all_single(a2a_out, x, group=g), (n - 1) / n),
            }

        big = nbytes >= (16 << 20)
        iters, batch = (5, 2) if big else (args.iters, 10)
        calls = [ops(g) for g in groups]
        for name, (_, factor) in calls[0].items():
            if args.ops and name not in args.ops.split(","):
                continue
            fns = []
            for table in calls:
                call = table[name][0]
                # Warm-up: longer at the first size, whose rows otherwise carry the process's
                # first calls (both backends alike: 8 B rows ran 15-25 % slower than 32 B ones).
                for _ in range((20 if first else 2) * batch):
                    call()
                fn = call
                if args.graph:
                    # `batch` calls captured in a CUDA graph; a replay stands for the batch.
                    cg = torch.cuda.CUDAGraph()
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s), torch.cuda.graph(cg, stream=s):
                        for _ in range(batch):
                            call()
                    torch.cuda.current_stream().wait_stream(s)
                    graphs.append(cg)
                    fn = cg.replay
                fns.append(fn)
            # A replay of a graph stands for `batch` calls.
            per_run = 1 if args.graph else batch
            times: List[List[float]] = [[] for _ in groups]
            for it in range(iters):
                # Interleaved backends take turns, the order turned round at every iteration.
                order = range(len(groups)) if it % 2 == 0 else reversed(range(len(groups)))
                for k in order:
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    a = time.perf_counter()
                    for _ in range(per_run):
                        fns[k]()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    times[k].append((time.perf_counter() - a) * 1e6 / batch)
            for b, ts in zip(backends, times):
                med = statistics.median(ts)
                moved = nbytes * n if name == "all_gather" else nbytes
                algbw = moved / med / 1e3
                rows[b].append({"bytes": moved, "op": name, "time_us": med, "algbw": algbw, "busbw": algbw * factor})
        size *= args.step
        first = False
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    if args.graph:
        # NCCL's destroy_process_group never returned with its collectives still captured in
        # live graphs (stack dumped after 50 s on the GPU host): free the graphs first.
        for g in graphs:
            g.reset()
        graphs.clear()
        torch.cuda.synchronize()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_backends(backends: str, tag: str, start, show, together: bool = False) -> Dict[str, List[dict]]:  # type: ignore[no-untyped-def]
    """Each backend's rows, one backend after the other (or, `together`, all of them in one
    run): `start(backends, port, out_path)` spawns the ranks (rank 0 writes its rows by backend
    to `out_path` as JSON), then `show(backend, rows)` prints them at once (a later backend
    that hangs does not take them with it)."""
    results: Dict[str, List[dict]] = {}
    for run in [backends] if together else backends.split(","):
        out_path = f"/tmp/{tag}_{os.getpid()}_{run.replace(',', '_')}.json"
        start(run, free_port(), out_path)
        with open(out_path) as f:
            got = json.load(f)
        os.unlink(out_path)
        for backend in run.split(","):
            results[backend] = got[backend] if isinstance(got, dict) else got
            show(backend, results[backend])
        sys.stdout.flush()
    return results


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="tidewire,gloo")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DT))
    p.add_argument("--max-bytes", type=parse_size, default=parse_size("64M"))
    p.add_argument("--min-bytes", type=parse_size, default=8, help="the first size: 8 B ×--step until it reaches this")
    p.add_argument("--ops", default="", help="comma-separated subset of all_reduce,all_gather,reduce_scatter,all_to_all")
    p.add_argument("--step", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--graph", action="store_true", help="CUDA: time replays of the calls captured in a graph")
    p.add_argument("--interleave", action="store_true", help="every backend in the same processes, their batches alternating")
    p.add_argument(
        "--one-gpu",
        action="store_true",
        help="CUDA: every rank on cuda:0 (an A/B of kernel changes on a one-GPU host; two ranks under MPS, "
        "or the ranks' kernels take the GPU by time slices; NCCL refuses it)",
    )
    args = p.parse_args()
    if args.interleave and any(b.startswith("mooncake") for b in args.backends.split(",")[1:]):
        # Its options (the active-rank mask) go to the default group only.
        p.error("--interleave: a mooncake backend goes first")
    if args.graph and args.device != "cuda":
        # CPU collectives put nothing in a graph: the replays would time nothing.
        p.error("--graph captures CUDA collectives: use it with --device cuda")
    def show(backend: str, rows: List[dict]) -> None:
        print(f"# backend {backend} ranks {args.ranks} device {args.device} dtype {args.dtype}{' graph' if args.graph else ''}{' interleaved' if args.interleave else ''}")
        print(f"{'bytes':>12} {'op':>15} {'time_us':>10} {'algbw':>8} {'busbw':>8}")
        for r in rows:
            print(f"{r['bytes']:>12} {r['op']:>15} {r['time_us']:>10.1f} {r['algbw']:>8.2f} {r['busbw']:>8.2f}")

    results = run_backends(
        args.backends,
        "pg_bench",
        lambda b, port, out: mp.spawn(rank_main, args=(args.ranks, b, port, args, out), nprocs=args.ranks),
        show,
        together=args.interleave,
    )
    mine = results.get("tidewire")
    for other, rows in results.items():
        if other == "tidewire" or mine is None:
            continue
        print(f"# tidewire against {other}: time ratio (lower is better), busbw ratio (higher is better)")
        print(f"{'bytes':>12} {'op':>15} {'time':>8} {'busbw':>8}")
        for a, b in zip(mine, rows):
            print(f"{a['bytes']:>12} {a['op']:>15} {a['time_us'] / b['time_us']:>8.2f} {a['busbw'] / b['busbw']:>8.2f}")


if __name__ == "__main__":
    main()
