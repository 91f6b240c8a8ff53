"""Point-to-point round trips between two ranks of a `tidewire` CPU group (one host: the shm
rings), median over N round trips of send + recv at 8 B, 4 KiB and 1 MiB:

    python bench/p2p_pingpong.py [N] [label]
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank: int, port: int, n: int, out: str) -> None:
    import tidewire.distributed  # noqa: F401  (registers the backend)

    dist.init_process_group("tidewire", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    res = {}
    for size in [8, 4096, 1 << 20]:
        t = torch.zeros(size // 4)

        def trip() -> None:
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            else:
                dist.recv(t, 0)
                dist.send(t, 0)

        for _ in range(50):
            trip()
        times = []
        for _ in range(n):
            a = time.perf_counter()
            trip()
            times.append((time.perf_counter() - a) * 1e6)
        res[size] = round(statistics.median(times), 2)
    dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            f.write(repr(res))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    label = sys.argv[2] if len(sys.argv) > 2 else ""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/p2p_pingpong_{os.getpid()}"
    mp.spawn(rank_main, args=(port, n, out), nprocs=2)
    with open(out) as f:
        print(label, "round trip µs (median) by bytes:", f.read())
    os.unlink(out)


if __name__ == "__main__":
    main()
