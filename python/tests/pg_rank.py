"""One rank of a torch.distributed test group on the tidewire backend (started by
test_distributed.py): `pg_rank.py BODY RANK SIZE PORT [ARG]` (rank_main.py); prints one JSON line with the
result ({"ok": ...} or {"error": ...})."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist

import tidewire
import tidewire.distributed  # noqa: F401  (registers the backend)

INT_TYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]
FLOAT_TYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OPS = {
    "sum": dist.ReduceOp.SUM,
    "avg": dist.ReduceOp.AVG,
    "product": dist.ReduceOp.PRODUCT,
    "min": dist.ReduceOp.MIN,
    "max": dist.ReduceOp.MAX,
}


def _until(cond: Callable[[], bool], seconds: float) -> bool:
    """Waits until `cond()` holds, at most `seconds`; whether it did."""
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def _started_by(flag: str, seconds: float) -> bool:
    """Waits for the file `flag` (a later process's go-ahead from the others), at most
    `seconds`; whether it came."""
    return _until(lambda: os.path.exists(flag), seconds)


def init(rank: int, size: int, port: int, timeout_s: float = 60.0) -> None:
    dist.init_process_group(
        "tidewire",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout_s),
    )


def data(rank: int, dtype: torch.dtype, n: int = 1000) -> torch.Tensor:
    """Rank `rank`'s input: small values (no integer overflow in any reduction)."""
    g = torch.Generator().manual_seed(1234 + rank)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.rand(n, generator=g) * 4 - 2).to(dtype)
    return torch.randint(1, 4, (n,), generator=g).to(dtype)


def reference(size: int, dtype: torch.dtype, op: str, n: int = 1000) -> torch.Tensor:
    xs = torch.stack([data(r, dtype, n) for r in range(size)])
    if dtype == torch.bool:
        return {"sum": xs.any(0), "max": xs.any(0), "product": xs.all(0), "min": xs.all(0)}[op]
    wide = xs.double() if dtype.is_floating_point else xs.long()
    if op == "sum":
        out = wide.sum(0)
    elif op == "avg":
        out = wide.sum(0) / size if dtype.is_floating_point else torch.div(wide.sum(0), size, rounding_mode="trunc")
    elif op == "product":
        out = wide.prod(0)
    elif op == "min":
        out = wide.min(0).values
    else:
        out = wide.max(0).values
    return out.to(dtype)


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    if got.dtype in (torch.float16, torch.bfloat16):
        return torch.allclose(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    if got.dtype.is_floating_point:
        return torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6)
    return torch.equal(got, want)


def body_collectives(rank: int, size: int, port: int, arg: str) -> Any:
    """Every collective × dtype × op against a reference computed here (arg "hosts": every rank
    on a host of its own as the engine sees it, so the rings travel over tcp)."""
    if arg == "hosts":
        os.environ["TIDEWIRE_HOST_ID"] = f"pg-test-host-{rank}"
        tidewire.metrics_text()  # recording on, to see which transport moved the bytes
    init(rank, size, port)
    bad: List[str] = []

    def check(name: str, ok: bool) -> None:
        if not ok:
            bad.append(name)

    for dtype in INT_TYPES + FLOAT_TYPES + [torch.bool]:
        for op in OPS:
            if dtype == torch.bool and op == "avg":
                try:
                    dist.all_reduce(data(rank, dtype), op=OPS[op])
                    bad.append("bool avg was accepted")
                except Exception:
                    pass
                continue
            t = data(rank, dtype)
            dist.all_reduce(t, op=OPS[op])
            check(f"all_reduce {dtype} {op}", close(t, reference(size, dtype, op)))
            # The other reductions, every dtype × op too (the root moves with the op).
            got = torch.empty(64, dtype=dtype)
            dist.reduce_scatter_tensor(got, data(rank, dtype, size * 64), op=OPS[op])
            want = reference(size, dtype, op, size * 64)[rank * 64 : (rank + 1) * 64]
            check(f"reduce_scatter {dtype} {op}", close(got, want))
            root = list(OPS).index(op) % size
            red = data(rank, dtype, 64)
            dist.reduce(red, dst=root, op=OPS[op])
            want = reference(size, dtype, op, 64) if rank == root else data(rank, dtype, 64)
            check(f"reduce {dtype} {op} to {root}", close(red, want))
        # The byte movers over every dtype.
        flat = torch.empty(size * 50, dtype=dtype)
        dist.all_gather_into_tensor(flat, data(rank, dtype, 50))
        check(f"all_gather {dtype}", torch.equal(flat, torch.cat([data(r, dtype, 50) for r in range(size)])))
        bc = data(rank, dtype, 50)
        dist.broadcast(bc, src=size - 1)
        check(f"broadcast {dtype}", torch.equal(bc, data(size - 1, dtype, 50)))
        xo = torch.empty(size * 8, dtype=dtype)
        dist.all_to_all_single(xo, data(rank, dtype, size * 8))
        want = torch.cat([data(r, dtype, size * 8)[rank * 8 : (rank + 1) * 8] for r in range(size)])
        check(f"all_to_all_single {dtype}", torch.equal(xo, want))
        gl = [torch.empty(50, dtype=dtype) for _ in range(size)] if rank == 0 else None
        dist.gather(data(rank, dtype, 50), gl, dst=0)
        if gl is not None:
            check(f"gather {dtype}", all(torch.equal(x, data(r, dtype, 50)) for r, x in enumerate(gl)))
        sc = torch.empty(50, dtype=dtype)
        dist.scatter(sc, [data(r + 7, dtype, 50) for r in range(size)] if rank == 0 else None, src=0)
        check(f"scatter {dtype}", torch.equal(sc, data(rank + 7, dtype, 50)))
    # 1 MiB to 2 MiB per rank go through every rank's shared stage (where the rings are mapped): every
    # dtype × op of all_reduce there, and the other staged collectives, sizes not a multiple of
    # the rank count.
    for dtype in INT_TYPES + FLOAT_TYPES + [torch.bool]:
        n = (1 << 20) // dtype.itemsize + 3
        for op in OPS:
            if dtype == torch.bool and op == "avg":
                continue
            t = data(rank, dtype, n)
            dist.all_reduce(t, op=OPS[op])
            check(f"staged all_reduce {dtype} {op}", close(t, reference(size, dtype, op, n)))
        got = torch.empty(n, dtype=dtype)
        dist.reduce_scatter_tensor(got, data(rank, dtype, size * n), op=dist.ReduceOp.MAX)
        want = reference(size, dtype, "max", size * n)[rank * n : (rank + 1) * n]
        check(f"staged reduce_scatter {dtype}", close(got, want))
        flat = torch.empty(size * n, dtype=dtype)
        dist.all_gather_into_tensor(flat, data(rank, dtype, n))
        check(f"staged all_gather {dtype}", torch.equal(flat, torch.cat([data(r, dtype, n) for r in range(size)])))
    # A large all_reduce (12 MiB: past the staged sizes, direct reads or the ring) and a
    # non-contiguous one.
    big = data(rank, torch.float32, 3 << 20)
    dist.all_reduce(big)
    check("all_reduce 12 MiB", close(big, reference(size, torch.float32, "sum", 3 << 20)))
    nc = data(rank, torch.float64, 2000).reshape(1000, 2)[:, 0]
    dist.all_reduce(nc)
    check("all_reduce non-contiguous", close(nc, reference(size, torch.float64, "sum", 2000).reshape(1000, 2)[:, 0]))
    # broadcast, all_gather (list, into tensor), reduce_scatter (list, tensor).
    for root in range(size):
        b = data(rank, torch.int32)
        dist.broadcast(b, src=root)
        check(f"broadcast from {root}", torch.equal(b, data(root, torch.int32)))
    mine = data(rank, torch.bfloat16, 300)
    outs = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(outs, mine)
    check("all_gather list", all(torch.equal(o, data(r, torch.bfloat16, 300)) for r, o in enumerate(outs)))
    flat = torch.empty(size * 300, dtype=torch.bfloat16)
    dist.all_gather_into_tensor(flat, mine)
    check("all_gather_into_tensor", torch.equal(flat, torch.cat([data(r, torch.bfloat16, 300) for r in range(size)])))
    full = data(rank, torch.float32, size * 100)
    want_full = reference(size, torch.float32, "sum", size * 100)
    rs = torch.empty(100)
    dist.reduce_scatter_tensor(rs, full)
    check("reduce_scatter_tensor", close(rs, want_full[rank * 100 : (rank + 1) * 100]))
    rs2 = torch.empty(100)
    dist.reduce_scatter(rs2, list(full.chunk(size)), op=dist.ReduceOp.MAX)
    want_max = reference(size, torch.float32, "max", size * 100)
    check("reduce_scatter list max", close(rs2, want_max[rank * 100 : (rank + 1) * 100]))
    # In place: the input is the output's own shard.
    ip = data(rank, torch.float32, size * 100).clone()
    dist.reduce_scatter_tensor(ip[rank * 100 : (rank + 1) * 100], ip)
    check("reduce_scatter_tensor in place", close(ip[rank * 100 : (rank + 1) * 100], want_full[rank * 100 : (rank + 1) * 100]))
    ag = torch.zeros(size * 300, dtype=torch.bfloat16)
    ag[rank * 300 : (rank + 1) * 300] = mine
    dist.all_gather_into_tensor(ag, ag[rank * 300 : (rank + 1) * 300])
    check("all_gather_into_tensor in place", torch.equal(ag, torch.cat([data(r, torch.bfloat16, 300) for r in range(size)])))
    # all_to_all (list) and all_to_all_single with uneven splits.
    ins = [torch.full((r + 1 + rank,), rank * 10 + r, dtype=torch.int64) for r in range(size)]
    outs2 = [torch.empty(rank + 1 + s, dtype=torch.int64) for s in range(size)]
    dist.all_to_all(outs2, ins)
    check("all_to_all list", all(torch.equal(o, torch.full((rank + 1 + s,), s * 10 + rank, dtype=torch.int64)) for s, o in enumerate(outs2)))
    in_splits = [(rank + d) % 3 + 1 for d in range(size)]
    out_splits = [(s + rank) % 3 + 1 for s in range(size)]
    a = torch.cat([torch.full((in_splits[d], 4), rank * 100 + d, dtype=torch.float32) for d in range(size)])
    b = torch.empty(sum(out_splits), 4)
    dist.all_to_all_single(b, a, out_splits, in_splits)
    want_b = torch.cat([torch.full((out_splits[s], 4), s * 100 + rank, dtype=torch.float32) for s in range(size)])
    check("all_to_all_single uneven", torch.equal(b, want_b))
    try:
        dist.all_to_all_single(b, a, [x + 1 for x in out_splits], in_splits)
        bad.append("split sizes beyond the output were accepted")
    except ValueError:
        pass
    ev = torch.arange(size * 3, dtype=torch.int32) + rank * 1000
    evo = torch.empty_like(ev)
    dist.all_to_all_single(evo, ev)
    want_ev = torch.cat([torch.arange(rank * 3, rank * 3 + 3, dtype=torch.int32) + s * 1000 for s in range(size)])
    check("all_to_all_single even", torch.equal(evo, want_ev))
    # Large uneven blocks (from three ranks on, the pairs of one host move them through pipes).
    big_in = [(rank + d) % 3 * 20_000 + 70_001 for d in range(size)]
    big_out = [(s + rank) % 3 * 20_000 + 70_001 for s in range(size)]
    la = torch.cat([torch.arange(big_in[d], dtype=torch.int32) + (rank * 10 + d) * 1_000_000 for d in range(size)])
    lb = torch.full((sum(big_out),), -1, dtype=torch.int32)
    dist.all_to_all_single(lb, la, big_out, big_in)
    want_lb = torch.cat([torch.arange(big_out[s], dtype=torch.int32) + (s * 10 + rank) * 1_000_000 for s in range(size)])
    check("all_to_all_single large uneven", torch.equal(lb, want_lb))
    # reduce, gather, scatter, barrier.
    for root in range(size):
        r = data(rank, torch.float64)
        dist.reduce(r, dst=root, op=dist.ReduceOp.SUM)
        if rank == root:
            check(f"reduce to {root}", close(r, reference(size, torch.float64, "sum")))
        g = data(rank, torch.int16, 50)
        gl = [torch.empty_like(g) for _ in range(size)] if rank == root else None
        dist.gather(g, gl, dst=root)
        if rank == root:
            check(f"gather to {root}", all(torch.equal(x, data(s, torch.int16, 50)) for s, x in enumerate(gl)))
        sc = torch.empty(50, dtype=torch.int16)
        sl = [data(s, torch.int16, 50) + root for s in range(size)] if rank == root else None
        dist.scatter(sc, sl, src=root)
        check(f"scatter from {root}", torch.equal(sc, data(rank, torch.int16, 50) + root))
    dist.barrier()
    # Point to point: a ring with send/recv, then batch_isend_irecv both ways.
    if size > 1:
        nxt, prv = (rank + 1) % size, (rank - 1) % size
        s = data(rank, torch.float32, 5000)
        r = torch.empty(5000)
        if rank % 2 == 0:
            dist.send(s, nxt)
            dist.recv(r, prv)
        else:
            dist.recv(r, prv)
            dist.send(s, nxt)
        check("send/recv ring", torch.equal(r, data(prv, torch.float32, 5000)))
        big_s = data(rank, torch.float32, 3 << 20)  # 12 MiB each way: more than a ring
        big_r = torch.empty(3 << 20)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, big_s, nxt), dist.P2POp(dist.irecv, big_r, prv)])
        for q in reqs:
            q.wait()
        check("batch_isend_irecv 12 MiB", torch.equal(big_r, data(prv, torch.float32, 3 << 20)))
        # Receives from any source: rank 0 takes one message from each other rank (recv,
        # then irecv, with the sender named), each whole; the others send.
        if rank == 0:
            senders = []
            for k in range(size - 1):
                got = torch.full((300,), -1, dtype=torch.int32)
                if k % 2 == 0:
                    src = dist.recv(got, tag=3)
                else:
                    w = dist.irecv(got, tag=3)
                    w.wait()
                    src = w._source_rank()
                senders.append(src)
                check(f"recv from any source: rank {src}'s message", 0 < src < size and torch.equal(got, data(src, torch.int32, 300)))
            check(f"recv from any source: each sender once ({senders})", sorted(senders) == list(range(1, size)))
        else:
            dist.send(data(rank, torch.int32, 300), 0, tag=3)
    # What torch builds on them.
    objs: List[Any] = [None] * size
    dist.all_gather_object(objs, {"rank": rank, "s": "x" * rank})
    check("all_gather_object", objs == [{"rank": r, "s": "x" * r} for r in range(size)])
    lst: List[Any] = [rank, "hello"] if rank == 0 else [None, None]
    dist.broadcast_object_list(lst, src=0)
    check("broadcast_object_list", lst == [0, "hello"])
    # Functional collectives (torch calls the group from C++).
    import torch.distributed._functional_collectives as fc

    w = dist.group.WORLD
    fa = fc.all_reduce(data(rank, torch.float32), "sum", w)
    check("functional all_reduce", close(fa.wait() if hasattr(fa, "wait") else fa, reference(size, torch.float32, "sum")))
    fg = fc.all_gather_tensor(data(rank, torch.float32, 10), 0, w)
    check("functional all_gather_tensor", torch.equal(torch.as_tensor(fg), torch.cat([data(r, torch.float32, 10) for r in range(size)])))
    fr = fc.reduce_scatter_tensor(full, "sum", 0, w)
    check("functional reduce_scatter_tensor", close(torch.as_tensor(fr), want_full[rank * 100 : (rank + 1) * 100]))
    fs = fc.all_to_all_single(ev, None, None, w)
    check("functional all_to_all_single", torch.equal(torch.as_tensor(fs), want_ev))
    # Arguments torch's front end lets through, refused with the reason (every rank alike,
    # so the group stays in step): an output list of another length, an output of another
    # dtype than the input.
    if size > 1:
        for what, call in [
            ("output tensors", lambda: dist.all_gather([torch.empty(3)] * (size + 1), torch.ones(3))),
            ("one dtype", lambda: dist.reduce_scatter_tensor(torch.empty(2, dtype=torch.int32), torch.ones(2 * size))),
            ("one dtype", lambda: dist.all_gather_into_tensor(torch.empty(2 * size, dtype=torch.int32), torch.ones(2))),
        ]:
            try:
                call()
                check(f"refused: {what}", False)
            except Exception as e:  # noqa: BLE001
                check(f"refused: {what} ({e})", what in str(e))
        t = torch.ones(4)
        dist.all_reduce(t)
        check("a call after the refusals", torch.equal(t, torch.full((4,), float(size))))
    dist.destroy_process_group()
    if arg == "hosts":
        tcp = [ln for ln in tidewire.metrics_text().splitlines() if ln.startswith("tidewire_bytes_total") and 'transport="tcp"' in ln]
        check(f"bytes over tcp ({tcp})", any(float(ln.rsplit(" ", 1)[1]) > 0 for ln in tcp))
    return bad


