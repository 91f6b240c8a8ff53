"""Elastic membership timings on one host (CPU groups, `mooncake-cpu`):

    python bench/elastic_bench.py [--cycles 20] [--founders 2]

Founders form a group with one more slot; each cycle a new process takes that slot
(`is_extension=True`), calls `join_group`; rank 0 sees it ready and calls `recover_ranks`;
everyone runs an all_reduce; then rank 0 SIGKILLs the joiner and the founders run
all_reduces until one fails and the view drops it. Per cycle (CLOCK_MONOTONIC, shared by the
processes of a host):

- recover: `recover_ranks` on rank 0, call to return;
- activate → first collective: from rank 0's `recover_ranks` call to the end of the joiner's
  first all_reduce with the group (re-forming included);
- kill → agreed: from rank 0's SIGKILL to rank 0 holding a view without the slot (the failed
  all_reduce that reveals it included).

Prints median / p90 / max of each over the cycles.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def founder(rank: int, args: argparse.Namespace) -> None:
    import tidewire.mooncake

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    n, slots = args.founders, args.founders + 1
    mpg.set_eviction_timeout_us(500_000)
    active = torch.zeros(slots, dtype=torch.int32)
    dist.init_process_group(
        "mooncake-cpu", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=n,
        timeout=timedelta(seconds=20), pg_options=mpg.MooncakeBackendOptions(active, False, slots),
    )
    pg = dist.group.WORLD
    rows = []
    for i in range(args.cycles):
        child = None
        stamp = f"/tmp/tw-elastic-bench-{args.port}-{i}.json"
        if rank == 0:
            child = subprocess.Popen(
                [sys.executable, __file__, "--role", "joiner", "--port", str(args.port), "--founders", str(n), "--stamp", stamp],
            )
        while not mpg.get_peer_state(pg, [n])[0]:
            time.sleep(0.001)
        t0 = time.monotonic()
        resp = mpg.recover_ranks(pg, [n])
        t1 = time.monotonic()
        assert resp.status == mpg.ProposalStatus.Applied, resp
        t = torch.ones(256)
        dist.all_reduce(t)
        dist.barrier()
        if child is not None:
            while not os.path.exists(stamp):
                time.sleep(0.001)
            with open(stamp) as f:
                joiner = json.load(f)
            os.unlink(stamp)
            k0 = time.monotonic()
            child.kill()
            child.wait()
        try:
            while True:
                dist.all_reduce(t)
        except Exception:  # noqa: BLE001
            pass
        while n in pg._elastic.view()[1]:
            time.sleep(0.0005)
        k1 = time.monotonic()
        mpg.sync_after_failure(pg)
        if rank == 0:
            rows.append({"recover_ms": (t1 - t0) * 1e3, "activate_to_first_ms": (joiner["first_end"] - t0) * 1e3, "kill_to_agreed_ms": (k1 - k0) * 1e3})
    dist.destroy_process_group()
    if rank == 0:
        print(f"# {args.cycles} cycles, {n} founders + 1 joiner, mooncake-cpu, eviction 500 ms")
        for key in ["recover_ms", "activate_to_first_ms", "kill_to_agreed_ms"]:
            v = sorted(r[key] for r in rows)
            p90 = v[min(len(v) - 1, int(0.9 * len(v)))]
            print(f"{key:>22}: median {statistics.median(v):8.2f}  p90 {p90:8.2f}  max {v[-1]:8.2f}")


def joiner(args: argparse.Namespace) -> None:
    import tidewire.mooncake

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    n = args.founders
    active = torch.zeros(n + 1, dtype=torch.int32)
    dist.init_process_group(
        "mooncake-cpu", init_method=f"tcp://127.0.0.1:{args.port}", rank=n, world_size=n + 1,
        timeout=timedelta(seconds=20), pg_options=mpg.MooncakeBackendOptions(active, True, n + 1),
    )
    mpg.join_group(dist.group.WORLD)
    t = torch.ones(256)
    dist.all_reduce(t)
    first_end = time.monotonic()
    dist.barrier()
    with open(args.stamp + ".tmp", "w") as f:
        json.dump({"first_end": first_end}, f)
    os.replace(args.stamp + ".tmp", args.stamp)
    time.sleep(600)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cycles", type=int, default=20)
    p.add_argument("--founders", type=int, default=2)
    p.add_argument("--role", default="launcher", choices=["launcher", "founder", "joiner"])
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--stamp", default="")
    args = p.parse_args()
    if args.role == "joiner":
        return joiner(args)
    if args.role == "founder":
        return founder(args.rank, args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen([sys.executable, __file__, "--role", "founder", "--rank", str(r), "--port", str(port),
                          "--founders", str(args.founders), "--cycles", str(args.cycles)])
        for r in range(args.founders)
    ]
    try:
        for pr in procs:
            pr.wait(timeout=60 + 10 * args.cycles)
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    main()
