"""Host cost of one small all_reduce of a `tidewire` CPU group (2 ranks, 8 bytes): µs per call
over 5,000 calls, then a cProfile of 5,000 more (top 14 by own time), on rank 0:

    python bench/pg_call_profile.py
"""

import os, sys, time, socket, cProfile, pstats, io
import torch, torch.distributed as dist, torch.multiprocessing as mp

def rank_main(rank, port):
    import tidewire.distributed  # noqa
    dist.init_process_group("tidewire", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = torch.ones(2)
    for _ in range(500):
        dist.all_reduce(t)
    n = 5000
    a = time.perf_counter()
    for _ in range(n):
        dist.all_reduce(t)
    el = (time.perf_counter() - a) / n * 1e6
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        dist.all_reduce(t)
    pr.disable()
    if rank == 0:
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
        print(f"all_reduce 8 B: {el:.1f} µs per call")
        print(s.getvalue()[:3500])
    dist.destroy_process_group()

if __name__ == "__main__":
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    mp.spawn(rank_main, args=(port,), nprocs=2)