def body_groups(rank: int, size: int, port: int, arg: str) -> Any:
    """TP / PP / DP subgroups (overlapping), destroy and a new init in the same process."""
    init(rank, size, port)
    bad = []
    tp = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pp = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    dp = dist.new_group([0, 1, 2, 3])
    # Expert parallel across the TP pairs: ranks 0 and 3, 1 and 2 (overlapping every other).
    ep = [dist.new_group([0, 3]), dist.new_group([1, 2])]
    mine_tp, mine_pp, mine_ep = tp[rank // 2], pp[rank % 2], ep[0 if rank in (0, 3) else 1]
    ep_members = [0, 3] if rank in (0, 3) else [1, 2]
    layouts = [
        ("tp", mine_tp, [rank // 2 * 2, rank // 2 * 2 + 1]),
        ("pp", mine_pp, [rank % 2, rank % 2 + 2]),
        ("dp", dp, [0, 1, 2, 3]),
        ("ep", mine_ep, ep_members),
    ]
    for name, g, members in layouts:
        # Tokens to experts: block j of every member's input to member j (uneven splits).
        me = members.index(rank)
        splits_in = [1 + me + j for j in range(len(members))]
        splits_out = [1 + j + me for j in range(len(members))]
        tokens = torch.cat([torch.full((splits_in[j],), float(rank * 10 + j)) for j in range(len(members))])
        got = torch.empty(sum(splits_out))
        dist.all_to_all_single(got, tokens, splits_out, splits_in, group=g)
        want = torch.cat([torch.full((splits_out[j],), float(m * 10 + me)) for j, m in enumerate(members)])
        if not torch.equal(got, want):
            bad.append(f"{name} all_to_all_single {got.tolist()}")
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t, group=g)
        if t.item() != sum(m + 1 for m in members):
            bad.append(f"{name} all_reduce {t.item()}")
        o = [torch.zeros(1) for _ in members]
        dist.all_gather(o, torch.tensor([float(rank)]), group=g)
        if [x.item() for x in o] != [float(m) for m in members]:
            bad.append(f"{name} all_gather {o}")
    dist.destroy_process_group()
    init(rank, size, port + 1)
    t = torch.ones(3) * rank
    dist.all_reduce(t)
    if t.tolist() != [float(sum(range(size)))] * 3:
        bad.append(f"after re-init {t.tolist()}")
    dist.destroy_process_group()
    return bad


def body_paths(rank: int, size: int, port: int, arg: str) -> Any:
    """Every collective once, small and large, with this process's stderr in a file (the ranks'
    debug log, `TIDEWIRE_TRACE` set by the test): returns the log's lines naming algorithms."""
    import tempfile

    log = tempfile.TemporaryFile(mode="w+")
    saved = os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        init(rank, size, port)
        small = torch.ones(16)
        big = torch.ones(1 << 20)
        dist.all_reduce(small)
        dist.all_reduce(big)
        dist.all_gather_into_tensor(torch.empty(size * 16), small)
        dist.all_gather_into_tensor(torch.empty(size << 20), big)
        dist.reduce_scatter_tensor(torch.empty(16), torch.ones(size * 16))
        mid = torch.ones(1 << 18)
        dist.all_gather_into_tensor(torch.empty(size << 18), mid)
        dist.reduce_scatter_tensor(torch.empty(1 << 18), torch.ones(size << 18))
        dist.all_reduce(torch.ones(16 << 20))
        dist.all_to_all_single(torch.empty(size * 16), torch.ones(size * 16))
        dist.broadcast(small, src=0)
        dist.reduce(small, dst=0)
        dist.gather(small, [torch.empty(16) for _ in range(size)] if rank == 0 else None, dst=0)
        dist.scatter(small, [torch.ones(16) for _ in range(size)] if rank == 0 else None, src=0)
        dist.barrier()
        dist.destroy_process_group()
    finally:
        os.dup2(saved, 2)
    log.seek(0)
    return [ln for ln in log.read().splitlines() if " ranks: " in ln]


def body_failure(rank: int, size: int, port: int, arg: str) -> Any:
    """Rank `size - 1` is SIGKILLed in the middle of a large all_reduce (arg "kill") or
    SIGSTOPped (arg "stop"), or of a large all_to_all_single ("kill:all_to_all", whose pairs
    of one host move their blocks through pipes from three ranks on); the survivors'
    operations must fail within the timeout, naming it, and the survivors then form a new
    group."""
    arg, _, op = arg.partition(":")
    timeout = 4.0
    init(rank, size, port, timeout_s=timeout)
    victim = size - 1
    t = torch.ones(10)
    dist.all_reduce(t)
    # A receive from the victim is pending when it dies (it never sends), on a group of its own:
    # on one group a pair's messages are in order, and a receive posted before a collective
    # would take the collective's message (the ranks out of step: an error at once).
    other = dist.new_group(list(range(size)), timeout=timedelta(seconds=timeout))
    pending = dist.irecv(torch.empty(100), src=victim, tag=7, group=other) if rank != victim else None
    # And a receive from any source on a third group (nobody sends): its wait watches every rank.
    third = dist.new_group(list(range(size)), timeout=timedelta(seconds=timeout))
    anyone = dist.irecv(torch.empty(100), tag=8, group=third) if rank != victim else None
    big = torch.ones(size << 21)
    out_big = torch.empty_like(big)

    def call() -> None:
        if op == "all_to_all":
            dist.all_to_all_single(out_big, big)
        else:
            dist.all_reduce(big)

    if rank == victim:
        sig = signal.SIGKILL if arg == "kill" else signal.SIGSTOP
        threading.Timer(0.05, lambda: os.kill(os.getpid(), sig)).start()
        for _ in range(1000):
            call()
        return ["the victim outlived its signal"]
    start = time.monotonic()
    err = None
    try:
        for _ in range(1000):
            call()
    except Exception as e:  # noqa: BLE001
        err = e
    took = time.monotonic() - start
    out: Dict[str, Any] = {"took": took, "error": repr(err), "ranks": getattr(err, "ranks", None)}
    # The pending receive ends with the failure too; the Mooncake names report it.
    from tidewire.mooncake import pg as mpg

    assert pending is not None and anyone is not None
    for key, work in (("pending", pending), ("anyone", anyone)):
        waited = time.monotonic()
        try:
            work.wait()
            out[key] = "succeeded"
        except Exception as e:  # noqa: BLE001
            out[key] = repr(e)
        out[f"{key}_took"] = time.monotonic() - waited
    out["local_success"] = mpg.get_local_success(pending)
    out["hint"] = mpg.get_failed_ranks_hint(pending)
    # A later operation fails at once.
    try:
        dist.barrier()
        out["later"] = "succeeded"
    except Exception as e:  # noqa: BLE001
        out["later"] = type(e).__name__
    dist.destroy_process_group()
    # The survivors form a new group.
    init(rank, size - 1, port + 1)
    t = torch.ones(2)
    dist.all_reduce(t)
    out["regrouped"] = t.tolist()
    dist.destroy_process_group()
    return out


def body_mooncake(rank: int, size: int, port: int, arg: str) -> Any:
    """SGLang's Mooncake PG calls, through tidewire.mooncake.install()."""
    import tidewire.mooncake

    tidewire.mooncake.install()
    from mooncake import ep as mep  # type: ignore[import-not-found]
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    bad: List[str] = []
    active = torch.zeros(8, dtype=torch.int32)
    active[:size] = 1
    dist.init_process_group(
        "mooncake-cpu",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        pg_options=mpg.MooncakeBackendOptions(active),
    )
    if dist.get_backend() != "mooncake-cpu":
        bad.append(f"get_backend {dist.get_backend()}")
    if mpg.get_active_ranks(dist.group.WORLD) is not active:
        bad.append("get_active_ranks is not the caller's tensor")
    if mpg.get_peer_state(dist.group.WORLD, list(range(size))) != [True] * size:
        bad.append("peer state")
    t = torch.ones(4) * (rank + 1)
    work = dist.all_reduce(t, async_op=True)
    work.wait()
    if t.tolist() != [float(sum(range(1, size + 1)))] * 4:
        bad.append(f"all_reduce {t.tolist()}")
    if not mpg.get_local_success(work) or mpg.get_failed_ranks_hint(work) != []:
        bad.append("work status")
    sub_cpu = dist.new_group(list(range(size)), backend="mooncake-cpu", pg_options=mpg.MooncakeBackendOptions(active.clone()))
    objs: List[Any] = [None] * size
    dist.all_gather_object(objs, rank, group=sub_cpu)
    if objs != list(range(size)):
        bad.append(f"all_gather_object on a subgroup {objs}")
    dist.barrier(group=sub_cpu)
    # Recovering a rank that is active changes nothing; only a joining rank may join.
    epoch = mpg.get_current_epoch(sub_cpu)
    for call in (mpg.recover_ranks, mpg.activate_ranks):
        resp = call(sub_cpu, [0])
        if (resp.status, resp.new_epoch) != (mpg.ProposalStatus.Applied, epoch) or resp.status != 1:
            bad.append(f"{call.__name__} of an active rank: {resp}")
    if mpg.ViewUpdateStatus is not mpg.ProposalStatus or [int(s_) for s_ in mpg.SyncAfterFailureStatus] != [0, 1, 2]:
        bad.append("status enums")
    try:
        mpg.join_group(sub_cpu)
        bad.append("join_group on a founder did not raise")
    except RuntimeError as e:
        if "not joining" not in str(e):
            bad.append(f"join_group: {e}")
    if mpg.sync_after_failure(sub_cpu).status != mpg.SyncAfterFailureStatus.NoPending:
        bad.append("sync_after_failure with nothing pending")
    if mpg.get_num_synced_ranks(sub_cpu) != 0:
        bad.append("synced ranks without a joiner")
    # Both constructor families and the refused combination.
    o = mpg.MooncakeBackendOptions(16, False, True, False)
    if (o.max_group_size, o.auto_deactivate_on_failure, o.auto_sync_on_failure) != (16, True, False):
        bad.append(f"options {o}")
    try:
        mpg.MooncakeBackendOptions(16, False, False, True)
        bad.append("auto_sync without auto_deactivate was accepted")
    except ValueError:
        pass
    if mep.MooncakeBackendOptions is not mpg.MooncakeBackendOptions:
        bad.append("mooncake.ep names")
    mep.set_device_filter(["mlx5_0"])
    # A point-to-point wait bounded by set_p2p_timeout_us, not by the group's 30 s timeout:
    # rank 0 waits for a message rank 1 never sends.
    mpg.set_collective_timeout_us(30_000_000)
    mpg.set_p2p_timeout_us(300_000)
    p2p = dist.new_group(list(range(size)), backend="mooncake-cpu", pg_options=mpg.MooncakeBackendOptions(active.clone()))
    mpg.set_p2p_timeout_us(0)
    mpg.set_collective_timeout_us(0)
    if rank == 0:
        start = time.monotonic()
        try:
            dist.irecv(torch.empty(4), src=1, group=p2p).wait()
            bad.append("irecv from a silent rank returned")
        except Exception as e:  # noqa: BLE001
            took = time.monotonic() - start
            if took > 5 or "rank 1" not in str(e):
                bad.append(f"p2p timeout after {took:.1f} s: {e}")
    # Messages carry their tag and length: a receive that meets another tag fails at once,
    # naming both, with its buffer untouched.
    tags = dist.new_group(list(range(size)), backend="mooncake-cpu", pg_options=mpg.MooncakeBackendOptions(active.clone()))
    if rank == 0:
        dist.isend(torch.full((4,), 7.0), dst=1, group=tags, tag=5)
    elif rank == 1:
        got = torch.full((4,), -1.0)
        try:
            dist.recv(got, src=0, group=tags, tag=6)
            bad.append("a receive of tag 6 took a message of tag 5")
        except Exception as e:  # noqa: BLE001
            if "tag 5" not in str(e) or "expects tag 6" not in str(e) or got.tolist() != [-1.0] * 4:
                bad.append(f"tag mismatch: {e} {got.tolist()}")
    dist.barrier()
    dist.destroy_process_group()
    return bad


def body_elastic(rank: int, size: int, port: int, arg: str) -> Any:
    """Elastic membership on a `mooncake-cpu` group (arg "HOW-VICTIM"): the victim is
    SIGKILLed during all_reduce ("kill"), SIGSTOPped and continued later ("stop"), or removed
    by every rank's `deactivate_ranks` with every timeout an hour long ("shrink"). Each rank
    reports the mask it agreed to, its epoch and whether it was fenced."""
    import subprocess

    import tidewire.mooncake

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    arg, _, size_s = arg.partition("@")
    # The all_reduce the victim dies in: 1 Mi floats unless "@4B" / "@1M" / "@64M" says.
    count = {"": 1 << 20, "4B": 1, "1M": 1 << 18, "64M": 16 << 20}[size_s]
    how, victim_s = arg.split("-")
    victim = int(victim_s)
    if how == "stop":
        mpg.set_eviction_timeout_us(1_500_000)
    if how == "shrink":
        mpg.set_eviction_timeout_us(3_600_000_000)
        mpg.set_agreement_phase_timeout_us(3_600_000_000)
    active = torch.ones(size, dtype=torch.int32)
    dist.init_process_group(
        "mooncake-cpu",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=4),
        pg_options=mpg.MooncakeBackendOptions(active),
    )
    pg = dist.group.WORLD
    t = torch.ones(10)
    dist.all_reduce(t)
    pids: List[Any] = [None] * size
    dist.all_gather_object(pids, os.getpid())

    def report(**more: Any) -> Dict[str, Any]:
        mask = mpg.get_active_ranks(pg)
        out = {"mask": active.tolist(), "same_tensor": mask is active, "epoch": mpg.get_current_epoch(pg)}
        out["fenced"] = pg._elastic.view()[2]
        out.update(more)
        return out

    if how == "shrink":
        # Removing every rank is refused here, with the reason (no rank would lead it).
        everyone = mpg.deactivate_ranks(pg, list(range(size)))
        refused = [int(everyone.status), everyone.reject_reason]
        mpg.deactivate_ranks(pg, [victim])
        return report(remove_everyone=refused)
    if rank == victim:
        if how == "kill":
            threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
            big = torch.ones(count)
            for _ in range(10000):
                dist.all_reduce(big)
            return ["the victim outlived its signal"]
        subprocess.Popen(["sh", "-c", f"sleep 9; kill -CONT {os.getpid()}"])
        os.kill(os.getpid(), signal.SIGSTOP)
        # Continued: the others removed this rank meanwhile; it learns so.
        pg._elastic.wait_view(0, 10.0)
        return report()
    big = torch.ones(count)
    err = None
    try:
        for _ in range(10000):
            dist.all_reduce(big)
    except Exception as e:  # noqa: BLE001
        err = e
    failed_at = time.monotonic()
    # Watched without calling into the group: the host mask is written by the membership.
    _until(lambda: pg._elastic.epoch() >= 1, 15)
    untouched = active.tolist()
    out = report(error=repr(err), agreed_after=time.monotonic() - failed_at, mask_before_calls=untouched)
    # The survivors go on: collectives over the active ranks.
    survivors = [r for r in range(size) if r != victim]
    bad: List[str] = []
    t = torch.ones(4) * (rank + 1)
    started = time.monotonic()
    dist.all_reduce(t)
    # The first call re-forms the group; a stopped victim, still mapping the old memory, must
    # not hold it up: the call ends while the victim is still stopped. (It is continued 9 s
    # after it stopped, the re-forming comes ≈ 4 s after the stop; a release of the old rings
    # inline waited for the victim's exit, or for the engine's 10 s stall deadline.)
    out["first_call_s"] = round(time.monotonic() - started, 3)
    if how == "stop":
        try:
            with open(f"/proc/{pids[victim]}/stat") as f:
                out["victim_still_stopped"] = f.read().rsplit(")", 1)[1].split()[0] == "T"
        except OSError:  # it exited (and was reaped) meanwhile
            out["victim_still_stopped"] = False
    if t.tolist() != [float(sum(r + 1 for r in survivors))] * 4:
        bad.append(f"all_reduce {t.tolist()}")
    b = torch.full((3,), float(rank))
    dist.broadcast(b, src=survivors[-1])
    if b.tolist() != [float(survivors[-1])] * 3:
        bad.append(f"broadcast {b.tolist()}")
    g = torch.empty(size * 2)
    dist.all_gather_into_tensor(g, torch.full((2,), float(rank + 1)))
    want = [float(r + 1) if r in survivors else 0.0 for r in range(size) for _ in range(2)]
    if g.tolist() != want:
        bad.append(f"all_gather {g.tolist()}")
    # Slots of the inactive rank: nothing sent to it, zeros from it.
    full = torch.arange(size * 3, dtype=torch.float32) + 100 * rank
    rs = torch.empty(3)
    dist.reduce_scatter_tensor(rs, full)
    want_rs = [float(sum(100 * s_ for s_ in survivors) + len(survivors) * (rank * 3 + i)) for i in range(3)]
    if rs.tolist() != want_rs:
        bad.append(f"reduce_scatter {rs.tolist()} != {want_rs}")
    a2a_in = torch.tensor([float(rank * 10 + d) for d in range(size) for _ in range(2)])
    a2a_out = torch.full((size * 2,), -1.0)
    dist.all_to_all_single(a2a_out, a2a_in)
    want_a2a = [float(s_ * 10 + rank) if s_ in survivors else 0.0 for s_ in range(size) for _ in range(2)]
    if a2a_out.tolist() != want_a2a:
        bad.append(f"all_to_all_single {a2a_out.tolist()} != {want_a2a}")
    root = survivors[0]
    g_out = [torch.full((2,), -1.0) for _ in range(size)] if rank == root else None
    dist.gather(torch.full((2,), float(rank)), g_out, dst=root)
    if rank == root and [o.tolist() for o in g_out or []] != [[float(s_)] * 2 if s_ in survivors else [0.0] * 2 for s_ in range(size)]:
        bad.append(f"gather {[o.tolist() for o in g_out or []]}")
    s_out = torch.empty(2)
    dist.scatter(s_out, [torch.full((2,), float(d)) for d in range(size)] if rank == root else None, src=root)
    if s_out.tolist() != [float(rank)] * 2:
        bad.append(f"scatter {s_out.tolist()}")
    dist.barrier()
    out["after"] = bad
    dist.destroy_process_group()
    return out


def body_joiner_slots(rank: int, size: int, port: int, arg: str) -> Any:
    """Processes 0-1 found a `mooncake-cpu` group of 3 slots; process 2 joins it with options
    of 4 slots: its creation must fail naming both numbers (the founders would drop its frames,
    from a slot they do not have, and its join would wait out its timeout without a reason)."""
    import tidewire.mooncake

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    flag = f"/tmp/tw-joiner-slots-{port}"
    if rank == size - 1:
        active = torch.zeros(4, dtype=torch.int32)
        active[:2] = 1
        try:
            dist.init_process_group(
                "mooncake-cpu", init_method=f"tcp://127.0.0.1:{port}", rank=2, world_size=4,
                timeout=timedelta(seconds=20), pg_options=mpg.MooncakeBackendOptions(active, True, 4),
            )
            error = None
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
        open(flag, "w").close()
        return {"error": error}
    active = torch.zeros(3, dtype=torch.int32)
    active[:2] = 1
    dist.init_process_group(
        "mooncake-cpu", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=20), pg_options=mpg.MooncakeBackendOptions(active, False, 3),
    )
    t = torch.ones(4)
    dist.all_reduce(t)
    came = _started_by(flag, 60)
    dist.destroy_process_group()
    return {"sum": t.tolist(), "joiner_done": came}


