"""The ``torch.distributed`` backend ``"tidewire"`` (CPU tensors; CUDA tensors staged through
host memory until the NVLink path exists).

``import tidewire.distributed`` registers it::

    import torch.distributed as dist
    import tidewire.distributed  # noqa: F401

    dist.init_process_group("tidewire", init_method="tcp://127.0.0.1:29500", rank=r, world_size=n)
    dist.all_reduce(t)

Each group bootstraps through the store torch hands it (no other server): every rank
allocates a receive region with this process's engine, publishes the engine's name and the
region's address under its rank, and maps its ring in every other rank's region. Every
operation then runs on the caller's thread with the group's ``timeout`` as its deadline: a
rank that died fails the operation at once (naming it), a rank that stopped fails it at the
timeout, and the group then refuses further work (destroy it and form a new one).

The group is a Python subclass of ``torch.distributed.ProcessGroup``: PyTorch calls its methods
for every collective, point-to-point operation and functional collective. Collectives complete
before they return (``async_op=True`` gets a completed work); ``isend``/``irecv`` return at once
and progress during later operations and ``wait()``.

Point-to-point messages and collectives travel on the same ordered channels between two ranks
(as on one NCCL communicator): a rank must not post an ``isend`` to a peer that runs a
collective before receiving it. ``tag`` is not used.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

from . import _native
from . import Engine

__all__ = ["ProcessGroupTidewire", "engine", "set_host_ip"]

BACKEND = "tidewire"

_DTYPES = {
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint8: "uint8",
    torch.bool: "bool",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float32: "float32",
    torch.float64: "float64",
}

_engine: Optional[Engine] = None
_engine_pid: Optional[int] = None
_engine_lock = threading.Lock()
_host = os.environ.get("TIDEWIRE_HOST", "127.0.0.1")


def set_host_ip(ip: str) -> None:
    """The address this process's engine binds and publishes (before the first group)."""
    global _host
    if _engine is not None:
        raise RuntimeError("set_host_ip must be called before the first group is created")
    _host = ip


def engine() -> Engine:
    """This process's engine, shared by every group (created on first use)."""
    global _engine, _engine_pid
    with _engine_lock:
        if _engine is None or _engine_pid != os.getpid():
            _engine = Engine(host=_host)
            _engine_pid = os.getpid()
        return _engine


