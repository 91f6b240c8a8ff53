"""Point-to-point on CUDA tensors between two GPUs, tidewire against NCCL in the same run:

    python bench/p2p_cuda_bench.py [--max-bytes 256M] [--iters 20] [--backends tidewire,nccl]

For every backend: two processes (GPU 0 and 1); for each size from 8 B (×4) to --max-bytes,
the median over --iters batches of 10 back-to-back operations, timed with the device
synchronised around the batch: `send` (rank 0 sends, rank 1 receives: one direction) and
`exchange` (both ranks `batch_isend_irecv` a send and a receive: both directions at once).
GB/s is one direction's bytes per operation time. Rank 0 prints the rows, then tidewire's time
against each other backend's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pg_bench import parse_size, run_backends  # bench/ is the script's directory

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")



def rank_main(rank: int, backend: str, port: int, args: argparse.Namespace, out_path: str) -> None:
    if backend == "tidewire":
        import tidewire.distributed  # noqa: F401
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        device_id=dev if backend == "nccl" else None,
    )
    other = 1 - rank
    rows = []
    size = 8
    while size <= args.max_bytes:
        a = torch.ones(size // 4, dtype=torch.float32, device=dev)
        b = torch.zeros(size // 4, dtype=torch.float32, device=dev)

        def send() -> None:
            if rank == 0:
                dist.send(a, 1)
            else:
                dist.recv(b, 0)

        def exchange() -> None:
            for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, a, other), dist.P2POp(dist.irecv, b, other)]):
                w.wait()

        for name, fn in (("send", send), ("exchange", exchange)):
            batch = 10
            for _ in range(2 * batch):
                fn()
            times = []
            for _ in range(args.iters):
                torch.cuda.synchronize()
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(batch):
                    fn()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e6 / batch)
            med = statistics.median(times)
            rows.append({"bytes": size, "op": name, "time_us": med, "gbps": size / med / 1e3})
        size *= 4
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()



def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="tidewire,nccl")
    p.add_argument("--max-bytes", type=parse_size, default=parse_size("256M"))
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    if torch.cuda.device_count() < 2:
        sys.exit("needs two GPUs")
    def show(backend: str, rows: List[dict]) -> None:
        print(f"# backend {backend}")
        print(f"{'bytes':>12} {'op':>9} {'time_us':>10} {'GB/s':>8}")
        for r in rows:
            print(f"{r['bytes']:>12} {r['op']:>9} {r['time_us']:>10.1f} {r['gbps']:>8.2f}")

    results = run_backends(
        args.backends, "p2p_cuda_bench", lambda b, port, out: mp.spawn(rank_main, args=(b, port, args, out), nprocs=2, join=True), show
    )
    for other in results:
        if other == "tidewire" or "tidewire" not in results:
            continue
        print(f"# tidewire against {other}: time ratio (lower is better)")
        for a, b in zip(results["tidewire"], results[other]):
            print(f"{a['bytes']:>12} {a['op']:>9} {a['time_us'] / b['time_us']:>8.2f}")


if __name__ == "__main__":
    main()