def body_joiners(rank: int, size: int, port: int, arg: str) -> Any:
    """Ranks joining a `mooncake-cpu` group (arg "replace" or "extend"). "replace": processes
    0-3 form a group of 4; rank 2 is SIGKILLed; once the others agreed without it, process 4
    starts in slot 2 (`is_extension=True`), works alone, calls `join_group`; the survivors see
    it ready (`get_peer_state`), call `recover_ranks`, and everyone all_reduces over 4 ranks
    again. "extend": processes 0-1 form a group of 2 with room for 3; process 2 joins as rank
    2 the same way. Each reports its mask, epoch, sums and timings."""
    import tidewire.mooncake

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    mpg.set_eviction_timeout_us(1_000_000)
    flag = f"/tmp/tw-joiners-{port}"
    replace = arg == "replace"
    slots = 4 if replace else 3
    founders = 4 if replace else 2
    joiner = rank == size - 1
    me = 2 if joiner else rank
    if joiner:
        # Starts once the group is ready for it (after the victim is gone, for "replace").
        if not _started_by(flag, 60):
            return ["the founders never said to start"]
    active = torch.zeros(slots, dtype=torch.int32)
    active[:founders] = 1
    opts = mpg.MooncakeBackendOptions(active, joiner, slots)
    dist.init_process_group(
        "mooncake-cpu",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=me,
        world_size=slots if joiner else founders,
        timeout=timedelta(seconds=20),
        pg_options=opts,
    )
    pg = dist.group.WORLD
    out: Dict[str, Any] = {}
    value = float(me + 1)
    if joiner:
        # Alone until added: its collectives involve itself.
        t = torch.full((4,), value)
        dist.all_reduce(t)
        out["alone"] = t.tolist()
        out["mask_alone"] = active.tolist()
        start = time.monotonic()
        mpg.join_group(pg)
        out["joined_after"] = time.monotonic() - start
    else:
        t = torch.ones(4)
        dist.all_reduce(t)
        if replace and rank == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        if replace:
            try:
                big = torch.ones(1 << 16)
                for _ in range(10000):
                    dist.all_reduce(big)
            except Exception:  # noqa: BLE001
                pass
            _until(lambda: pg._elastic.epoch() >= 1, 30)
        out["mask_before"] = active.tolist()
        if rank == 0:
            open(flag, "w").close()
        if not _until(lambda: mpg.get_peer_state(pg, [2])[0], 60):
            return ["the joiner never became ready"]
        out["synced"] = mpg.get_num_synced_ranks(pg)
        start = time.monotonic()
        resp = mpg.recover_ranks(pg, [2])
        out["recover"] = [int(resp.status), resp.new_epoch, resp.dropped_ranks, resp.reject_reason]
        out["recovered_after"] = time.monotonic() - start
    first = time.monotonic()
    t = torch.full((4,), value)
    dist.all_reduce(t)
    out["first_collective_s"] = time.monotonic() - first
    out["sum"] = t.tolist()
    # Busy for 2.5 eviction timeouts in Python, holding the GIL (a joiner loading its model):
    # the membership's heartbeats run on their own thread, so nobody evicts it.
    busy_until = time.monotonic() + 2.5
    if joiner:
        n = 0
        while time.monotonic() < busy_until:
            n += 1
    else:
        time.sleep(2.5)
    t = torch.full((4,), value)
    dist.all_reduce(t)
    out["sum_after_busy"] = t.tolist()
    g = torch.empty(slots * 2)
    dist.all_gather_into_tensor(g, torch.full((2,), value))
    out["gathered"] = g.tolist()
    dist.barrier()
    out["mask"] = mpg.get_active_ranks(pg).tolist()
    out["same_tensor"] = mpg.get_active_ranks(pg) is active
    out["epoch"] = mpg.get_current_epoch(pg)
    out["peer_state"] = mpg.get_peer_state(pg, list(range(slots)))
    dist.barrier()
    if rank == 0:
        os.unlink(flag)
    dist.destroy_process_group()
    return out