def _ring_bytes(size: int) -> int:
    """Bytes per ring: 4 MiB for small groups, less for large ones (a rank holds size − 1)."""
    env = os.environ.get("TIDEWIRE_PG_RING_BYTES")
    if env:
        return int(env)
    return max(256 << 10, min(4 << 20, (256 << 20) // max(size - 1, 1)))


def _op_name(op: Any) -> str:
    names = {
        dist.ReduceOp.SUM: "sum",
        dist.ReduceOp.AVG: "avg",
        dist.ReduceOp.PRODUCT: "product",
        dist.ReduceOp.MIN: "min",
        dist.ReduceOp.MAX: "max",
    }
    for k, v in names.items():
        if op == k:
            return v
    raise ValueError(f"tidewire: unsupported reduction {op}")


def _dtype(t: torch.Tensor) -> str:
    try:
        return _DTYPES[t.dtype]
    except KeyError:
        raise TypeError(f"tidewire: unsupported dtype {t.dtype}") from None


_staging_logged = False


def _to_host(t: torch.Tensor, what: str) -> torch.Tensor:
    """`t` itself (a CPU tensor), or a host copy of a CUDA tensor: CUDA tensors are staged
    through host memory until the NVLink path exists (said once in the log). The copy waits for
    the work queued on the current stream, so the collective sees what it computed."""
    global _staging_logged
    if t.device.type == "cpu":
        return t
    if t.device.type != "cuda":
        raise NotImplementedError(f"tidewire: {what} on a {t.device.type} tensor")
    if torch.cuda.is_current_stream_capturing():
        raise NotImplementedError(
            f"tidewire: {what} on CUDA tensors inside CUDA-graph capture needs the NVLink path, "
            "which is not built yet (CUDA tensors are staged through host memory so far)"
        )
    if not _staging_logged:
        _staging_logged = True
        logging.getLogger("tidewire").warning(
            "tidewire: CUDA tensors are staged through host memory (the NVLink path for collectives "
            "is not built yet): correct, with a host synchronisation per call"
        )
    return t.to("cpu")


class _Flat:
    """A tensor as contiguous host bytes: the tensor itself, or a contiguous (or host) copy
    written back."""

    def __init__(self, t: torch.Tensor, what: str, write_back: bool = True) -> None:
        self.orig = t
        host = _to_host(t, what)
        self.t = host if host.is_contiguous() else host.contiguous()
        self.write_back = write_back and self.t is not t

    @property
    def addr(self) -> int:
        return self.t.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.t.numel() * self.t.element_size()

    def span(self) -> tuple:
        return (self.addr, self.nbytes)

    def done(self) -> None:
        if self.write_back:
            self.orig.copy_(self.t)


def _overlap(a: _Flat, b: _Flat) -> bool:
    """Whether two flattened tensors share bytes (an in-place collective: the input is the
    output's own shard)."""
    return a.addr < b.addr + b.nbytes and b.addr < a.addr + a.nbytes and a.nbytes > 0 and b.nbytes > 0


def _done(result: Any = None) -> dist.Work:
    fut: Future = Future()
    fut.set_result(result)
    return _create_work_from_future(fut)


class _P2PWork(dist.Work):
    """A pending isend/irecv: ``wait()`` drives it to completion within the group's timeout."""

    def __init__(self, pg: "ProcessGroupTidewire", op_id: int, flat: _Flat, what: str) -> None:
        super().__init__()
        self._pg, self._id, self._flat, self._what = pg, op_id, flat, what
        self._finished = False

    def wait(self, timeout: Optional[timedelta] = None) -> bool:
        if not self._finished:
            self._pg._call(self._pg._comm.wait, self._id, self._what)
            self._flat.done()
            self._finished = True
        return True

    def is_completed(self) -> bool:
        if not self._finished and self._pg._comm.test(self._id):
            self._flat.done()
            self._finished = True
        return self._finished

    def is_success(self) -> bool:
        return self._finished

    def get_future(self) -> Future:
        self.wait()
        fut: Future = Future()
        fut.set_result([self._flat.orig])
        return fut


class ProcessGroupTidewire(dist.ProcessGroup):
    """One group of the ``tidewire`` backend (see the module's documentation)."""

    def __init__(self, store: Any, rank: int, size: int, timeout: timedelta, backend: str = BACKEND) -> None:
        super().__init__(rank, size)
        self._rank, self._size = rank, size
        self._timeout = timeout
        self._backend = backend
        #: The active-rank mask of a Mooncake-style group (`tidewire.mooncake.pg`).
        self._active_ranks: Optional[torch.Tensor] = None
        #: Buffers of isend/irecv not finished yet, by operation id.
        self._inflight: Dict[int, _Flat] = {}
        self._group_name = ""
        self._group_desc = ""
        self._failed_ranks: List[int] = []
        eng = engine()
        region = _native.Communicator.allocate_region(eng._native, size, _ring_bytes(size))
        store.set(f"tidewire/{rank}", json.dumps({"name": eng.name, "region": region[0], "cap": region[2], "pid": os.getpid()}))
        keys = [f"tidewire/{r}" for r in range(size)]
        store.wait(keys, timeout)
        peers = []
        for r, key in enumerate(keys):
            info = json.loads(store.get(key))
            if int(info.get("cap", -1)) != region[2]:
                raise ValueError(
                    f"tidewire: rank {r} uses {info.get('cap')}-byte rings and this rank {region[2]}: "
                    "set TIDEWIRE_PG_RING_BYTES alike on every rank"
                )
            # The process id: ranks of one host read each other's buffers directly (one copy)
            # for large collectives where the kernel allows it.
            peers.append((info["name"], int(info["region"]), int(info.get("pid", 0))))
        self._comm = _native.Communicator(eng._native, rank, region, peers, timeout.total_seconds())

    # --- identity -------------------------------------------------------------------------
    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return self._backend

    def setGroupName(self, name: str) -> None:  # noqa: N802
        self._group_name = name

    def getGroupName(self) -> str:  # noqa: N802
        return self._group_name

    def setGroupDesc(self, desc: str) -> None:  # noqa: N802
        self._group_desc = desc

    def getGroupDesc(self) -> str:  # noqa: N802
        return self._group_desc

    @property
    def group_name(self) -> str:
        return self._group_name

    def __repr__(self) -> str:
        return f"ProcessGroupTidewire(rank={self._rank}, size={self._size})"

    # --- helpers --------------------------------------------------------------------------
    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except _native.TidewireError as e:
            self._failed_ranks = sorted(set(self._failed_ranks) | set(getattr(e, "ranks", [])))
            raise

    def failed_ranks(self) -> List[int]:
        """The ranks the last failure named (``get_failed_ranks_hint``)."""
        return list(self._failed_ranks)

    def dead_ranks(self) -> List[int]:
        return self._comm.dead_ranks()

    def shutdown(self) -> None:
        self._comm.close()
        self._inflight.clear()

    def _reduce_name(self, opts: Any) -> str:
        return _op_name(opts.reduceOp)

    # --- collectives ----------------------------------------------------------------------
    def allreduce(self, tensors: List[torch.Tensor], opts: Any = None) -> dist.Work:
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        for t in tensors:
            f = _Flat(t, "all_reduce")
            self._call(self._comm.all_reduce, f.addr, f.nbytes, _dtype(t), op)
            f.done()
        return _done(tensors)

    def allreduce_coalesced(self, tensors: List[torch.Tensor], opts: Any = None) -> dist.Work:
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: List[torch.Tensor], opts: Any) -> dist.Work:
        for t in tensors:
            f = _Flat(t, "broadcast")
            self._call(self._comm.broadcast, f.addr, f.nbytes, opts.rootRank)
            f.done()
        return _done(tensors)

    def _gather_into(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        fo, fi = _Flat(out, "all_gather"), _Flat(inp, "all_gather", write_back=False)
        if _overlap(fo, fi):
            fi = _Flat(fi.t.clone(), "all_gather", write_back=False)
        self._call(self._comm.all_gather, fo.span(), fi.span())
        fo.done()

    def allgather(self, outputs: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts: Any = None) -> dist.Work:
        for outs, inp in zip(outputs, inputs):
            flat = torch.empty((self._size,) + tuple(inp.shape), dtype=inp.dtype)
            self._gather_into(flat, inp)
            for o, part in zip(outs, flat):
                o.copy_(part)
        return _done(outputs)

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> dist.Work:
        self._gather_into(output, input)
        return _done(output)

    def allgather_into_tensor_coalesced(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None) -> dist.Work:
        for o, i in zip(outputs, inputs):
            self._gather_into(o, i)
        return _done(outputs)

    def _scatter_reduce(self, out: torch.Tensor, inp: torch.Tensor, op: str) -> None:
        fo, fi = _Flat(out, "reduce_scatter"), _Flat(inp, "reduce_scatter", write_back=False)
        if _overlap(fo, fi):
            fi = _Flat(fi.t.clone(), "reduce_scatter", write_back=False)
        self._call(self._comm.reduce_scatter, fo.span(), fi.span(), _dtype(out), op)
        fo.done()

    def reduce_scatter(self, outputs: List[torch.Tensor], inputs: List[List[torch.Tensor]], opts: Any = None) -> dist.Work:
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        for out, ins in zip(outputs, inputs):
            self._scatter_reduce(out, torch.stack([i.reshape(out.shape) for i in ins]), op)
        return _done(outputs)

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> dist.Work:
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        self._scatter_reduce(output, input, op)
        return _done(output)

    def reduce_scatter_tensor_coalesced(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None) -> dist.Work:
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        for o, i in zip(outputs, inputs):
            self._scatter_reduce(o, i, op)
        return _done(outputs)

    def alltoall_base(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int],
        input_split_sizes: Sequence[int],
        opts: Any = None,
    ) -> dist.Work:
        fo, fi = _Flat(output, "all_to_all_single"), _Flat(input, "all_to_all_single", write_back=False)
        n = self._size

        def splits(t: torch.Tensor, sizes: Sequence[int]) -> List[int]:
            row = (t.numel() // t.shape[0] if t.dim() > 0 and t.shape[0] else 0) * t.element_size()
            rows = t.shape[0] if t.dim() else 0
            if not sizes:
                if t.dim() == 0 or rows % n:
                    raise ValueError(f"all_to_all_single: {rows} rows do not split evenly over {n} ranks")
                return [rows // n * row] * n
            if len(sizes) != n or any(int(x) < 0 for x in sizes) or sum(int(x) for x in sizes) != rows:
                raise ValueError(f"all_to_all_single: split sizes {list(sizes)} do not cover the {rows} rows over {n} ranks")
            return [int(s) * row for s in sizes]

        if _overlap(fo, fi):
            fi = _Flat(fi.t.clone(), "all_to_all_single", write_back=False)
        self._call(self._comm.all_to_all, fo.addr, splits(output, output_split_sizes), fi.addr, splits(input, input_split_sizes))
        fo.done()
        return _done(output)

    def alltoall(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None) -> dist.Work:
        ins = [_to_host(i, "all_to_all").contiguous().view(torch.uint8).reshape(-1) for i in inputs]
        inp = torch.cat(ins) if ins else torch.empty(0, dtype=torch.uint8)
        out_sizes = [o.numel() * o.element_size() for o in outputs]
        out = torch.empty(sum(out_sizes), dtype=torch.uint8)
        self._call(self._comm.all_to_all, out.data_ptr(), out_sizes, inp.data_ptr(), [x.numel() for x in ins])
        at = 0
        for o, s in zip(outputs, out_sizes):
            o.copy_(out[at : at + s].view(o.dtype).reshape(o.shape))
            at += s
        return _done(outputs)

    def reduce(self, tensors: List[torch.Tensor], opts: Any) -> dist.Work:
        for t in tensors:
            f = _Flat(t, "reduce")
            self._call(self._comm.reduce, f.addr, f.nbytes, _dtype(t), _op_name(opts.reduceOp), opts.rootRank)
            f.done()
        return _done(tensors)

    def gather(self, outputs: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts: Any) -> dist.Work:
        root = opts.rootRank
        for i, inp in enumerate(inputs):
            fi = _Flat(inp, "gather", write_back=False)
            if self._rank == root:
                flat = torch.empty((self._size,) + tuple(inp.shape), dtype=inp.dtype)
                self._call(self._comm.gather, (flat.data_ptr(), flat.numel() * flat.element_size()), fi.span(), root)
                for o, part in zip(outputs[i], flat):
                    o.copy_(part)
            else:
                self._call(self._comm.gather, (0, 0), fi.span(), root)
        return _done(outputs)

    def scatter(self, outputs: List[torch.Tensor], inputs: List[List[torch.Tensor]], opts: Any) -> dist.Work:
        root = opts.rootRank
        for i, out in enumerate(outputs):
            fo = _Flat(out, "scatter")
            if self._rank == root:
                flat = _to_host(torch.stack([x.reshape(out.shape) for x in inputs[i]]), "scatter").contiguous()
                self._call(self._comm.scatter, fo.span(), (flat.data_ptr(), flat.numel() * flat.element_size()), root)
            else:
                self._call(self._comm.scatter, fo.span(), (0, 0), root)
            fo.done()
        return _done(outputs)

    def barrier(self, opts: Any = None) -> dist.Work:
        self._call(self._comm.barrier)
        return _done(None)

    # --- point to point -------------------------------------------------------------------
    def _keep(self, op_id: int, f: _Flat) -> None:
        """Holds a pending operation's buffers until it finished (its Work may be dropped
        first: the communicator still copies into or out of them)."""
        self._inflight = {i: g for i, g in self._inflight.items() if not self._comm.test(i)}
        self._inflight[op_id] = f

    def send(self, tensors: List[torch.Tensor], dst: int, tag: int = 0) -> dist.Work:
        (t,) = tensors
        f = _Flat(t, "send", write_back=False)
        op_id = self._call(self._comm.isend, dst, f.addr, f.nbytes)
        self._keep(op_id, f)
        return _P2PWork(self, op_id, f, f"send to rank {dst}")

    def recv(self, tensors: List[torch.Tensor], src: int, tag: int = 0) -> dist.Work:
        (t,) = tensors
        f = _Flat(t, "recv")
        op_id = self._call(self._comm.irecv, src, f.addr, f.nbytes)
        self._keep(op_id, f)
        return _P2PWork(self, op_id, f, f"recv from rank {src}")

    def recv_anysource(self, tensors: List[torch.Tensor], tag: int = 0) -> dist.Work:
        raise NotImplementedError("tidewire: recv from any source is not supported; name the source rank")


def _create(opts: Any, pg_options: Any = None) -> ProcessGroupTidewire:
    return ProcessGroupTidewire(opts.store, opts.group_rank, opts.group_size, opts.timeout)


def _register() -> None:
    if BACKEND.upper() not in dist.Backend._plugins:  # type: ignore[attr-defined]
        dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu", "cuda"])


_register()
