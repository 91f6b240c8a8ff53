"""Host cost of small all_reduce calls (2 ranks), and where it goes: for each size in turn
(`--sizes`, repeated sizes measure again later in the run), the median over 200 blocks of
10 back-to-back calls of the µs per call including the final synchronisation, and of the µs
per call the host spent before it (enqueue only); then a cProfile of 5,000 calls of the last
size on rank 0 (top 16 by own time):

    python bench/pg_call_profile.py                                  # tidewire, CPU, 8 B
    python bench/pg_call_profile.py --device cuda --sizes 8,8192,8 --backend nccl
"""

import argparse, cProfile, io, pstats, socket, statistics, time
import torch, torch.distributed as dist, torch.multiprocessing as mp


def trace(t: torch.Tensor, args: argparse.Namespace) -> list:
    """`args.trace` calls under torch's profiler: per GPU kernel and per CUDA runtime / driver
    call, the median duration and (kernels) the median start-to-start gap, in µs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.trace):
            dist.all_reduce(t)
        torch.cuda.synchronize()
    by: dict = {}
    for e in prof.events():
        by.setdefault((e.device_type.name, e.name), []).append(e)
    out = []
    for (kind, name), evs in sorted(by.items(), key=lambda kv: -len(kv[1])):
        if len(evs) < args.trace // 2:
            continue
        starts = sorted(e.time_range.start for e in evs)
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        durs = [e.time_range.end - e.time_range.start for e in evs]
        out.append(
            f"trace {kind:5} {name[:48]:48} n {len(evs):5} dur {statistics.median(durs):7.1f} "
            f"gap {statistics.median(gaps) if gaps else 0:7.1f}"
        )
    return out


def rank_main(rank: int, port: int, args: argparse.Namespace) -> None:
    if args.backend == "tidewire":
        import tidewire.distributed  # noqa: F401
    dev = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if args.side_stream and dev.type == "cuda":
        torch.cuda.set_stream(torch.cuda.Stream())
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    lines = []
    t = torch.ones(1, device=dev)
    for size in [int(s) for s in args.sizes.split(",")]:
        t = torch.ones(max(1, size // 4), device=dev)
        for _ in range(200):
            dist.all_reduce(t)
        sync()
        total, host = [], []
        for _ in range(200):
            a = time.perf_counter()
            for _ in range(10):
                dist.all_reduce(t)
            b = time.perf_counter()
            sync()
            c = time.perf_counter()
            host.append((b - a) / 10 * 1e6)
            total.append((c - a) / 10 * 1e6)
        lines.append(
            f"{args.backend} {args.device} all_reduce {size} B: {statistics.median(total):.1f} µs per call, "
            f"host {statistics.median(host):.1f} µs before the sync"
        )
    if args.trace and dev.type == "cuda":
        lines += trace(t, args)
    if args.side_stream and dev.type == "cuda":
        lines += [f"(the calls ran on a side stream: {torch.cuda.current_stream()})"]
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(5000):
        dist.all_reduce(t)
    sync()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(16)
    print("\n".join(f"rank {rank}: {line}" for line in lines), flush=True)
    if rank == 0:
        print(s.getvalue()[:4000])
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="tidewire")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", default="8", help="bytes, comma-separated, in order")
    p.add_argument("--trace", type=int, default=0, help="calls traced by torch's profiler (CUDA)")
    p.add_argument("--side-stream", action="store_true", help="run on a stream other than the default")
    args = p.parse_args()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(rank_main, args=(port, args), nprocs=2)