def body_extension(rank: int, size: int, port: int, arg: str) -> Any:
    """A `mooncake-cpu` world extended from 2 to 4 ranks, with subgroups. Processes 0-1 found
    the world (room for 4), an EP-like subgroup of both founders with room for 4, and a TP
    group {0, 1}. Processes 2-3 start later in slots 2 and 3 (`is_extension=True`), make the
    same room-for-4 subgroup (the same creation order: torch names it alike) and their own TP
    group {2, 3} (`use_local_synchronization`: the founders' torch world has 2 ranks), and join
    the world and the subgroup; the founders add both at once with `activate_ranks`. Then the
    world and the subgroup span 4 ranks (`size()` grows to 4, masks in the callers' tensors),
    the TP groups 2 each."""
    import tidewire.mooncake

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    flag = f"/tmp/tw-extension-{port}"
    joiner = rank >= 2
    if joiner:
        if not _started_by(flag, 60):
            return ["never told to start"]
    world_mask = torch.tensor([1, 1, 0, 0], dtype=torch.int32)
    ep_mask = world_mask.clone()
    dist.init_process_group(
        "mooncake-cpu", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4 if joiner else 2,
        timeout=timedelta(seconds=20), pg_options=mpg.MooncakeBackendOptions(world_mask, joiner, 4),
    )
    world = dist.group.WORLD
    ep = dist.new_group([0, 1, 2, 3] if joiner else [0, 1], backend="mooncake-cpu",
                        pg_options=mpg.MooncakeBackendOptions(ep_mask, joiner, 4))
    tp_mask = torch.ones(2, dtype=torch.int32)
    tp = dist.new_group([2, 3] if joiner else [0, 1], backend="mooncake-cpu", use_local_synchronization=joiner,
                        pg_options=mpg.MooncakeBackendOptions(tp_mask))
    out: Dict[str, Any] = {}
    value = float(rank + 1)

    def sums() -> List[float]:
        got = []
        for g in (world, ep, tp):
            t = torch.full((3,), value)
            dist.all_reduce(t, group=g)
            got.append(t[0].item())
        return got

    if joiner:
        mpg.join_group(world)
        mpg.join_group(ep)
    else:
        out["before"] = sums()
        out["sizes_before"] = [world.size(), ep.size()]
        if rank == 0:
            open(flag, "w").close()
        if not _until(lambda: all(mpg.get_peer_state(world, [2, 3])), 60):
            return ["the joiners never became ready"]
        out["activated"] = [int(mpg.activate_ranks(g, [2, 3]).status) for g in (world, ep)]
    out["after"] = sums()
    g4 = torch.empty(4 * 2)
    dist.all_gather_into_tensor(g4, torch.full((2,), value), group=ep)
    out["gathered"] = g4.tolist()
    out["sizes"] = [world.size(), ep.size(), tp.size()]
    out["masks"] = [mpg.get_active_ranks(g).tolist() for g in (world, ep, tp)]
    out["same_tensors"] = [mpg.get_active_ranks(world) is world_mask, mpg.get_active_ranks(ep) is ep_mask]
    out["epochs"] = [mpg.get_current_epoch(g) for g in (world, ep, tp)]
    dist.barrier()
    if rank == 0:
        os.unlink(flag)
    return out


def body_failure_modes(rank: int, size: int, port: int, arg: str) -> Any:
    """The failure modes of a `mooncake-cpu` group when rank 3 dies: "sync_later"
    (auto_deactivate, no auto_sync: the group drops the rank by itself, and the survivors'
    collectives raise until `sync_after_failure`) and "manual" (neither: the failure is only
    reported; the framework calls `deactivate_ranks`, then `sync_after_failure`)."""
    import tidewire.mooncake

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    mpg.set_eviction_timeout_us(500_000)
    manual = arg == "manual"
    opts = mpg.MooncakeBackendOptions(size, False, not manual, False)
    dist.init_process_group(
        "mooncake-cpu", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
        timeout=timedelta(seconds=5), pg_options=opts,
    )
    pg = dist.group.WORLD
    t = torch.ones(4)
    dist.all_reduce(t)
    if rank == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    out: Dict[str, Any] = {}
    try:
        for _ in range(1000):
            dist.all_reduce(t)
        out["first_error"] = None
    except Exception as e:  # noqa: BLE001
        out["first_error"] = repr(e)
    out["hint"] = mpg.get_failed_ranks_hint(pg)
    # Longer than the eviction timeout: with auto_deactivate off nobody is evicted.
    time.sleep(1.5)
    out["epoch_after_failure"] = mpg.get_current_epoch(pg)
    out["peer_state"] = mpg.get_peer_state(pg, [0, 1, 2, 3])
    try:
        dist.all_reduce(t)
        out["second_error"] = None
    except Exception as e:  # noqa: BLE001
        out["second_error"] = repr(e)
    if manual:
        resp = mpg.deactivate_ranks(pg, [3])
        out["deactivate"] = [int(resp.status), resp.new_epoch]
    resp = mpg.sync_after_failure(pg)
    out["sync"] = int(resp.status)
    out["sync_again"] = int(mpg.sync_after_failure(pg).status)
    t = torch.full((4,), float(rank + 1))
    dist.all_reduce(t)
    out["sum"] = t.tolist()
    out["mask"] = mpg.get_active_ranks(pg).tolist()
    out["epoch"] = mpg.get_current_epoch(pg)
    return out


