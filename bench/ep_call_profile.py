"""Host cost of the EP buffer's eager calls (2 ranks), and where it goes: the median µs the
host spends inside `dispatch` and inside `combine` (the call only: the GPU work is awaited
between pairs, outside the timing), over `--iters` pairs; then a cProfile of the same number
of pairs on rank 0 (top 20 by own time). With one GPU, both ranks share it (the host figures
stand; the GPU's do not):

    python bench/ep_call_profile.py [--tokens 128] [--iters 500] [--hook]
"""

import argparse, cProfile, io, pstats, socket, statistics, time
import torch, torch.distributed as dist, torch.multiprocessing as mp


def rank_main(rank: int, port: int, args: argparse.Namespace) -> None:
    import tidewire.ep

    torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    T, H, K, E = args.tokens, 7168, 8, 256
    buf = tidewire.ep.Buffer(dist.group.WORLD, tidewire.ep.Buffer.get_ep_buffer_size_hint(T, H, 2, E))
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(T, H, dtype=torch.bfloat16, device="cuda", generator=g)
    topk = torch.rand(T, E, device="cuda", generator=g).topk(K, dim=-1).indices
    w = torch.rand(T, K, device="cuda", generator=g)
    active = torch.ones(2, dtype=torch.int32, device="cuda")
    y = torch.randn(E // 2, 2 * T, H, dtype=torch.bfloat16, device="cuda", generator=g)

    def pair(times: list) -> None:
        a = time.perf_counter()
        _, _, h, _, hook = buf.dispatch(x, topk, active, T, E, 10_000_000, use_fp8=True, return_recv_hook=args.hook)
        b = time.perf_counter()
        if hook is not None:
            hook()
        c = time.perf_counter()
        _, _, chook = buf.combine(y, topk, w, active, 10_000_000, h, return_recv_hook=args.hook)
        if chook is not None:
            chook()
        d = time.perf_counter()
        times.append(((b - a) * 1e6, (d - c) * 1e6))
        torch.cuda.synchronize()

    for _ in range(20):
        pair([])
    dist.barrier()
    times: list = []
    for _ in range(args.iters):
        pair(times)
    dist.barrier()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.iters):
        pair([])
    prof.disable()
    dist.barrier()
    if rank == 0:
        print(f"T {T}{' hook' if args.hook else ''}: host us per call, median of {args.iters}: dispatch "
              f"{statistics.median(t[0] for t in times):.1f}, combine {statistics.median(t[1] for t in times):.1f}")
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
        print(s.getvalue())
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--iters", type=int, default=500)
    p.add_argument("--hook", action="store_true")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(port, args), nprocs=2)


if __name__ == "__main__":
    main()