def body_join_cycles(rank: int, size: int, port: int, arg: str) -> Any:
    """Ranks 0 and 1 of a `mooncake-cpu` group with room for 3; slot 2 is taken `arg` times by
    a new process (spawned by rank 0) that joins, is recovered, takes part in an all_reduce and
    is SIGKILLed; the founders drop it each time. Their threads, engine mappings and
    registrations must not grow with the cycles."""
    import subprocess
    import sys

    import tidewire.mooncake

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    mpg.set_eviction_timeout_us(300_000)
    active = torch.zeros(3, dtype=torch.int32)
    dist.init_process_group(
        "mooncake-cpu", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=10), pg_options=mpg.MooncakeBackendOptions(active, False, 3),
    )
    pg = dist.group.WORLD
    eng = tidewire.distributed.engine()

    def counts() -> List[int]:
        return [
            len(os.listdir("/proc/self/task")),
            sum(p.mappings for p in eng.peers()),
            len(eng.descriptor()["regions"]),
        ]

    bad: List[str] = []
    base: List[int] = []
    for i in range(int(arg)):
        child = None
        if rank == 0:
            child = subprocess.Popen(
                [sys.executable, __file__, "join_cycle_child", "2", "3", str(port), str(i)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        if not _until(lambda: mpg.get_peer_state(pg, [2])[0], 60):
            return bad + [f"cycle {i}: the joiner never became ready"]
        resp = mpg.recover_ranks(pg, [2])
        if resp.status != mpg.ProposalStatus.Applied:
            bad.append(f"cycle {i}: recover {resp}")
        t = torch.full((4,), float(rank + 1))
        dist.all_reduce(t)
        if t.tolist() != [6.0 + i] * 4:
            bad.append(f"cycle {i}: all_reduce {t.tolist()}")
        dist.barrier()
        if child is not None:
            child.kill()
            child.wait()
        # The founders find out (a failed collective, or the heartbeats) and agree without it.
        epoch = mpg.get_current_epoch(pg)
        try:
            while True:
                dist.all_reduce(t)
        except Exception:  # noqa: BLE001
            pass
        _until(lambda: 2 not in pg._elastic.view()[1], 30)
        mpg.sync_after_failure(pg)
        if active.tolist() != [1, 1, 0] or mpg.get_current_epoch(pg) <= epoch:
            bad.append(f"cycle {i}: mask {active.tolist()} epoch {mpg.get_current_epoch(pg)}")
        # A call into the group re-forms its rings without the joiner if the failing call did
        # not (the view may change after it): only then are the joiner's mappings released.
        dist.barrier()
        if i == 1:
            base = counts()
    # Growth is the leak; fewer is not. (Before each cycle's barrier, whether the rings had
    # been re-formed without the joiner depended on timing: counts of 2 -> 1 and 1 -> 2 were
    # seen.) The end waits up to 5 s for the counts to come back; a leak stays.
    end_counts = counts()
    settle = time.monotonic() + 5
    while base and any(e > b for e, b in zip(end_counts[1:], base[1:])) and time.monotonic() < settle:
        time.sleep(0.05)
        end_counts = counts()
    if base and (end_counts[0] > base[0] + 2 or any(e > b for e, b in zip(end_counts[1:], base[1:]))):
        bad.append(f"threads, mappings, registrations {base} -> {end_counts}")
    dist.destroy_process_group()
    # The engine keeps a small record of each departed peer (its name and why it left).
    return {"bad": bad, "counts": [base, end_counts], "peer_records": len(eng.peers())}


def body_join_cycle_child(rank: int, size: int, port: int, arg: str) -> Any:
    """One joiner of `body_join_cycles`: slot 2, value 3 + the cycle's number; then waits to be
    killed."""
    import tidewire.mooncake

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    active = torch.zeros(3, dtype=torch.int32)
    dist.init_process_group(
        "mooncake-cpu", init_method=f"tcp://127.0.0.1:{port}", rank=2, world_size=3,
        timeout=timedelta(seconds=10), pg_options=mpg.MooncakeBackendOptions(active, True, 3),
    )
    pg = dist.group.WORLD
    mpg.join_group(pg)
    t = torch.full((4,), 3.0 + int(arg))
    dist.all_reduce(t)
    dist.barrier()
    time.sleep(600)
    return None


#: Tokens per rank of the EP calls in the elastic scenarios (the checks' T).
T_EP = 128


def _die_inside_the_next_dispatch(buf: Any) -> None:
    """The process SIGKILLs itself in the middle of its next EP dispatch over the collective
    fallback: after the split sizes went out, before the rows do."""
    inner = buf._fallback._all_to_all
    calls = [0]

    def dying(*args: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return inner(*args)

    buf._fallback._all_to_all = dying


def body_sglang_elastic(rank: int, size: int, port: int, arg: str) -> Any:
    """SGLang's elastic flow on `mooncake-cpu` groups: processes 0-3 are the world with TP
    groups {0, 1} and {2, 3}, each with its own mask tensor, and an EP buffer over the world
    (host tensors: the collective fallback) whose calls take the world's mask as their
    `active_ranks`; rank 3 dies during EP dispatches and all_reduces; the masks drop it and
    the EP calls, world and TP collectives go on over the survivors; process 4 replaces rank 3
    (the world and its TP group, `is_extension=True`), the survivors see it ready, recover it
    in both groups and update their EP buffers while it makes its own, and the masks, EP calls
    and collectives include it again. Every EP call is checked against what each rank computes
    from the seeds."""
    import tidewire.ep
    import tidewire.mooncake
    from ep_rank import known_round_trip

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    mpg.set_eviction_timeout_us(500_000)
    flag = f"/tmp/tw-sglang-{port}"
    joiner = rank == 4
    me = 3 if joiner else rank
    if joiner:
        if not _started_by(flag, 60):
            return ["never told to start"]
    world_mask = torch.ones(4, dtype=torch.int32)
    dist.init_process_group(
        "mooncake-cpu", init_method=f"tcp://127.0.0.1:{port}", rank=me, world_size=4,
        timeout=timedelta(seconds=20), pg_options=mpg.MooncakeBackendOptions(world_mask, joiner),
    )
    world = dist.group.WORLD
    tp_masks = [torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32)]
    tps = [
        dist.new_group(r, backend="mooncake-cpu", pg_options=mpg.MooncakeBackendOptions(m, joiner))
        for r, m in zip([[0, 1], [2, 3]], tp_masks)
    ]
    mine = me // 2
    tp, tp_mask = tps[mine], tp_masks[mine]
    out: Dict[str, Any] = {}
    value = float(me + 1)
    E, H = 16, 256
    ep_bad: List[str] = []
    tidewire.metrics_text()  # recording on

    def sums() -> List[float]:
        w = torch.full((2,), value)
        dist.all_reduce(w)
        t = torch.full((2,), value)
        dist.all_reduce(t, group=tp)
        return [w[0].item(), t[0].item()]

    if joiner:
        mpg.join_group(world)
        mpg.join_group(tp)
        mpg.get_active_ranks(world)  # the mask as the view it was added in
        buf = tidewire.ep.Buffer(world)
    else:
        buf = tidewire.ep.Buffer(world)
        out["ep_fallback"] = buf.fallback
        known_round_trip(buf, me, 4, E, H, world_mask, 1, False, "EP before", ep_bad, device="cpu")
        # A combine refused for a bad argument leaves its handle usable; a second one is refused.
        xs, ts, ws = torch.ones(T_EP, H, dtype=torch.bfloat16), torch.arange(T_EP * 2).view(T_EP, 2) % E, torch.ones(T_EP, 2)
        rx, _, h, _, _ = buf.dispatch(xs, ts, world_mask, T_EP, E, 5_000_000, use_fp8=False)
        try:
            buf.combine(rx, ts, ws, world_mask, 5_000_000, h, out=torch.empty(1, 1, dtype=torch.bfloat16))
            ep_bad.append("a combine into a wrong-shaped out= was not refused")
        except ValueError:
            pass
        buf.combine(rx, ts, ws, world_mask, 5_000_000, h)
        try:
            buf.combine(rx, ts, ws, world_mask, 5_000_000, h)
            ep_bad.append("a handle's second combine was not refused")
        except ValueError as e:
            if "already run" not in str(e):
                ep_bad.append(f"a handle's second combine: {e}")
        out["before"] = sums()
        x, topk, w = torch.ones(T_EP, H, dtype=torch.bfloat16), torch.arange(T_EP * 2).view(T_EP, 2) % E, torch.ones(T_EP, 2)
        where = "all_reduce"
        try:
            big = torch.ones(1 << 16)
            for i in range(100000):
                if rank == 3 and i == 20:
                    _die_inside_the_next_dispatch(buf)
                where = "dispatch"
                rx, _, h, _, _ = buf.dispatch(x, topk, world_mask, T_EP, E, 5_000_000, use_fp8=False)
                where = "combine"
                buf.combine(rx, topk, w, world_mask, 5_000_000, h)
                where = "all_reduce"
                dist.all_reduce(big)
                if rank >= 2:
                    dist.all_reduce(big, group=tp)
        except Exception as e:  # noqa: BLE001
            out["ep_error"] = f"{where}: {str(e)[:300]}"
        _until(lambda: mpg.get_current_epoch(world) >= 1 and (rank != 2 or mpg.get_current_epoch(tp) >= 1), 30)
        out["masks_after_death"] = [world_mask.tolist(), tp_mask.tolist()]
        known_round_trip(buf, me, 4, E, H, world_mask, 2, False, "EP after the death", ep_bad, device="cpu")
        out["serving"] = sums()
        if rank == 0:
            open(flag, "w").close()
        if not _until(lambda: mpg.get_peer_state(world, [3])[0], 60):
            return ["the replacement never became ready"]
        out["recover_world"] = int(mpg.recover_ranks(world, [3]).status)
        if rank == 2:
            out["recover_tp"] = int(mpg.recover_ranks(tp, [1]).status)
        buf.update_ep_member()
    known_round_trip(buf, me, 4, E, H, world_mask, 3, False, "EP after the replacement", ep_bad, device="cpu")
    out["ep_bad"] = ep_bad
    out["ep_metrics"] = [l for l in tidewire.metrics_text().splitlines() if l.startswith("tidewire_ep_")]
    out["after"] = sums()
    dist.barrier()
    out["masks"] = [world_mask.tolist(), tp_mask.tolist()]
    dist.barrier()
    if rank == 0:
        os.unlink(flag)
    return out


def _cuda_world_of_two(rank: int, port: int, start: str) -> Any:
    """Processes 0 and 1 form a `mooncake` world on two GPUs (20 s timeout, a CUDA mask);
    process 2 is rank 1's replacement (`is_extension`), which starts once the file `start`
    exists. Returns `(me, joiner, device, mask)`, or None for a replacement never told to
    start."""
    from mooncake import pg as mpg  # type: ignore[import-not-found]
    from rank_main import gpu_of

    joiner = rank == 2
    me = 1 if joiner else rank
    if joiner and not _started_by(start, 90):
        return None
    torch.cuda.set_device(gpu_of(me))
    dev = torch.device("cuda", gpu_of(me))
    wm = torch.ones(2, dtype=torch.int32, device=dev)
    dist.init_process_group(
        "mooncake", init_method=f"tcp://127.0.0.1:{port}", rank=me, world_size=2,
        timeout=timedelta(seconds=20), pg_options=mpg.MooncakeBackendOptions(wm, joiner),
    )
    return me, joiner, dev, wm


def body_cuda_elastic(rank: int, size: int, port: int, arg: str) -> Any:
    """SGLang's elastic flow on two GPUs. Processes 0 and 1 form the world in both forms
    (`mooncake` with a CUDA mask, `mooncake-cpu` with a host mask) and a TP group of both in
    both forms, and an EP buffer over the CUDA world (the NVLink kernels) whose calls take the
    world's CUDA mask as `active_ranks`. The groups' eviction timeout is 60 s, so that only the
    EP kernels can tell the world quickly: rank 1 is SIGKILLed while rank 0 waits for it in a
    dispatch; rank 0's kernels mark it inactive, its next EP call reports it, the world drops it;
    the other groups drop it when their serving collectives fail on it and go on over rank 0.
    Process 2 then replaces rank 1 on GPU 1 in every group (`is_extension=True`), makes its EP
    buffer while rank 0 recovers it everywhere and updates its own; every mask holds both ranks
    again and EP calls and collectives include it. Every EP call is checked."""
    import tidewire.ep
    import tidewire.mooncake
    from ep_rank import calc_diff, inputs, known_round_trip

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    mpg.set_eviction_timeout_us(60_000_000)
    flag = f"/tmp/tw-cuda-elastic-{port}"
    formed = _cuda_world_of_two(rank, port, flag)
    if formed is None:
        return ["never told to start"]
    me, joiner, dev, wm = formed
    world = dist.group.WORLD
    masks = [wm, torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32, device=dev), torch.ones(2, dtype=torch.int32)]
    world_cpu = dist.new_group([0, 1], backend="mooncake-cpu", pg_options=mpg.MooncakeBackendOptions(masks[1], joiner))
    tp = dist.new_group([0, 1], backend="mooncake", pg_options=mpg.MooncakeBackendOptions(masks[2], joiner))
    tp_cpu = dist.new_group([0, 1], backend="mooncake-cpu", pg_options=mpg.MooncakeBackendOptions(masks[3], joiner))
    groups = [world, world_cpu, tp, tp_cpu]
    R, E, H = 2, 32, 2048
    out: Dict[str, Any] = {}
    bad: List[str] = []
    value = float(me + 1)

    def sums() -> List[float]:
        got = []
        for g in groups:
            t = torch.full((4,), value, device=dev if g in (world, tp) else "cpu")
            dist.all_reduce(t, group=g)
            got.append(t[0].item())
        return got

    def current_masks() -> List[List[int]]:
        return [mpg.get_active_ranks(g).tolist() for g in groups]

    if joiner:
        for g in groups:
            mpg.join_group(g)
        mpg.get_active_ranks(world)  # the CUDA mask as the view it was added in
        buf = tidewire.ep.Buffer(world, tidewire.ep.Buffer.get_ep_buffer_size_hint(128, H, R, E))
    else:
        buf = tidewire.ep.Buffer(world, tidewire.ep.Buffer.get_ep_buffer_size_hint(128, H, R, E))
        out["paths"] = buf.paths
        known_round_trip(buf, me, R, E, H, wm, 1, False, "EP before", bad)
        known_round_trip(buf, me, R, E, H, wm, 2, True, "EP before, fp8", bad)
        out["before"] = sums()
        dist.barrier(group=world_cpu)
        if rank == 1:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        # Rank 0 waits in this dispatch for a rank that dies meanwhile.
        x, topk, w = inputs(0, H, E, 3, 128)
        t0 = time.monotonic()
        rx, cnt, h, _, _ = buf.dispatch(x, topk, wm, 128, E, 20_000_000, use_fp8=False)
        comb, _, _ = buf.combine(rx, topk, w, wm, 20_000_000, h)
        torch.cuda.synchronize()
        out["death_call_s"] = time.monotonic() - t0
        out["active_after_death"] = wm.tolist()
        el = E // R
        if cnt.cpu().tolist() != [int((topk == l).sum()) for l in range(el)]:
            bad.append(f"the dispatch rank 1 died in: counts {cnt.tolist()} are not rank 0's own")
        own = ((topk >= 0) & (topk // el == 0)).float()
        d = calc_diff(comb.float(), x.float() * (w * own).sum(1, keepdim=True))
        if d > 1e-5:
            bad.append(f"the combine after rank 1 died: diff {d:.2e}")
        # The next EP call reports the kernels' verdict to the world, which drops the rank long
        # before its own eviction timeout.
        known_round_trip(buf, me, R, E, H, wm, 4, False, "EP after the death", bad)
        _until(lambda: mpg.get_current_epoch(world) >= 1, 20)
        out["world_agreed_s"] = time.monotonic() - t0
        # The other groups learn it when their serving collectives fail on it (a CUDA one
        # fails in its kernel and says so at the group's next call).
        for g in groups[1:]:
            for _ in range(3):
                try:
                    t = torch.ones(4, device=dev if g is tp else "cpu")
                    dist.all_reduce(t, group=g)
                    torch.cuda.synchronize()
                except Exception:  # noqa: BLE001
                    break
            _until(lambda: mpg.get_current_epoch(g) >= 1, 20)
        out["masks_after_death"] = current_masks()
        out["serving"] = sums()
        open(flag, "w").close()
        # It joins the groups one by one (each join blocks until it is added): recover_ranks
        # waits for its readiness in the later ones.
        if not _until(lambda: mpg.get_peer_state(world, [1])[0], 90):
            return ["the replacement never became ready"]
        out["recovered"] = [int(mpg.recover_ranks(g, [1]).status) for g in groups]
        buf.update_ep_member()
        out["paths_after"] = buf.paths
    mpg.get_active_ranks(world)
    known_round_trip(buf, me, R, E, H, wm, 5, True, "EP with the replacement, fp8", bad)
    known_round_trip(buf, me, R, E, H, wm, 6, False, "EP with the replacement", bad)
    out["after"] = sums()
    out["masks"] = current_masks()
    out["epochs"] = [mpg.get_current_epoch(g) for g in groups]
    out["bad"] = bad
    dist.barrier(group=world_cpu)
    if rank == 0:
        os.unlink(flag)
    return out


def body_cuda_ep_stale(rank: int, size: int, port: int, arg: str) -> Any:
    """An EP buffer over a `mooncake` group of two GPUs whose rank 1 is stopped, not killed
    (process 1, SIGSTOP): the group evicts it, process 2 replaces it and every rank updates its
    EP buffer; then rank 0 resumes process 1, which makes the dispatch it was about to make
    when it stopped — its host check skipped, as for a process frozen between the check and the
    launch — with rows and experts of its own, before the others' next call. That stale
    dispatch carries the number of the others' next call (process 1 made every call rank 0
    made): the calls after it must give exactly what rank 0 and the replacement send."""
    import json

    import tidewire.ep
    import tidewire.mooncake
    from ep_rank import inputs, known_round_trip

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    flag = f"/tmp/tw-ep-stale-{port}"
    formed = _cuda_world_of_two(rank, port, flag + ".start")
    if formed is None:
        return ["never told to start"]
    me, joiner, _, wm = formed
    world = dist.group.WORLD
    R, E, H = 2, 32, 2048
    size_hint = tidewire.ep.Buffer.get_ep_buffer_size_hint(128, H, R, E)
    out: Dict[str, Any] = {}
    bad: List[str] = []
    if joiner:
        mpg.join_group(world)
        mpg.get_active_ranks(world)  # the CUDA mask as the view it was added in
        buf = tidewire.ep.Buffer(world, size_hint)
        if not _started_by(flag + ".stale", 60):
            bad.append("the stopped process never made its dispatch")
    else:
        buf = tidewire.ep.Buffer(world, size_hint)
        known_round_trip(buf, me, R, E, H, wm, 1, False, "EP before", bad)
        known_round_trip(buf, me, R, E, H, wm, 2, False, "EP before", bad)
        dist.barrier()
        if rank == 1:
            with open(flag + ".pid.tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(flag + ".pid.tmp", flag + ".pid")
            os.kill(os.getpid(), signal.SIGSTOP)
            # Resumed after the others replaced this rank: the dispatch it was about to make.
            buf._agree = lambda active: None  # type: ignore[method-assign]
            x, topk, _ = inputs(1, H, E, 99, 128)
            try:
                buf.dispatch(torch.full_like(x, 7.0), topk, wm, 128, E, 2_000_000, use_fp8=False)
                torch.cuda.synchronize()
                out["stale"] = "dispatched"
            except Exception as e:  # noqa: BLE001
                out["stale"] = f"raised: {str(e)[:200]}"
            open(flag + ".stale", "w").close()
            # The group's teardown would wait for peers that moved on without it.
            print(json.dumps({"ok": out}), flush=True)
            os._exit(0)
        _until(lambda: mpg.get_current_epoch(world) >= 1, 30)
        out["epoch_after_stop"] = mpg.get_current_epoch(world)
        open(flag + ".start", "w").close()
        if not _until(lambda: mpg.get_peer_state(world, [1])[0], 90):
            return ["the replacement never became ready"]
        out["recovered"] = int(mpg.recover_ranks(world, [1]).status)
        t0 = time.monotonic()
        buf.update_ep_member()
        out["update_s"] = time.monotonic() - t0
        if not _started_by(flag + ".pid", 5):
            return ["process 1 wrote no pid"]
        with open(flag + ".pid") as f:
            os.kill(int(f.read()), signal.SIGCONT)
        if not _started_by(flag + ".stale", 60):
            bad.append("the stopped process never made its dispatch")
    mpg.get_active_ranks(world)
    for seed in (5, 6, 7):
        known_round_trip(buf, me, R, E, H, wm, seed, False, f"EP after the replacement (seed {seed})", bad)
    out["bad"] = bad
    out["mask"] = mpg.get_active_ranks(world).tolist()
    dist.barrier()
    if rank == 0:
        for suffix in (".start", ".pid", ".stale"):
            os.unlink(flag + suffix)
    return out


def body_cuda_survivors(rank: int, size: int, port: int, arg: str) -> Any:
    """Three ranks of a `mooncake` group on two GPUs (ranks 0 and 2 share GPU 0, so the group
    makes no CUDA call before rank 0 dies); rank 0 (whose process holds the store) is
    SIGKILLed; ranks 1 and 2 agree without it, and their first CUDA collective forms a new
    NVLink path over them through the membership. Every collective is checked against what it
    must give with slot 0 inactive (its slots of outputs zeros); a root outside the view is
    refused, naming it."""
    import tidewire
    import tidewire.mooncake

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    tidewire.metrics_text()  # recording on
    mask = torch.ones(3, dtype=torch.int32)
    dist.init_process_group(
        "mooncake", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
        timeout=timedelta(seconds=20), pg_options=mpg.MooncakeBackendOptions(mask),
    )
    pg = dist.group.WORLD
    t = torch.ones(4)
    dist.all_reduce(t)
    dist.barrier()
    if rank == 0:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        for _ in range(100000):
            dist.all_reduce(t)
    except Exception:  # noqa: BLE001
        pass
    _until(lambda: mpg.get_current_epoch(pg) >= 1, 30)
    from rank_main import gpu_of

    torch.cuda.set_device(gpu_of(1 if rank == 1 else 0))
    dev = torch.device("cuda", torch.cuda.current_device())
    members, me = [1, 2], rank
    bad: List[str] = []

    def full(v: float, n: int = 1000, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full((n,), v, dtype=dtype, device=dev)

    def check(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        if not torch.equal(got.cpu(), want.cpu()):
            bad.append(f"{what}: got {got.flatten()[:6].tolist()}..., want {want.flatten()[:6].tolist()}...")

    x = full(me + 1.0)
    dist.all_reduce(x)
    check("all_reduce sum", x, full(5.0))
    big = full(me + 1.0, 1 << 20)
    dist.all_reduce(big, op=dist.ReduceOp.MAX)
    check("all_reduce max 4 MiB", big, full(3.0, 1 << 20))
    b = torch.arange(100, device=dev, dtype=torch.float32) * (me + 1)
    dist.broadcast(b, src=2)
    check("broadcast from 2", b, torch.arange(100, dtype=torch.float32) * 3)
    c = 64
    g = torch.full((3 * c,), -1.0, device=dev)
    dist.all_gather_into_tensor(g, full(me + 1.0, c))
    check("all_gather_into_tensor", g, torch.cat([torch.zeros(c), torch.full((c,), 2.0), torch.full((c,), 3.0)]))
    outs = [full(-1.0, c) for _ in range(3)]
    dist.all_gather(outs, full(me + 1.0, c))
    check("all_gather", torch.stack(outs), torch.stack([torch.zeros(c), torch.full((c,), 2.0), torch.full((c,), 3.0)]))
    inp = torch.cat([full((me + 1.0) * (j + 1), c) for j in range(3)])
    o = full(-1.0, c)
    dist.reduce_scatter_tensor(o, inp)
    check("reduce_scatter_tensor", o, torch.full((c,), 5.0 * (me + 1)))
    a_in = torch.cat([full(10.0 * (me + 1) + j, c) for j in range(3)])
    a_out = full(-1.0, 3 * c)
    dist.all_to_all_single(a_out, a_in)
    want = torch.cat([torch.zeros(c)] + [torch.full((c,), 10.0 * (s + 1) + me) for s in members])
    check("all_to_all_single", a_out, want)
    r = full(me + 1.0)
    dist.reduce(r, dst=1)
    if me == 1:
        check("reduce to 1", r, full(5.0))
    gl = [full(-1.0, c) for _ in range(3)] if me == 2 else None
    dist.gather(full(me + 1.0, c), gl, dst=2)
    if gl is not None:
        check("gather to 2", torch.stack(gl), torch.stack([torch.zeros(c), torch.full((c,), 2.0), torch.full((c,), 3.0)]))
    so = full(-1.0, c)
    dist.scatter(so, [full(100.0 + j, c) for j in range(3)] if me == 1 else None, src=1)
    check("scatter from 1", so, torch.full((c,), 100.0 + me))
    dist.barrier()
    try:
        dist.broadcast(full(0.0), src=0)
        bad.append("a broadcast from the inactive rank 0 was not refused")
    except ValueError as e:
        if "rank 0" not in str(e):
            bad.append(f"the refusal does not name rank 0: {e}")
    path = getattr(pg, "_cuda", None)
    key = 'tidewire_coll_calls_total{op="all_reduce",algorithm="nvlink_one_shot"} '
    counted = sum(float(l[len(key):]) for l in tidewire.metrics_text().splitlines() if l.startswith(key))
    return {"bad": bad, "path": None if path is None else path.members, "mask": mask.tolist(),
            "epoch": mpg.get_current_epoch(pg), "one_shot_calls": counted}


def body_cuda_stale_graph(rank: int, size: int, port: int, arg: str) -> Any:
    """Three ranks of a `mooncake` group on the NVLink path; an all_reduce captured in a CUDA
    graph and replayed; rank 2 removed by every rank's `deactivate_ranks`; ranks 0 and 1
    re-form (a new path over them at their next CUDA call), then replay the old graph: it must
    move nothing (its tensor keeps what was written before), count its launch as stale (logged
    as an error at the next call), and the collectives after it — eager, and a graph captured
    anew — give what they must."""
    import logging

    import tidewire.mooncake

    tidewire.mooncake.install()
    from mooncake import pg as mpg  # type: ignore[import-not-found]

    mpg.set_eviction_timeout_us(3_600_000_000)
    mpg.set_agreement_phase_timeout_us(3_600_000_000)
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
    mask = torch.ones(3, dtype=torch.int32)
    dist.init_process_group(
        "mooncake", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
        timeout=timedelta(seconds=20), pg_options=mpg.MooncakeBackendOptions(mask),
    )
    pg = dist.group.WORLD
    bad: List[str] = []

    def check(what: str, got: torch.Tensor, want: float) -> None:
        torch.cuda.synchronize()
        if not torch.equal(got.cpu(), torch.full(got.shape, want)):
            bad.append(f"{what}: got {got.flatten()[:4].tolist()}..., want {want}")

    def captured(t: torch.Tensor) -> "torch.cuda.CUDAGraph":
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
            dist.all_reduce(t)
        torch.cuda.current_stream(dev).wait_stream(s)
        return g

    x = torch.full((1024,), rank + 1.0, device=dev)
    dist.all_reduce(x)  # the path forms
    check("eager all_reduce over three", x, 6.0)
    old = torch.zeros(1024, device=dev)
    g = captured(old)
    old.fill_(rank + 1.0)
    g.replay()
    check("graph all_reduce over three", old, 6.0)
    mpg.deactivate_ranks(pg, [2])
    if rank == 2:
        return {"bad": bad, "removed": True}
    errors: List[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.ERROR:
                errors.append(record.getMessage())

    logging.getLogger("tidewire").addHandler(Keep())
    y = torch.full((1024,), rank + 1.0, device=dev)
    dist.all_reduce(y)  # re-forms over ranks 0 and 1: a new path
    check("eager all_reduce over two", y, 3.0)
    # The graph of the old path: nothing moves (before the gate, its kernel wrote into the old
    # path's freed buffers).
    old.fill_(-7.0)
    g.replay()
    check("the old path's graph replayed", old, -7.0)
    stale = int(pg._stale.numpy()[0])
    z = torch.full((1024,), rank + 1.0, device=dev)
    dist.all_reduce(z)
    check("eager all_reduce after the stale replay", z, 3.0)
    new = torch.zeros(1024, device=dev)
    g2 = captured(new)
    for k in range(3):
        new.fill_(rank + 1.0 + k)
        g2.replay()
        check(f"a graph captured anew, replay {k}", new, 3.0 + 2 * k)
    dist.destroy_process_group()
    return {"bad": bad, "stale": stale, "errors": errors}


def body_cuda_p2p(rank: int, size: int, port: int, arg: str) -> Any:
    """Point-to-point on CUDA tensors over NVLink (2 ranks), every byte checked: both ranks
    sending first (a `batch_isend_irecv` and plain isend / irecv pairs) with messages past what
    leaves without a receiver; blocking send / recv of 0 B to 5 MiB in two dtypes; non-contiguous
    tensors; three messages in a row to one peer (their order kept); a send that waits for a
    kernel still running on its stream; a send / recv pair captured in a CUDA graph and
    replayed; the metrics' count; and last, a receive whose tag differs from the send's: an
    error naming the sender within the timeout."""
    import tidewire
    from rank_main import gpu_of

    torch.cuda.set_device(gpu_of(rank))
    torch.zeros(1, device="cuda")  # CUDA up before the group: it forms its NVLink path at once
    tidewire.metrics_text()  # recording on
    init(rank, size, port, timeout_s=10.0)
    dev = torch.device("cuda", torch.cuda.current_device())
    other = 1 - rank
    pg = dist.distributed_c10d._get_default_group()
    bad: List[str] = []

    def pattern(r: int, n: int, dtype: torch.dtype = torch.float32, salt: int = 0) -> torch.Tensor:
        g = torch.Generator(device=dev).manual_seed(1000 * r + salt + n)
        if dtype.is_floating_point:
            return torch.randn(n, generator=g, device=dev).to(dtype)
        return torch.randint(-(1 << 40), 1 << 40, (n,), generator=g, device=dev, dtype=dtype)

    def check(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        if not torch.equal(got.cpu(), want.cpu()):
            bad.append(f"{what}: bytes differ")

    # Both send first: one batch, 16 MiB each way (past the 2 MiB that leave unreceived).
    n = 4 << 20
    mine, got = pattern(rank, n), torch.full((n,), -1.0, device=dev)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, mine, other), dist.P2POp(dist.irecv, got, other)])
    for r in reqs:
        r.wait()
    check("batch both ways 16 MiB", got, pattern(other, n))
    if getattr(pg, "_cuda", None) is None:
        bad.append("no NVLink path (the messages were staged)")
    # Plain isend then irecv on both ranks (launched together at the first wait).
    mine, got = pattern(rank, n, salt=1), torch.full((n,), -1.0, device=dev)
    a, b = dist.isend(mine, other), dist.irecv(got, other)
    b.wait()
    a.wait()
    check("isend + irecv both ways 16 MiB", got, pattern(other, n, salt=1))
    # Ring attention's order on both ranks, receives queued first: two messages each way of
    # 16 MiB (the i-th of each direction travel in one launch).
    ks = [pattern(rank, n, salt=20 + k) for k in range(2)]
    outs = [torch.full((n,), -1.0, device=dev) for _ in range(2)]
    ops = [dist.P2POp(dist.irecv, o, other) for o in outs] + [dist.P2POp(dist.isend, k_, other) for k_ in ks]
    for r in dist.batch_isend_irecv(ops):
        r.wait()
    for k in range(2):
        check(f"receives first, message {k}", outs[k], pattern(other, n, salt=20 + k))
    # Blocking, ordered: rank 0 sends then receives, rank 1 the other way round.
    for dtype in (torch.bfloat16, torch.int64):
        for count in (0, 1, 1024, 33 * 1024 // 8 + 3, (5 << 20) // 8):
            mine, got = pattern(rank, count, dtype), torch.zeros(count, dtype=dtype, device=dev)
            if rank == 0:
                dist.send(mine, 1)
                dist.recv(got, 1)
            else:
                dist.recv(got, 0)
                dist.send(mine, 0)
            check(f"send/recv {count} {dtype}", got, pattern(other, count, dtype))
    # Non-contiguous on both ends.
    m = pattern(rank, 256 * 512).view(256, 512)
    got = torch.zeros(256, 512, device=dev).t()
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, m.t(), other), dist.P2POp(dist.irecv, got, other)])
    for r in reqs:
        r.wait()
    check("non-contiguous", got, pattern(other, 256 * 512).view(256, 512).t())
    # Three messages in a row to one peer: they arrive in order.
    if rank == 0:
        ws = [dist.isend(pattern(0, 1000, salt=k), 1) for k in range(3)]
    else:
        outs = [torch.zeros(1000, device=dev) for _ in range(3)]
        ws = [dist.irecv(o, 0) for o in outs]
    for w in ws:
        w.wait()
    if rank == 1:
        for k, o in enumerate(outs):
            check(f"message {k} of three", o, pattern(0, 1000, salt=k))
    # The send waits for a kernel still running on its stream.
    buf = torch.zeros(1 << 20, device=dev)
    if rank == 0:
        torch.cuda._sleep(200_000_000)
        buf.fill_(7.0)
        dist.send(buf, 1)
    else:
        dist.recv(buf, 0)
        check("after a running kernel", buf, torch.full((1 << 20,), 7.0))
    # Captured in a CUDA graph, replayed with new data each time.
    src, dst = torch.zeros(1 << 18, device=dev), torch.zeros(1 << 18, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        for r in dist.batch_isend_irecv([dist.P2POp(dist.isend, src, other), dist.P2POp(dist.irecv, dst, other)]):
            r.wait()
    torch.cuda.current_stream().wait_stream(s)
    for k in range(3):
        src.copy_(pattern(rank, 1 << 18, salt=10 + k))
        g.replay()
        torch.cuda.synchronize()
        check(f"graph replay {k}", dst, pattern(other, 1 << 18, salt=10 + k))
    g.reset()
    key = 'tidewire_coll_calls_total{op="send/recv",algorithm="nvlink_p2p"} '
    counted = sum(float(l[len(key):]) for l in tidewire.metrics_text().splitlines() if l.startswith(key))
    # Last: tags that differ. The receiver names the sender within the timeout.
    err, took = None, 0.0
    t0 = time.monotonic()
    try:
        x = torch.ones(4096, device=dev)
        if rank == 0:
            dist.send(x, 1, tag=5)
        else:
            dist.recv(x, 0, tag=6)
        torch.cuda.synchronize()
        dist.barrier()
    except Exception as e:  # noqa: BLE001
        err, took = str(e), time.monotonic() - t0
    return {"bad": bad, "counted": counted, "error": err if rank == 1 else None, "took": took}


def body_cuda(rank: int, size: int, port: int, arg: str) -> Any:
    """CUDA tensors: every collective on the NVLink path (or staged through host memory, with
    arg "staged") against references computed here; the collective waits for a kernel still
    running on the current stream; async work; a CUDA graph captured and replayed (refused
    with the reason when staged)."""
    staged = arg == "staged"
    if staged:
        os.environ["TIDEWIRE_PG_CUDA"] = "0"
    if arg == "two_shot":
        os.environ["TIDEWIRE_PG_CUDA_ALLREDUCE"] = "two_shot"
    from rank_main import gpu_of

    torch.cuda.set_device(gpu_of(rank))
    init(rank, size, port)
    dev = torch.device("cuda", gpu_of(rank))
    pg = dist.distributed_c10d._get_default_group()
    bad: List[str] = []
    if staged == (getattr(pg, "_cuda", None) is not None):
        bad.append(f"path: staged={staged} but the group's CUDA path is {getattr(pg, '_cuda', None)}")
    types = INT_TYPES + FLOAT_TYPES + [torch.bool] if not staged else [torch.float32, torch.bfloat16, torch.int64]
    for dtype in types:
        for op in (["sum", "max"] if staged else list(OPS)):
            if dtype == torch.bool and op == "avg":
                continue
            t = data(rank, dtype).to(dev)
            dist.all_reduce(t, op=OPS[op])
            if not close(t.cpu(), reference(size, dtype, op)):
                bad.append(f"all_reduce {dtype} {op}")
    if not staged:
        # The metrics count each all_reduce once, by its algorithm (two-shot: two kernel steps;
        # the choice for these 4 MiB calls on more than two ranks).
        import tidewire

        algo = "nvlink_two_shot" if arg == "two_shot" or size > 2 else "nvlink_one_shot"
        key = f'tidewire_coll_calls_total{{op="all_reduce",algorithm="{algo}"}} '

        def counted() -> float:
            return sum(float(l[len(key):]) for l in tidewire.metrics_text().splitlines() if l.startswith(key))

        before = counted()
        for _ in range(5):
            dist.all_reduce(data(rank, torch.float32, 1 << 20).to(dev))
        torch.cuda.synchronize(dev)
        if counted() - before != 5:
            bad.append(f"metrics: {counted() - before} all_reduce calls counted by {algo}, 5 made")
    # Sizes around the kernels' chunking (16-byte pieces, rounds through the buffer).
    for n in [1, 3, 4097, 1 << 20, (9 << 20) + 5]:
        t = data(rank, torch.float32, n).to(dev)
        dist.all_reduce(t)
        if not close(t.cpu(), reference(size, torch.float32, "sum", n)):
            bad.append(f"all_reduce of {n} floats")
        x = data(rank, torch.bfloat16, n).to(dev)
        out = torch.empty(size * n, dtype=torch.bfloat16, device=dev)
        dist.all_gather_into_tensor(out, x)
        if not torch.equal(out.cpu(), torch.cat([data(r, torch.bfloat16, n) for r in range(size)])):
            bad.append(f"all_gather_into_tensor of {n}")
    # The collective waits for a kernel still running on the current stream.
    src = data(rank, torch.float32, 1 << 16).to(dev)
    t = torch.zeros(1 << 16, device=dev)
    torch.cuda._sleep(100_000_000)
    t.copy_(src)
    dist.all_reduce(t)
    if not close(t.cpu(), reference(size, torch.float32, "sum", 1 << 16)):
        bad.append("all_reduce after a running kernel")
    # Async on a side stream, delayed by a kernel: the work's wait() makes the main stream
    # wait for it (only that orders the clone below after the collective).
    main, side = torch.cuda.current_stream(dev), torch.cuda.Stream(dev)
    src = data(rank, torch.float64).to(dev)
    t = torch.zeros_like(src)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        t.copy_(src)
        w = dist.all_reduce(t, async_op=True)
    # On the NVLink path neither the call nor its wait() held the host: the side stream still
    # sleeps, and after wait() the main stream waits for it (a host wait would have found both
    # done). The staged path waits for the stream on the host by design.
    if not staged and w.is_completed():
        bad.append("async all_reduce: the call returned after its stream's kernels ended")
    w.wait()
    if not staged and main.query():
        bad.append("async all_reduce: wait() held the host, not the current stream")
    got = t.clone()
    if not close(got.cpu(), reference(size, torch.float64, "sum")):
        bad.append("async all_reduce")
    # Calls on two streams the caller does not order, rank 0's first one held back by a
    # kernel: the second stream waits for the first (the kernels share their counts), so
    # every rank runs them in the order called and both results are right.
    s1, s2 = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    a1, a2 = data(rank, torch.float32, 1 << 16).to(dev), data(rank, torch.int32, 1 << 16).to(dev)
    torch.cuda.synchronize(dev)
    with torch.cuda.stream(s1):
        if rank == 0:
            torch.cuda._sleep(100_000_000)
        w1 = dist.all_reduce(a1, async_op=True)
    with torch.cuda.stream(s2):
        w2 = dist.all_reduce(a2, async_op=True)
    w1.wait()
    w2.wait()
    if not close(a1.cpu(), reference(size, torch.float32, "sum", 1 << 16)):
        bad.append("all_reduce on a first stream")
    if not close(a2.cpu(), reference(size, torch.int32, "sum", 1 << 16)):
        bad.append("all_reduce on a second stream")
    x = data(rank, torch.float32, 400).to(dev)
    out = torch.empty(size * 400, device=dev)
    dist.all_gather_into_tensor(out, x)
    if not torch.equal(out.cpu(), torch.cat([data(r, torch.float32, 400) for r in range(size)])):
        bad.append("all_gather_into_tensor")
    outs = [torch.empty(400, device=dev) for _ in range(size)]
    dist.all_gather(outs, x)
    if not all(torch.equal(o.cpu(), data(r, torch.float32, 400)) for r, o in enumerate(outs)):
        bad.append("all_gather")
    for op in ["sum", "avg", "max"]:
        full = data(rank, torch.float32, size * 100).to(dev)
        rs = torch.empty(100, device=dev)
        dist.reduce_scatter_tensor(rs, full, op=OPS[op])
        if not close(rs.cpu(), reference(size, torch.float32, op, size * 100)[rank * 100 : (rank + 1) * 100]):
            bad.append(f"reduce_scatter_tensor {op}")
    full = data(rank, torch.float32, size * 100).to(dev)
    rs = torch.empty(100, device=dev)
    dist.reduce_scatter(rs, list(full.chunk(size)))
    if not close(rs.cpu(), reference(size, torch.float32, "sum", size * 100)[rank * 100 : (rank + 1) * 100]):
        bad.append("reduce_scatter (list)")
    a = torch.arange(size * 3, dtype=torch.int32, device=dev) + rank * 1000
    b = torch.empty_like(a)
    dist.all_to_all_single(b, a)
    want = torch.cat([torch.arange(rank * 3, rank * 3 + 3, dtype=torch.int32) + s * 1000 for s in range(size)])
    if not torch.equal(b.cpu(), want):
        bad.append("all_to_all_single")
    # Uneven splits: rank s sends (s + d + 1) * 1000 + 7 rows of 3 to rank d.
    rows = lambda s_, d_: (s_ + d_ + 1) * 1000 + 7  # noqa: E731
    send = torch.cat([torch.full((rows(rank, d), 3), rank * 100 + d, dtype=torch.int16) for d in range(size)]).to(dev)
    recv = torch.empty(sum(rows(s_, rank) for s_ in range(size)), 3, dtype=torch.int16, device=dev)
    dist.all_to_all_single(recv, send, [rows(s_, rank) for s_ in range(size)], [rows(rank, d) for d in range(size)])
    want16 = torch.cat([torch.full((rows(s_, rank), 3), s_ * 100 + rank, dtype=torch.int16) for s_ in range(size)])
    if not torch.equal(recv.cpu(), want16):
        bad.append("all_to_all_single uneven")
    lo = [torch.full((5,), rank * 10 + d, dtype=torch.int64, device=dev) for d in range(size)]
    li = [torch.empty(5, dtype=torch.int64, device=dev) for _ in range(size)]
    dist.all_to_all(li, lo)
    if not all(torch.equal(li[s_].cpu(), torch.full((5,), s_ * 10 + rank, dtype=torch.int64)) for s_ in range(size)):
        bad.append("all_to_all")
    for root in range(size):
        c = data(rank, torch.int32).to(dev)
        dist.broadcast(c, src=root)
        if not torch.equal(c.cpu(), data(root, torch.int32)):
            bad.append(f"broadcast from {root}")
        r_ = data(rank, torch.float32).to(dev)
        dist.reduce(r_, dst=root, op=dist.ReduceOp.SUM)
        if rank == root and not close(r_.cpu(), reference(size, torch.float32, "sum")):
            bad.append(f"reduce to {root}")
        g_in = data(rank, torch.float32, 50).to(dev)
        g_out = [torch.empty(50, device=dev) for _ in range(size)] if rank == root else None
        dist.gather(g_in, g_out, dst=root)
        if rank == root and not all(torch.equal(o.cpu(), data(s_, torch.float32, 50)) for s_, o in enumerate(g_out or [])):
            bad.append(f"gather to {root}")
        s_out = torch.empty(50, device=dev)
        s_in = [data(d, torch.float32, 50).to(dev) for d in range(size)] if rank == root else None
        dist.scatter(s_out, s_in, src=root)
        if not torch.equal(s_out.cpu(), data(rank, torch.float32, 50)):
            bad.append(f"scatter from {root}")
    objs: List[Any] = [None] * size
    dist.all_gather_object(objs, {"rank": rank})
    if objs != [{"rank": r} for r in range(size)]:
        bad.append(f"all_gather_object {objs}")
    if size > 1:
        nxt, prv = (rank + 1) % size, (rank - 1) % size
        s_ = data(rank, torch.float32, 1000).to(dev)
        r_ = torch.empty(1000, device=dev)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, s_, nxt), dist.P2POp(dist.irecv, r_, prv)])
        for q in reqs:
            q.wait()
        if not torch.equal(r_.cpu(), data(prv, torch.float32, 1000)):
            bad.append("batch_isend_irecv")
    bad += _cuda_graph(rank, size, dev, staged)
    bad += _cuda_groups(rank, size, port, dev)
    dist.barrier()
    dist.destroy_process_group()
    return bad


def _cuda_groups(rank: int, size: int, port: int, dev: torch.device) -> List[str]:
    """CUDA tensors, as on CPU: the functional collectives (torch calls the group from C++);
    two groups over the same ranks used in turn, and a group of one rank each; then the default
    group destroyed and a new one formed in the same process (left for the caller)."""
    import torch.distributed._functional_collectives as fc

    bad: List[str] = []
    w = dist.group.WORLD
    fa = torch.as_tensor(fc.all_reduce(data(rank, torch.float32).to(dev), "sum", w))
    if not close(fa.cpu(), reference(size, torch.float32, "sum")):
        bad.append("functional all_reduce")
    fg = torch.as_tensor(fc.all_gather_tensor(data(rank, torch.float32, 10).to(dev), 0, w))
    if not torch.equal(fg.cpu(), torch.cat([data(r, torch.float32, 10) for r in range(size)])):
        bad.append("functional all_gather_tensor")
    fr = torch.as_tensor(fc.reduce_scatter_tensor(data(rank, torch.float32, size * 100).to(dev), "sum", 0, w))
    if not close(fr.cpu(), reference(size, torch.float32, "sum", size * 100)[rank * 100 : (rank + 1) * 100]):
        bad.append("functional reduce_scatter_tensor")
    ev = torch.arange(size * 3, dtype=torch.int32, device=dev) + rank * 1000
    fs = torch.as_tensor(fc.all_to_all_single(ev, None, None, w))
    want_ev = torch.cat([torch.arange(rank * 3, rank * 3 + 3, dtype=torch.int32) + s * 1000 for s in range(size)])
    if not torch.equal(fs.cpu(), want_ev):
        bad.append("functional all_to_all_single")
    g1, g2 = dist.new_group(list(range(size))), dist.new_group(list(range(size)))
    singles = [dist.new_group([r]) for r in range(size)]
    for i in range(3):
        a = data(rank + i, torch.float32, 5000).to(dev)
        b = data(rank + i, torch.bfloat16, 5000).to(dev)
        dist.all_reduce(a, group=g1)
        dist.all_reduce(b, group=g2)
        want_a = sum(data(r + i, torch.float32, 5000).double() for r in range(size)).float()
        want_b = sum(data(r + i, torch.bfloat16, 5000).double() for r in range(size)).to(torch.bfloat16)
        if not close(a.cpu(), want_a) or not close(b.cpu(), want_b):
            bad.append(f"two groups over the same ranks, round {i}")
    alone = data(rank, torch.float32, 100).to(dev)
    dist.all_reduce(alone, group=singles[rank])
    if not torch.equal(alone.cpu(), data(rank, torch.float32, 100)):
        bad.append("a group of one rank")
    dist.destroy_process_group()
    init(rank, size, port + 1)
    t = data(rank, torch.float32, 4097).to(dev)
    dist.all_reduce(t)
    if not close(t.cpu(), reference(size, torch.float32, "sum", 4097)):
        bad.append("all_reduce after a new init")
    return bad


def _cuda_graph(rank: int, size: int, dev: torch.device, staged: bool) -> List[str]:
    """all_reduce, all_gather and reduce_scatter captured in a CUDA graph and replayed with new
    inputs (refused with the reason when the group stages CUDA tensors)."""
    bad: List[str] = []
    ar = torch.zeros(1000, device=dev)
    ag_in = torch.zeros(300, device=dev)
    ag_out = torch.empty(size * 300, device=dev)
    rs_in = torch.zeros(size * 200, device=dev)
    rs_out = torch.empty(200, device=dev)
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(s):
            with torch.cuda.graph(g, stream=s):
                dist.all_reduce(ar)
                dist.all_gather_into_tensor(ag_out, ag_in)
                dist.reduce_scatter_tensor(rs_out, rs_in)
    except Exception as e:  # noqa: BLE001 (torch may wrap it)
        if not staged:
            return [f"capture failed: {e!r}"]
        if "NVLink" not in str(e):
            bad.append(f"capture refused without the reason: {e}")
        return bad
    if staged:
        return ["capture was accepted while staging"]
    for i in range(3):
        ar.copy_(data(rank + 10 * i, torch.float32, 1000).to(dev))
        ag_in.copy_(data(rank + 10 * i, torch.float32, 300).to(dev))
        rs_in.copy_(data(rank + 10 * i, torch.float32, size * 200).to(dev))
        g.replay()
        torch.cuda.synchronize(dev)
        want = sum(data(r + 10 * i, torch.float32, 1000).double() for r in range(size))
        if not close(ar.cpu(), want.float()):
            bad.append(f"replay {i}: all_reduce")
        if not torch.equal(ag_out.cpu(), torch.cat([data(r + 10 * i, torch.float32, 300) for r in range(size)])):
            bad.append(f"replay {i}: all_gather")
        full = sum(data(r + 10 * i, torch.float32, size * 200).double() for r in range(size))
        if not close(rs_out.cpu(), full[rank * 200 : (rank + 1) * 200].float()):
            bad.append(f"replay {i}: reduce_scatter")
    return bad


def body_cuda_failure(rank: int, size: int, port: int, arg: str) -> Any:
    """CUDA tensors on the NVLink path: the last rank is SIGKILLed (arg "kill") or SIGSTOPped
    (arg "stop") while the others run collectives; every survivor's operations end, and the
    next one (or the barrier) raises naming the rank, within the group's timeout."""
    timeout = 6.0
    from rank_main import gpu_of

    torch.cuda.set_device(gpu_of(rank))
    init(rank, size, port, timeout_s=timeout)
    dev = torch.device("cuda", gpu_of(rank))
    victim = size - 1
    t = torch.ones(1 << 20, device=dev)
    dist.all_reduce(t)
    torch.cuda.synchronize(dev)
    if rank == victim:
        os.kill(os.getpid(), signal.SIGKILL if arg == "kill" else signal.SIGSTOP)
        return ["the victim outlived its signal"]
    start = time.monotonic()
    err = None
    try:
        for _ in range(100):
            dist.all_reduce(t)
        dist.barrier()
    except Exception as e:  # noqa: BLE001
        err = e
    took = time.monotonic() - start
    out: Dict[str, Any] = {"took": took, "error": repr(err), "ranks": getattr(err, "ranks", None)}
    try:
        dist.all_reduce(t)
        out["later"] = "succeeded"
    except Exception as e:  # noqa: BLE001
        out["later"] = type(e).__name__
    dist.destroy_process_group()
    return out


def body_lifetime(rank: int, size: int, port: int, arg: str) -> Any:
    """Groups created and destroyed 20 times: no mapping, thread or region outlives them."""
    init(rank, size, port)
    eng = tidewire.distributed.engine()

    def mappings() -> int:
        return sum(p.mappings for p in eng.peers())

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    t = torch.ones(8)
    dist.all_reduce(t)
    base_maps, base_threads = mappings(), threads()
    bad = []
    for i in range(20):
        g = dist.new_group(list(range(size)))
        x = torch.ones(1024) * i
        dist.all_reduce(x, group=g)
        if x[0].item() != i * size:
            bad.append(f"round {i}: {x[0].item()}")
        dist.barrier(group=g)
        dist.destroy_process_group(g)
        import gc

        gc.collect()
    dist.barrier()
    if mappings() != base_maps:
        bad.append(f"mappings {base_maps} -> {mappings()}")
    if threads() > base_threads + 2:
        bad.append(f"threads {base_threads} -> {threads()}")
    dist.destroy_process_group()
    return bad


def body_metrics(rank: int, size: int, port: int, arg: str) -> Any:
    """Collectives with the metrics endpoint on: returns what a scrape says of them."""
    import re
    import urllib.request

    import tidewire

    addr = tidewire.serve_metrics("127.0.0.1:0")
    init(rank, size, port)
    for _ in range(5):
        dist.all_reduce(torch.ones(1024, dtype=torch.float32))
    for _ in range(2):
        dist.all_reduce(torch.ones(1 << 18, dtype=torch.float32))  # 1 MiB: staged
    out = torch.empty(size * 256, dtype=torch.float32)
    for _ in range(3):
        dist.all_gather_into_tensor(out, torch.ones(256, dtype=torch.float32))
    dist.barrier()
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    found: Dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'(tidewire_coll_\w+)(\{[^}]*\})? (\S+)$', line)
        if m:
            found[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    found["engine_lines"] = float(sum(1 for l in text.splitlines() if l.startswith("tidewire_threads ")))
    dist.destroy_process_group()
    return found


BODIES: Dict[str, Callable[[int, int, int, str], Any]] = {
    "metrics": body_metrics,
    "lifetime": body_lifetime,
    "cuda": body_cuda,
    "cuda_failure": body_cuda_failure,
    "elastic": body_elastic,
    "joiners": body_joiners,
    "joiner_slots": body_joiner_slots,
    "failure_modes": body_failure_modes,
    "join_cycles": body_join_cycles,
    "sglang_elastic": body_sglang_elastic,
    "cuda_elastic": body_cuda_elastic,
    "cuda_ep_stale": body_cuda_ep_stale,
    "cuda_survivors": body_cuda_survivors,
    "cuda_stale_graph": body_cuda_stale_graph,
    "cuda_p2p": body_cuda_p2p,
    "extension": body_extension,
    "join_cycle_child": body_join_cycle_child,
    "mooncake": body_mooncake,
    "collectives": body_collectives,
    "groups": body_groups,
    "paths": body_paths,
    "failure": body_failure,
}

if __name__ == "__main__":
    from rank_main import main

    main(BODIES)
