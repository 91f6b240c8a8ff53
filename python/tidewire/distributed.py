"""The ``torch.distributed`` backend ``"tidewire"``: CPU tensors through shared memory (or tcp
across hosts), CUDA tensors over NVLink between the GPUs of one host (staged through host
memory where no GPU path reaches every rank).

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
for every collective, point-to-point operation and functional collective. CPU collectives
complete before they return (``async_op=True`` gets a completed work); ``isend``/``irecv``
return at once and progress during later operations and ``wait()``.

CUDA collectives on the NVLink path are kernels enqueued on the current stream: the call
returns at once, ``work.wait()`` makes the then-current stream wait (never the host), and
all_reduce, all_gather, reduce_scatter, all_to_all, broadcast, reduce, gather and scatter can
be captured in a CUDA graph. The path starts with the group when CUDA is initialised in the
process (else at the group's first CUDA collective): every rank allocates a GPU buffer, the
ranks exchange them through the store and map each other's, and the kernels are loaded. If
any rank has no GPU path to another, every rank stages CUDA tensors through host memory
(logged once with the reason). A rank that dies or stops makes the kernels of the others end
at the group's timeout (or at once, for a death); the next operation, or ``barrier()``, raises
naming the operation, the rank and why. ``TIDEWIRE_PG_CUDA=0`` stages every CUDA tensor.

Point-to-point messages and collectives travel on the same ordered channels between two ranks
(as on one NCCL communicator): a rank must not post an ``isend`` to a peer that runs a
collective before receiving it. Messages between two ranks pair in the order they were sent;
each carries its ``tag`` and length, and a receive that meets a message of another tag or
length fails at once, naming both (instead of filling its buffer with the wrong bytes).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import time
import weakref
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _create_work_from_future
from torch.futures import Future

from . import _native
from . import Engine
from ._cuda import raw_stream
from ._store import exchange

__all__ = ["ProcessGroupTidewire", "engine", "set_host_ip"]

BACKEND = "tidewire"
_LOG = logging.getLogger("tidewire")
#: How long a group's shutdown waits, in all, for the releases of earlier views' memory (each
#: free in them waits up to the engine's 10 s stall deadline for a mapping process to let go;
#: one that takes longer is left to finish on its thread, and said so).
_RELEASE_BOUND_S = 15.0

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


#: Reductions by their torch code (`int` of a `ReduceOp.RedOpType`), built once: comparing
#: pybind enums one by one cost ≈ 3 µs a call (a quarter of a small all_reduce).
_OP_NAMES: Dict[int, str] = {
    int(dist.ReduceOp.SUM): "sum",
    int(dist.ReduceOp.AVG): "avg",
    int(dist.ReduceOp.PRODUCT): "product",
    int(dist.ReduceOp.MIN): "min",
    int(dist.ReduceOp.MAX): "max",
}


def _op_name(op: Any) -> str:
    """Our name of a torch reduction (a `ReduceOp`, or its `RedOpType`)."""
    try:
        name = _OP_NAMES.get(int(getattr(op, "op", op)))
    except (TypeError, ValueError):
        name = None
    if name is None:
        raise ValueError(f"tidewire: unsupported reduction {op}")
    return name


def _dtype(t: torch.Tensor) -> str:
    try:
        return _DTYPES[t.dtype]
    except KeyError:
        raise TypeError(f"tidewire: unsupported dtype {t.dtype}") from None


_staging_logged = False


def _to_host(t: torch.Tensor, what: str) -> torch.Tensor:
    """`t` itself (a CPU tensor), or a host copy of a CUDA tensor (a group without an NVLink
    path, or a point-to-point operation; said once in the log). The copy waits for the work
    queued on the current stream, so the collective sees what it computed."""
    global _staging_logged
    if t.device.type == "cpu":
        return t
    if t.device.type != "cuda":
        raise NotImplementedError(f"tidewire: {what} on a {t.device.type} tensor")
    if torch.cuda.is_current_stream_capturing():
        raise NotImplementedError(
            f"tidewire: {what} on CUDA tensors inside CUDA-graph capture needs the NVLink path; this "
            "operation stages them through host memory (the log says why: no GPU path between the ranks, "
            "TIDEWIRE_PG_CUDA=0, or a point-to-point operation)"
        )
    if not _staging_logged:
        _staging_logged = True
        logging.getLogger("tidewire").warning(
            "tidewire: CUDA tensors are staged through host memory (no NVLink path for this group or "
            "operation): correct, with a host synchronisation per call"
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


def _overlap_t(whole: torch.Tensor, part: torch.Tensor, index: int) -> bool:
    """Whether `part` shares bytes with `whole` other than as its `index`-th shard (the
    in-place form the kernels handle): such an input is copied first."""
    a, n = whole.data_ptr(), _nbytes(whole)
    b, m = part.data_ptr(), _nbytes(part)
    if not (a < b + m and b < a + n and n > 0 and m > 0):
        return False
    return b != a + index * m


def _overlap(a: _Flat, b: _Flat) -> bool:
    """Whether two flattened tensors share bytes (an in-place collective: the input is the
    output's own shard)."""
    return a.addr < b.addr + b.nbytes and b.addr < a.addr + a.nbytes and a.nbytes > 0 and b.nbytes > 0


def _in_group_ranks(e: BaseException, members: List[int]) -> List[int]:
    """The ranks a communicator's error names (numbered among `members`, the ranks it spans),
    as group ranks, written back into the error's ``ranks`` where it allows; returns them."""
    ranks = [members[r] for r in getattr(e, "ranks", []) if r < len(members)]
    try:
        e.ranks = ranks  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return ranks


def _same_dtype(out: torch.Tensor, inp: torch.Tensor, what: str) -> None:
    """Raises unless `out` and `inp` hold one dtype (bytes of one read as the other's would
    reduce or land as garbage; torch's front end does not check these calls)."""
    if out.dtype != inp.dtype:
        raise ValueError(f"tidewire: {what}: output {out.dtype} and input {inp.dtype}: they must be of one dtype")


def _fill_list(outs: Sequence[torch.Tensor], flat: torch.Tensor, what: str) -> None:
    """Copies each rank's part of `flat` (one per rank, along its first dimension) into the
    caller's list, which must hold one tensor per rank of the part's size and dtype (checked
    after the collective, so every rank stays in step; torch's front end checks neither)."""
    if len(outs) != flat.shape[0]:
        raise ValueError(f"tidewire: {what}: {len(outs)} output tensors for a group of {flat.shape[0]} ranks")
    for r, (o, part) in enumerate(zip(outs, flat)):
        if o.numel() != part.numel() or o.dtype != part.dtype:
            raise ValueError(
                f"tidewire: {what}: output tensor {r} is {tuple(o.shape)} {o.dtype}; rank {r}'s part is "
                f"{tuple(part.shape)} {part.dtype}"
            )
    for o, part in zip(outs, flat):
        o.copy_(part.reshape(o.shape))


def _same_rings(infos: List[Dict[str, Any]], cap: int, members: List[int]) -> None:
    """Raises unless every member (`infos[i]` is group rank `members[i]`'s) uses rings of
    `cap` bytes, as this rank does: each rank places its ring in a peer's region by its own
    size, so rings of another size would overlap other senders' rings there."""
    for r, info in zip(members, infos):
        if int(info.get("cap", -1)) != cap:
            raise ValueError(
                f"tidewire: rank {r} uses {info.get('cap')}-byte rings and this rank {cap}: "
                "set TIDEWIRE_PG_RING_BYTES alike on every rank"
            )


def _raised(fn: Callable[[], Any]) -> Optional[Exception]:
    """What `fn()` raised, or None (for callers that ask for a failure rather than a raise)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


def _done(result: Any = None) -> dist.Work:
    fut: Future = Future()
    fut.set_result(result)
    return _create_work_from_future(fut)


class _P2PWork(dist.Work):
    """A pending isend/irecv: ``wait()`` drives it to completion within the group's timeout."""

    def __init__(self, pg: "ProcessGroupTidewire", op_id: int, flat: _Flat, what: str, any_source: bool = False) -> None:
        super().__init__()
        self._pg, self._id, self._flat, self._what = pg, op_id, flat, what
        #: The communicator that numbers `op_id` (the group's view when it was posted): once
        #: the group re-forms over other members, the id means nothing to the new one.
        self._comm = pg._comm
        pg._p2p_works.add(self)
        self._finished = False
        #: Why it failed (its wait raised it; ``get_local_success`` reads it).
        self._error: Optional[BaseException] = None
        #: A receive from any rank, and the group rank it received from once finished.
        self._any = any_source
        self._source: Optional[int] = None

    def _finish(self) -> None:
        self._flat.done()
        self._finished = True
        if self._any:
            self._source = self._pg._source_of(self._id)

    def _source_rank(self) -> int:
        """The group rank a receive from any rank took its message from (after its wait)."""
        self.wait()
        if self._source is None and self._any:
            raise RuntimeError(
                "tidewire: the sender of this receive from any rank is no longer known: over 1,024 "
                "later receives from any rank of the group ended before it was waited for"
            )
        if self._source is None:
            raise RuntimeError(f"tidewire: {self._what} names no source rank (only a receive from any rank does)")
        return self._source

    source_rank = _source_rank

    def _settle(self, closing: Any) -> None:
        """Ends it well if it ended on `closing` (its communicator, about to be closed when the
        group re-forms), so that a send or receive that completed is not reported dropped."""
        if self._comm is closing and not self._finished and self._error is None and closing.test(self._id):
            self._finish()

    def _own_view(self) -> None:
        """Raises if the group re-formed since the operation was posted: it belonged to the
        old view's communicator and ended with it (its buffer was never filled)."""
        if self._pg._comm is not self._comm:
            raise RuntimeError(
                f"tidewire: {self._what}: the group's membership changed (now epoch {self._pg._comm_epoch}) "
                "before this operation ended; it was dropped with the old membership: post it again"
            )

    def wait(self, timeout: Optional[timedelta] = None) -> bool:
        if self._error is not None:
            raise self._error
        if not self._finished:
            try:
                self._own_view()
                self._pg._call(self._comm.wait, self._id, self._what)
            except Exception as e:  # (an interrupt is not the operation's outcome)
                self._error = e
                raise
            self._finish()
        return True

    def outcome(self) -> Optional[BaseException]:
        """Ends the operation (within the group's timeout) and returns why it failed, or None."""
        return _raised(self.wait)

    def is_completed(self) -> bool:
        """Whether it ended, well or not (`is_success` says which): an operation of a failed
        group (or of an earlier view) has ended, with the failure its `wait` raises."""
        if self._finished or self._error is not None:
            return True
        if self._pg._comm is not self._comm or self._comm.failure() is not None:
            self.outcome()  # its wait records how it ended
            return True
        if self._comm.test(self._id):
            self._finish()
        return self._finished

    def is_success(self) -> bool:
        return self._finished and self._error is None

    def get_future(self) -> Future:
        self.wait()
        fut: Future = Future()
        fut.set_result([self._flat.orig])
        return fut


def _stream_of(triple: Any) -> "torch.cuda.Stream":
    """The stream torch names by `(id, device index, device type)`
    (`torch._C._cuda_getCurrentStream`)."""
    return torch.cuda.Stream(stream_id=triple[0], device_index=triple[1], device_type=triple[2])


def _follow(last: Optional[Any], triple: Any) -> Optional[Any]:
    """Launches that share device counters, moving from the stream `last` to the stream
    `triple` (torch's triples): the new stream waits for the old one's work. Not a stream that
    is capturing a CUDA graph (it may not wait for uncaptured work; the capture's start is
    ordered by the caller, its replays by the replaying stream), which is not remembered
    either: the next launch outside the capture still waits for `last`. Returns the stream to
    remember."""
    new = _stream_of(triple)
    with torch.cuda.stream(new):  # the stream's own GPU, whatever the current device
        capturing = torch.cuda.is_current_stream_capturing()
    if capturing:
        return last
    if last is not None and last != triple:
        new.wait_stream(_stream_of(last))
    return triple


class _CudaWork(dist.Work):
    """A collective enqueued on a stream: ``wait()`` makes the current stream wait for it."""

    def __init__(self, device: int, result: Any, path: Optional["_CudaPath"] = None) -> None:
        super().__init__()
        #: The NVLink path whose kernels run it (asked by `outcome`).
        self._path = path
        # The launching stream as torch names it (id, device, type; a C call): the stream
        # object is built only when needed. (A raw `cudaStream_t` would not do: the default
        # stream's is 0, and a stream object made from 0 is another stream.)
        self._device, self._data, self._result = device, torch._C._cuda_getCurrentStream(device), result

    def _stream(self) -> "torch.cuda.Stream":
        return _stream_of(self._data)

    def wait(self, timeout: Optional[timedelta] = None) -> bool:
        if torch._C._cuda_getCurrentStream(self._device) != self._data:
            torch.cuda.current_stream(self._device).wait_stream(self._stream())
        return True

    def is_completed(self) -> bool:
        return self._stream().query()

    def is_success(self) -> bool:
        return True

    def outcome(self) -> Optional[BaseException]:
        """Waits (on the host) for the kernels of the launching stream so far and returns the
        failure the path's kernels recorded, if any, naming group ranks. The failure is the
        path's, not this operation's alone: a work that ended before a later failure of its
        path reports that failure too, and one whose path was closed (the group re-formed or
        destroyed) reports none."""
        self._stream().synchronize()
        path = self._path
        if path is None or path.comm is None:
            return None
        e = _raised(path.comm.check)
        if e is not None:
            _in_group_ranks(e, path.members)
        return e

    def get_future(self) -> Future:
        fut: Future = Future()
        fut.set_result(self._result)
        return fut


class _CudaP2PWork(_CudaWork):
    """A send or receive queued on a stream: launched (with the others queued beside it) when
    it is waited for, tested, or at the group's next other call; then as `_CudaWork`."""

    def __init__(self, pg: "ProcessGroupTidewire", device: int, result: Any, path: "_CudaPath") -> None:
        super().__init__(device, result, path)
        self._pg = pg
        #: Why it was never launched (its wait raises it).
        self._error: Optional[BaseException] = None

    def _launched(self) -> None:
        self._pg._flush_p2p()
        if self._error is not None:
            raise self._error

    def outcome(self) -> Optional[BaseException]:
        return _raised(self._launched) or super().outcome()

    def wait(self, timeout: Optional[timedelta] = None) -> bool:
        self._launched()
        return super().wait(timeout)

    def is_completed(self) -> bool:
        self._launched()
        return super().is_completed()

    def get_future(self) -> Future:
        self._launched()
        return super().get_future()


class _CudaPath:
    """A group's NVLink path: the GPU buffer of every rank it spans mapped for this rank's GPU,
    and the collectives as kernels on the current stream.

    It spans `members` (group ranks, in its own rank order): every rank of the group at its
    creation, the active ranks of an elastic group after a membership change. Calls name
    segments by group rank (a slot per group rank); the path takes the members' and, in data
    movements, zeroes what an inactive rank's slot of the output would have received."""

    def __init__(
        self, xchg: Callable[[str, Any], List[Any]], rank: int, size: int, timeout: timedelta, device: int,
        members: List[int], slots: int, stale: Optional[torch.Tensor],
    ) -> None:
        self.device = device
        self.comm: Optional[Any] = None
        #: Nonzero while the path is open; zeroed when it closes, so that a launch replayed from
        #: a CUDA graph captured on it moves nothing (and counts itself in `stale`).
        #: (The native path keeps it, and `stale`, for the process.)
        self.gate = torch.ones(1, dtype=torch.int32, device=f"cuda:{device}")
        torch.cuda.current_stream(device).synchronize()
        #: The stream of the last launch: its raw handle (-1: none yet; the default stream's
        #: is 0) and torch's triple for it.
        self._last: Tuple[int, Any] = (-1, None)
        #: This rank and the ranks in the path's numbering; the group ranks it spans.
        self.me, self.n = rank, size
        self.members = list(members)
        #: Whether the group has slots outside the path (calls are translated).
        self.partial = self.members != list(range(slots))
        eng = engine()
        addr, length = _native.CudaCommunicator.allocate(eng._native, device, size)
        # Settings every rank's kernels must share (they cut each pair's bytes the same way).
        tuning = {
            k: os.environ.get(k, "")
            for k in ("TIDEWIRE_PG_CUDA_BLOCKS", "TIDEWIRE_PG_CUDA_CHUNK_KIB", "TIDEWIRE_PG_CUDA_ALLREDUCE")
        }
        #: The all_reduce algorithm forced on every rank alike ("", "one_shot", "two_shot"):
        #: read once, as agreed below (a later change of the environment must not split ranks).
        self.all_reduce_algo = tuning["TIDEWIRE_PG_CUDA_ALLREDUCE"]
        try:
            infos = xchg("tidewire/cuda", {"name": eng.name, "addr": addr, "len": length, "tuning": tuning})
            for r, info in enumerate(infos):
                for k, v in tuning.items():
                    if info.get("tuning", {}).get(k, "") != v:
                        raise ValueError(
                            f"tidewire: rank {members[r]} has {k}={info.get('tuning', {}).get(k)!r} and this rank "
                            f"{v!r}: set it alike on every rank"
                        )
        except BaseException:
            eng._native.free_device(addr)  # no communicator owns it yet
            raise
        peers = [(i["name"], int(i["addr"]), int(i["len"])) for i in infos]
        # The communicator owns the buffer from here (freed with it, or if this fails).
        comm = _native.CudaCommunicator(eng._native, rank, device, peers, timeout.total_seconds(), self.gate, stale)
        # Every rank takes the same path: the NVLink one only if every rank reaches every other.
        # (At most eight, cut short: after a membership change they travel in one datagram.)
        mine = [f"rank {members[rank]} -> rank {members[r]}: {why[:96]}" for r, why in comm.unreached()][:8]
        refusals = [why for theirs in xchg("tidewire/cuda-verdict", mine) for why in theirs]
        if refusals:
            comm.close()
            logging.getLogger("tidewire").warning(
                "tidewire: rank %d: CUDA tensors are staged through host memory (no GPU path between every "
                "pair of ranks: %s)", rank, "; ".join(refusals),
            )
        else:
            self.comm = comm
            logging.getLogger("tidewire").info(
                "tidewire: rank %d: CUDA collectives over NVLink on cuda:%d (paths %s)", rank, device, comm.paths()
            )

    def close(self, background: bool = False) -> Optional[_native.Release]:
        """Frees the path (with `background`, on a thread of its own: see `Communicator.close`)."""
        comm, self.comm = self.comm, None
        if comm is None:
            return None
        # The kernels end by the group's timeout at the latest; the gate closes before the
        # buffers go (a graph replayed later finds it closed).
        try:
            torch.cuda.synchronize(self.device)
            self.gate.zero_()
            torch.cuda.synchronize(self.device)
        except BaseException:
            # The gate may still be open (a sticky CUDA error, most likely): the buffers stay
            # for the process rather than be freed under a graph that may replay into them.
            comm.abandon()
            raise
        return comm.close(background)

    def work(self, result: Any) -> dist.Work:
        return _CudaWork(self.device, result, self)

    def _live(self, op: str) -> Any:
        if self.comm is None:
            raise RuntimeError(f"tidewire: {op} on cuda:{self.device}: the group's CUDA path was closed")
        return self.comm

    def _stream(self) -> int:
        """The current stream (raw handle) for a launch. Launches on two streams would share
        the kernels' per-block counts: a switch makes the new stream wait for the last
        launch's (`_follow`)."""
        raw = raw_stream(self.device)
        if raw != self._last[0]:
            triple = torch._C._cuda_getCurrentStream(self.device)
            if _follow(self._last[1], triple) is triple:
                self._last = (raw, triple)
        return raw

    def _sub(self, segs: List[tuple]) -> List[tuple]:
        """A slot-per-group-rank segment list as the path's ranks see it."""
        return [segs[r] for r in self.members] if self.partial else segs

    # Segment lists have a slot per group rank, or per path rank with `raw`. `algorithm` names
    # the call in the metrics; "" for a later step of a call already counted.
    def exchange(
        self, op: str, send_base: int, send: List[tuple], recv_base: int, recv: List[tuple], algorithm: str = "nvlink_direct",
        raw: bool = False,
    ) -> None:
        comm = self._live(op)
        if self.partial and not raw:
            # What an inactive rank would have sent reads as zeros (as on the staged path).
            gone = set(range(len(recv))) - set(self.members)
            for r in sorted(gone):
                off, n = recv[r]
                if n:
                    _device_bytes(recv_base + off, n, self.device).zero_()
            send, recv = self._sub(send), self._sub(recv)
        comm.exchange(self._stream(), op, send_base, send, recv_base, recv, algorithm)

    def p2p(self, stream: int, sends: List[tuple], recvs: List[tuple]) -> None:
        """One launch of `(group rank, address, bytes, tag)` sends and receives on `stream`."""
        comm = self._live("send/recv")

        def ours(ops: List[tuple], what: str) -> List[tuple]:
            out = []
            for r, addr, n, tag in ops:
                if r not in self.members:
                    raise ValueError(f"tidewire: {what} rank {r}: it is not active in this group")
                out.append((self.members.index(r), addr, n, tag))
            return out

        comm.p2p(stream, ours(sends, "a send to"), ours(recvs, "a receive from"))

    def reduce(
        self, op: str, send_base: int, send: List[tuple], recv_base: int, recv: List[tuple], dtype: str, redop: str,
        algorithm: str = "nvlink_direct", raw: bool = False,
    ) -> None:
        comm = self._live(op)
        if not raw:
            send, recv = self._sub(send), self._sub(recv)
        comm.reduce(self._stream(), op, send_base, send, recv_base, recv, dtype, redop, algorithm)


def _p2p_waves(queue: Sequence[Any]) -> List[List[Any]]:
    """Queued messages (`(send?, peer, ...)`, in the order queued) cut into launches: launch i
    holds the i-th message of every (direction, peer). Each direction keeps its order, and
    whatever order two ranks queued their messages in, our launch i meets the peer's launch i
    (our i-th send to it is its i-th receive from us)."""
    waves: List[List[Any]] = []
    seen: Dict[Tuple[bool, int], int] = {}
    for op in queue:
        i = seen.get((op[0], op[1]), 0)
        seen[(op[0], op[1])] = i + 1
        if i == len(waves):
            waves.append([])
        waves[i].append(op)
    return waves


class _DeviceBytes:
    """`n` bytes of device memory at `ptr`, as `torch.as_tensor` takes them (no copy)."""

    def __init__(self, ptr: int, n: int) -> None:
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (ptr, False), "version": 3, "stream": None}


def _on_path(path: "_CudaPath", *tensors: torch.Tensor) -> "_CudaPath":
    """`path`, once every tensor is a CUDA tensor of its GPU."""
    for t in tensors:
        if t.device.type != "cuda" or t.device.index != path.device:
            raise ValueError(f"tidewire: the group's CUDA path is on cuda:{path.device}; a tensor is on {t.device}")
    return path


def _device_bytes(ptr: int, n: int, device: int) -> torch.Tensor:
    return torch.as_tensor(_DeviceBytes(ptr, n), device=f"cuda:{device}")


def _splits(t: torch.Tensor, sizes: Sequence[int], n: int) -> List[int]:
    """all_to_all_single's split sizes (rows of `t`) as bytes per rank."""
    row = (t.numel() // t.shape[0] if t.dim() > 0 and t.shape[0] else 0) * t.element_size()
    rows = t.shape[0] if t.dim() else 0
    if not sizes:
        if t.dim() == 0 or rows % n:
            raise ValueError(f"all_to_all_single: {rows} rows do not split evenly over {n} ranks")
        return [rows // n * row] * n
    if len(sizes) != n or any(int(x) < 0 for x in sizes) or sum(int(x) for x in sizes) != rows:
        raise ValueError(f"all_to_all_single: split sizes {list(sizes)} do not cover the {rows} rows over {n} ranks")
    return [int(s) * row for s in sizes]


# All-reduce of CUDA tensors on more than two ranks: from this size on, two-shot (each rank
# reduces its part, then the parts are gathered: 2(R-1)/R of the bytes on each link instead of
# one-shot's R-1 times the whole). With two ranks both move the same bytes and one-shot
# synchronises once. `TIDEWIRE_PG_CUDA_ALLREDUCE=one_shot|two_shot` forces either.
_TWO_SHOT_MIN = 512 << 10

#: The largest tag of a CUDA send or receive (it travels with the message's length).
_P2P_MAX_TAG = 0xFFFF


def _parts(nbytes: int, ranks: int, esz: int) -> List[tuple]:
    """`nbytes` cut into `ranks` consecutive parts of whole elements, each a multiple of 16
    bytes but the last (some may be empty)."""
    unit = 16 if 16 % esz == 0 else esz
    each = -(-nbytes // ranks // unit) * unit if nbytes >= ranks * unit else unit
    sizes, left = [], nbytes
    for _ in range(ranks):
        sizes.append(min(each, left))
        left -= sizes[-1]
    return _segments(sizes)


def _segments(sizes: Sequence[int]) -> List[tuple]:
    """Consecutive `(offset, length)` segments of these byte sizes."""
    out, at = [], 0
    for s in sizes:
        out.append((at, int(s)))
        at += int(s)
    return out


def _pack(addr: int, sizes: Sequence[int], keep: Sequence[int]) -> torch.Tensor:
    """The segments `keep` of consecutive host segments of `sizes` bytes at `addr`, packed."""
    segs = _segments(sizes)
    out = torch.empty(sum(segs[j][1] for j in keep), dtype=torch.uint8)
    at = 0
    for j in keep:
        off, n = segs[j]
        ctypes.memmove(out.data_ptr() + at, addr + off, n)
        at += n
    return out


def _unpack(addr: int, sizes: Sequence[int], keep: Sequence[int], packed: torch.Tensor) -> None:
    """The reverse of `_pack`: `packed` back into the segments `keep` at `addr`, the other
    segments zeroed."""
    segs = _segments(sizes)
    ctypes.memset(addr, 0, sum(n for _, n in segs))
    at = 0
    for j in keep:
        off, n = segs[j]
        ctypes.memmove(addr + off, packed.data_ptr() + at, n)
        at += n


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ProcessGroupTidewire(dist.ProcessGroup):
    """One group of the ``tidewire`` backend (see the module's documentation)."""

    def __init__(
        self,
        store: Any,
        rank: int,
        size: int,
        timeout: timedelta,
        backend: str = BACKEND,
        cuda: bool = True,
        joiner: bool = False,
    ) -> None:
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
        #: Whether a call raised a failure of the communicator (or NVLink path) in force.
        self._reported = False
        #: Elastic membership (`tidewire.mooncake.pg` groups): an `_native.ElasticMember`, the
        #: epoch the mask holds, and whether a failure removes the failed ranks.
        self._elastic: Optional[Any] = None
        self._mask_epoch = 0
        self._auto_deactivate = True
        #: The group ranks the communicator spans, in its rank order (every rank until a
        #: membership change removes some), and the epoch it was formed at.
        self._members: List[int] = list(range(size))
        self._comm_epoch = 0
        #: A rank joining an elastic group (`is_extension`): until it is added, its
        #: collectives involve itself alone (a communicator of one).
        self._joining = joiner
        #: Whether a changed view re-forms the group at the next call (else only
        #: `sync_after_failure` does).
        self._auto_sync = True
        #: The deadline of point-to-point waits, when not the group's (`set_p2p_timeout_us`).
        self._p2p_timeout_s: Optional[float] = None
        #: CUDA sends and receives not launched yet: `(send?, group rank, contiguous tensor, tag,
        #: the caller's tensor, its work)`, all on the stream `_p2p_stream` (raw handle, torch's
        #: triple).
        self._p2p_q: List[Tuple[bool, int, torch.Tensor, int, torch.Tensor, "_CudaP2PWork"]] = []
        self._p2p_stream: Optional[Tuple[int, Any]] = None
        #: The stream of the last point-to-point launch (torch's triple).
        self._p2p_last: Optional[Any] = None
        #: Communicators of earlier views being released on threads of their own (`_reform`).
        self._releasing: List[_native.Release] = []
        #: Point-to-point works still referenced (`_reform` settles those of the old view).
        self._p2p_works: "weakref.WeakSet[_P2PWork]" = weakref.WeakSet()
        #: Launches replayed from CUDA graphs that found their path closed (pinned host word,
        #: written by the kernels; made with the first CUDA path), and how many were reported.
        self._stale: Optional[torch.Tensor] = None
        self._stale_words: Any = None  # its numpy view (read at every CUDA call)
        self._stale_seen = 0
        #: Whether CUDA tensors may take an NVLink path (not a host-only group, not turned off).
        self._cuda_capable = cuda and os.environ.get("TIDEWIRE_PG_CUDA", "1") != "0"
        eng = engine()
        if joiner:
            self._members = [rank]
            region = _native.Communicator.allocate_region(eng._native, 1, _ring_bytes(1))
            self._comm = _native.Communicator(eng._native, 0, region, [(eng.name, region[0], os.getpid())], timeout.total_seconds())
            self._store = store
            self._cuda = None
            self._cuda_allowed = False
            return
        region = _native.Communicator.allocate_region(eng._native, size, _ring_bytes(size))
        try:
            infos = exchange(store, rank, size, "tidewire/region", {"name": eng.name, "region": region[0], "cap": region[2], "pid": os.getpid()}, timeout)
            _same_rings(infos, region[2], list(range(size)))
        except BaseException:
            eng._native.free_shared(region[0])  # no communicator owns it yet
            raise
        # The process id: ranks of one host read each other's buffers directly (one copy) for
        # large collectives where the kernel allows it.
        peers = [(i["name"], int(i["region"]), int(i.get("pid", 0))) for i in infos]
        # The communicator owns the region from here (freed with it, or if this fails).
        self._comm = _native.Communicator(eng._native, rank, region, peers, timeout.total_seconds())
        self._store = store
        #: The NVLink path of CUDA tensors: started now when CUDA is initialised in this
        #: process, else at the first CUDA collective (every rank reaches it at the same call).
        self._cuda: Optional[_CudaPath] = None
        #: Whether one may still be started: once tried, not again until the group's membership
        #: changes; a group for CPU tensors only (`mooncake-cpu`) never starts one.
        self._cuda_allowed = self._cuda_capable
        if size > 1 and self._cuda_allowed and torch.cuda.is_available() and torch.cuda.is_initialized():
            self._start_cuda(torch.cuda.current_device())

    # --- identity -------------------------------------------------------------------------
    def size(self) -> int:
        """The group's rank slots: the world size it was created with, grown to the highest
        active rank + 1 when an elastic group is extended."""
        return self._size

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
        if self._elastic is not None:
            self._sync_mask()
        try:
            return fn(*args)
        except _native.TidewireError as e:
            # The communicator numbers the active ranks only: the group's numbers for the hint.
            self._failed(_in_group_ranks(e, self._members))
            try:
                if self._view_failed(wait=False):
                    self._reported = True
            except _native.TidewireError:
                pass  # the group was destroyed meanwhile: the caller gets the first error
            raise

    #: Communicator calls whose arguments name a rank: the argument's position.
    _RANKED = {"broadcast": 2, "reduce": 4, "gather": 2, "scatter": 2, "isend": 0, "irecv": 0}
    def _c(self, name: str, *args: Any) -> Any:
        """Communicator call `name`, on the rings of the view in force (re-formed first if the
        membership changed), with ranks translated to the communicator's; buffers with a slot
        per group rank are packed to the active ranks' slots (and the inactive ranks' slots of
        an output zeroed)."""
        self._enter()
        self._flush_p2p()
        if len(self._members) == self._size:
            return self._call(getattr(self._comm, name), *args)
        at = self._RANKED.get(name)
        if at is not None:
            r = self._active_root(args[at], name)
            args = args[:at] + (self._members.index(r),) + args[at + 1 :]
        fn = getattr(self._comm, name)
        m = self._members
        if name == "all_to_all":
            out, out_sizes, inp, in_sizes = args
            if len(out_sizes) != self._size or len(in_sizes) != self._size:
                raise ValueError(
                    f"tidewire: all_to_all: {len(in_sizes)} input and {len(out_sizes)} output splits for a group of "
                    f"{self._size} ranks (its size when the call re-formed it)"
                )
            sub_in = _pack(inp, in_sizes, m)
            sub_out = torch.empty(sum(out_sizes[j] for j in m), dtype=torch.uint8)
            self._call(fn, sub_out.data_ptr(), [out_sizes[j] for j in m], sub_in.data_ptr(), [in_sizes[j] for j in m])
            _unpack(out, out_sizes, m, sub_out)
            return None
        if name == "reduce_scatter":
            out_span, (addr, n) = args[0], args[1]
            self._slots_fit(name, n, out_span[1])
            sub = _pack(addr, [n // self._size] * self._size, m)
            return self._call(fn, out_span, (sub.data_ptr(), sub.numel()), *args[2:])
        if name == "scatter" and args[1][1]:
            self._slots_fit(name, args[1][1], args[0][1])
            sub = _pack(args[1][0], [args[1][1] // self._size] * self._size, m)
            return self._call(fn, args[0], (sub.data_ptr(), sub.numel()), args[2])
        if name == "all_gather" or (name == "gather" and args[0][1]):
            (addr, n), c = args[0], args[1][1]
            self._slots_fit(name, n, c)
            sub = torch.empty(len(m) * c, dtype=torch.uint8)
            self._call(fn, (sub.data_ptr(), sub.numel()), *args[1:])
            _unpack(addr, [c] * self._size, m, sub)
            return None
        return self._call(fn, *args)

    def _slots_fit(self, name: str, whole: int, part: int) -> None:
        """Raises unless a buffer of `whole` bytes holds exactly a slot of `part` bytes per
        group rank. (Checked here for calls over part of the group, where the buffers are
        packed and unpacked by hand; the group may have grown at this very call, after the
        caller sized its buffers.)"""
        if whole != self._size * part:
            raise ValueError(
                f"tidewire: {name}: a buffer of {whole} bytes for {self._size} slots of {part} bytes (the group's "
                f"size now: it has {self._size} rank slots since epoch {self._comm_epoch}; size buffers by "
                "get_world_size() after the membership changed)"
            )

    def _enter(self) -> None:
        """Re-forms the communicator over the members of the view in force when it changed: every
        member does so at its next call into the group, exchanging its new rings' address
        through the membership (the store may have died with its rank)."""
        if self._elastic is None or self._joining:
            return
        if self._elastic.epoch() == self._comm_epoch:
            if not (self._failed_ranks and self._auto_deactivate and self._auto_sync and self._view_failed(wait=False)):
                return
            # A call after a failure whose ranks the membership is removing: it waits for the
            # new view (within the group's timeout) instead of failing a second time on the
            # old one, so that every survivor fails one call per failure.
            self._elastic.wait_view(self._comm_epoch, self._timeout.total_seconds())
            if self._elastic.epoch() == self._comm_epoch:
                return  # not removed in time: the call fails on the old view, saying why
        # Queued sends and receives belong to the path of the old view, whose failures would
        # never be read again: they fail instead of being launched.
        if self._p2p_q:
            self._fail_p2p(RuntimeError(f"tidewire: rank {self._rank}: the group's membership changed with sends and receives queued"))
        epoch, members, fenced = self._elastic.view()
        if fenced:
            raise RuntimeError(
                f"tidewire: rank {self._rank} was removed from the group (epoch {epoch}, active {members}); "
                "it takes part in nothing more"
            )
        if epoch == self._comm_epoch:
            return
        if not self._auto_sync:
            raise RuntimeError(
                f"tidewire: rank {self._rank}: the group's view changed (epoch {epoch}, active {members}) and "
                "it re-forms only when told: call mooncake.pg.sync_after_failure(pg) first"
            )
        self._refuse_in_capture(f"the group's view changed (epoch {epoch}, active {members}) and it re-forms at its next call")
        old = list(self._members)
        removed = sorted(set(old) - set(members))
        if self._reform(epoch, members) and len(old) > 1:
            # An operation of the old view failed (on another member: the victim may have sent
            # this rank all it owed first; or a kernel of ours whose failure no call reported
            # yet), and this rank told its caller nothing: every survivor fails one call for a
            # failure, so that the calls after it pair up again. This one did not run.
            self._failed_ranks = removed
            names = " and ".join(f"rank {r}" for r in removed)
            who = f"{names} failed and left the group" if removed else "a rank failed"
            e = _native.PeerFailed(
                f"tidewire: rank {self._rank}: this operation did not run: {who} (epoch {epoch}, active "
                f"{members}) during an earlier operation that failed on some ranks; every survivor fails one "
                "call for a failure (here, this one) and the group goes on over the active ranks"
            )
            e.ranks = removed  # type: ignore[attr-defined]
            raise e

    def _reform(self, epoch: int, members: List[int]) -> bool:
        """Forms the communicator over `members` at `epoch` (every member does the same).
        Returns whether an operation of the old view failed (here or on another member) while
        no call of this rank reported a failure of it."""
        eng = engine()
        n, me = len(members), members.index(self._rank)
        failed = self._view_failed(wait=True)
        region = _native.Communicator.allocate_region(eng._native, n, _ring_bytes(n))
        try:
            info = {"name": eng.name, "region": region[0], "cap": region[2], "pid": os.getpid(), "failed": failed}
            # Made for `epoch`'s members: refused if the view moved on meanwhile (its members
            # would take a ring sized for others, in a region freed when this fails).
            self._elastic.announce("region", json.dumps(info), epoch)
            infos = [json.loads(v) for v in self._elastic.collect("region", epoch, members, self._timeout.total_seconds())]
            # (A replacement may have been started with other settings than the survivors.)
            _same_rings(infos, region[2], members)
        except BaseException as e:
            self._elastic.withdraw("region")  # nobody else takes a region about to be freed
            eng._native.free_shared(region[0])  # no communicator owns it yet
            if isinstance(e, _native.TidewireError):
                self._failed(getattr(e, "ranks", []))
            raise
        peers = [(i["name"], int(i["region"]), int(i.get("pid", 0))) for i in infos]
        old = self._comm
        # The old view's point-to-point operations that ended (an eager send, a receive whose
        # bytes came) end well; the others end with the view (their wait says so).
        for w in list(self._p2p_works):
            w._settle(old)
        self._comm = _native.Communicator(eng._native, me, region, peers, self._timeout.total_seconds())
        # Released on threads of their own: freeing waits for every process that mapped the
        # old memory to let go, and a stopped member never does before the engine's stall
        # deadline (the survivors' next call would wait for it). Joined at shutdown.
        self._releasing = [r for r in self._releasing if not r.wait(0.0)]
        self._release_later(old.close(background=True))
        if self._p2p_timeout_s is not None:
            self._comm.set_p2p_timeout(self._p2p_timeout_s)
        if self._cuda is not None:
            # The path spans the members of the old view: dropped whole (nothing a failed
            # collective left in its buffers is read again).
            self._release_later(self._cuda.close(background=True))
            self._cuda = None
        # A new one over the new members at the next CUDA call (every member makes the same
        # calls, so every member forms it at the same one).
        self._cuda_allowed = self._cuda_capable and torch.cuda.is_available()
        self._members, self._comm_epoch = list(members), epoch
        # Failures of the communicator just dropped are behind us (a rank that failed may be
        # back in this view).
        self._failed_ranks = []
        # A group extended past its first size grows (Mooncake: the highest active rank + 1).
        self._size = max(self._size, max(members) + 1)
        logging.getLogger("tidewire").warning(
            "tidewire: rank %d: the group continues over ranks %s (epoch %d)", self._rank, members, epoch
        )
        unreported = not self._reported
        self._reported = False
        return unreported and (failed or any(bool(i.get("failed")) for i in infos))

    def _release_later(self, release: Optional[_native.Release]) -> None:
        """Remembers a release running on its own thread (waited for at shutdown)."""
        if release is not None:
            self._releasing.append(release)

    def _refuse_in_capture(self, what: str) -> None:
        """Raises when the current stream captures a CUDA graph: `what` (making or dropping
        GPU buffers, waiting for kernels) may not be captured."""
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"tidewire: rank {self._rank}: {what}, which may not be inside CUDA-graph capture: make one "
                "call before capturing"
            )

    def _view_failed(self, wait: bool) -> bool:
        """Whether an operation of the communicator (or the NVLink path) in force failed; with
        `wait`, after the path's kernels ended (by the group's timeout at the latest)."""
        if self._comm.failure() is not None:
            return True
        if self._cuda is not None and self._cuda.comm is not None:
            if wait:
                torch.cuda.synchronize(self._cuda.device)
            try:
                self._cuda.comm.check()
            except _native.TidewireError:
                return True
        return False

    def _sync_mask(self) -> None:
        """Writes the view in force into the caller's mask tensor, in place, when it changed
        (a joiner not added yet: itself alone)."""
        if self._elastic is None or self._active_ranks is None or self._elastic.epoch() == self._mask_epoch:
            return
        epoch, members, fenced = self._elastic.view()
        if self._joining:
            members = [self._rank]
        if fenced:
            # (A fenced rank's epoch reads as changed for good: the mask of its last view is
            # not rebuilt at every call.)
            epoch = self._elastic.epoch()
        mask = torch.zeros(self._active_ranks.numel(), dtype=torch.int32)
        for r in members:
            if r < mask.numel():
                mask[r] = 1
        self._active_ranks.copy_(mask)
        self._mask_epoch = epoch

    def _failed(self, ranks: Sequence[int]) -> None:
        """A failure naming `ranks`: remembered (``get_failed_ranks_hint``), and given to the
        group's elastic membership, if it has one, as evidence against them."""
        self._failed_ranks = sorted(set(self._failed_ranks) | set(ranks))
        if self._elastic is not None and self._auto_deactivate:
            self._elastic.suspect(sorted(set(ranks) | set(self.dead_ranks())))

    def failed_ranks(self) -> List[int]:
        """The ranks the last failure named (``get_failed_ranks_hint``)."""
        return list(self._failed_ranks)

    def dead_ranks(self) -> List[int]:
        return [self._members[r] for r in self._comm.dead_ranks() if r < len(self._members)]

    def shutdown(self) -> None:
        try:
            self._check_stale()
            try:
                self._flush_p2p()
            except Exception as e:  # noqa: BLE001 (the group is going away; say why once)
                _LOG.warning("tidewire: rank %d: sends and receives queued at shutdown failed: %s", self._rank, e)
            if self._elastic is not None:
                self._elastic.close()
            if self._cuda is not None:
                self._cuda.close()
            self._comm.close()
            self._inflight.clear()
        finally:
            # The releases of earlier views' memory (each waits for the processes that mapped
            # it to let go, then frees it or leaves it) are waited for, within one bound.
            end = time.monotonic() + _RELEASE_BOUND_S
            for r in self._releasing:
                if not r.wait(max(0.0, end - time.monotonic())):
                    _LOG.warning("tidewire: rank %d: %r did not end within %.0f s: left to finish", self._rank, r, _RELEASE_BOUND_S)
            self._releasing = []

    def _start_cuda(self, device: int) -> None:
        """Forms the NVLink path over the ranks the communicator spans: through the store at
        the group's creation, through the membership after a change (the store may have died
        with its rank)."""
        # (Tried again at the next call.)
        self._refuse_in_capture("the group's CUDA path forms at its first CUDA collective after the group formed or re-formed")
        self._cuda_allowed = False
        members, epoch = list(self._members), self._comm_epoch
        if self._elastic is None or epoch == 0:
            def xchg(key: str, payload: Any) -> List[Any]:
                return exchange(self._store, self._rank, self._size, key, payload, self._timeout)
        else:
            def xchg(key: str, payload: Any) -> List[Any]:
                self._elastic.announce(key, json.dumps(payload), epoch)
                try:
                    return [json.loads(v) for v in self._elastic.collect(key, epoch, members, self._timeout.total_seconds())]
                except BaseException:
                    self._elastic.withdraw(key)  # its buffers go with the failed path
                    raise
        try:
            if self._stale_words is None:
                self._stale = torch.zeros(1, dtype=torch.int32, pin_memory=True)
                self._stale_words = self._stale.numpy()
            path = _CudaPath(
                xchg, members.index(self._rank), len(members), self._timeout, device, members, self._size, self._stale
            )
        except _native.TidewireError as e:
            self._failed(getattr(e, "ranks", []))
            raise
        self._cuda = path if path.comm is not None else None

    def _active_root(self, root: int, name: str) -> int:
        if root not in self._members:
            raise ValueError(f"tidewire: {name}: rank {root} is not active in this group (epoch {self._comm_epoch})")
        return root

    def _nv(self, *tensors: torch.Tensor, message: bool = False) -> Optional[_CudaPath]:
        """The NVLink path if these tensors take it (CUDA tensors of the path's GPU). For a
        collective, queued sends and receives are launched first and the path is formed if it
        may be; a `message` (a send or receive) is queued, and never forms it (forming it is
        collective: every rank of the group would have to be here)."""
        if not tensors or tensors[0].device.type != "cuda" or self._size == 1:
            return None
        self._enter()
        self._check_stale()
        if not message:
            self._flush_p2p()
        if len(self._members) == 1:
            return None  # alone in the view: a communicator of one
        if self._cuda_allowed and not message:
            self._start_cuda(tensors[0].device.index)
        path = self._cuda
        if path is None:
            return None
        return _on_path(path, *tensors)

    def _check_stale(self) -> None:
        """Logs an error when launches replayed from CUDA graphs found their path closed since
        the last check (they moved nothing). Not raised: the replays land on each rank at its
        own time, and a call that failed on some ranks only would leave the others waiting."""
        if self._stale_words is None:
            return
        n = int(self._stale_words[0])
        if n != self._stale_seen:
            missed, self._stale_seen = n - self._stale_seen, n
            _LOG.error(
                "tidewire: rank %d: %d collective launch(es) replayed from a CUDA graph captured on this group's "
                "CUDA path before it closed (the group re-formed over other members, now epoch %d) moved nothing: "
                "capture graphs again after a membership change", self._rank, missed, self._comm_epoch,
            )

    # --- collectives ----------------------------------------------------------------------
    def allreduce(self, tensors: List[torch.Tensor], opts: Any = None) -> dist.Work:
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        nv = self._nv(*tensors)
        if nv is not None:
            for t in tensors:
                d, n = t.contiguous(), _nbytes(t)
                if n:
                    self._all_reduce_nv(nv, d, n, op)
                if d is not t:
                    t.copy_(d)
            return nv.work(tensors)
        for t in tensors:
            f = _Flat(t, "all_reduce")
            self._c("all_reduce", f.addr, f.nbytes, _dtype(t), op)
            f.done()
        return _done(tensors)

    def _all_reduce_nv(self, nv: _CudaPath, d: torch.Tensor, n: int, op: str) -> None:
        """All-reduce of `n` bytes of the contiguous CUDA tensor `d` in place, one- or two-shot."""
        algo, ranks, me = nv.all_reduce_algo, nv.n, nv.me
        two = algo == "two_shot" or (algo != "one_shot" and ranks > 2 and n >= _TWO_SHOT_MIN)
        if _LOG.isEnabledFor(logging.DEBUG):
            _LOG.debug("all_reduce of %d bytes on %d ranks: %s", n, ranks, "two-shot" if two else "one-shot")
        # Segment lists in the path's numbering (every rank it spans takes part).
        if not two:
            whole = [(0, n)] * ranks
            self._call(nv.reduce, "all_reduce", d.data_ptr(), whole, d.data_ptr(), whole, _dtype(d), op, "nvlink_one_shot", True)
            return
        parts = _parts(n, ranks, d.element_size())
        mine = parts[me]
        # Our part reduced in place (every rank sends each part to its owner), then every
        # part gathered into every rank's tensor.
        got = [mine if r == me else (0, mine[1]) for r in range(ranks)]
        self._call(nv.reduce, "all_reduce", d.data_ptr(), parts, d.data_ptr(), got, _dtype(d), op, "nvlink_two_shot", True)
        self._call(nv.exchange, "all_reduce", d.data_ptr(), [mine] * ranks, d.data_ptr(), parts, "", True)

    def allreduce_coalesced(self, tensors: List[torch.Tensor], opts: Any = None) -> dist.Work:
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: List[torch.Tensor], opts: Any) -> dist.Work:
        nv = self._nv(*tensors)
        if nv is not None:
            root = self._active_root(opts.rootRank, "broadcast")
            for t in tensors:
                d, n = t.contiguous(), _nbytes(t)
                me = self._rank == root
                # The root sends to every rank (its own segment is in place); the others
                # receive from the root.
                send = [(0, n if me else 0)] * self._size
                recv = [(0, n if r == root else 0) for r in range(self._size)]
                self._call(nv.exchange, "broadcast", d.data_ptr(), send, d.data_ptr(), recv)
                if d is not t:
                    t.copy_(d)
            return nv.work(tensors)
        for t in tensors:
            f = _Flat(t, "broadcast")
            self._c("broadcast", f.addr, f.nbytes, opts.rootRank)
            f.done()
        return _done(tensors)

    def _shards(self, whole: torch.Tensor, part: torch.Tensor, what: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """A tensor of one shard per rank and one shard, contiguous, checked against each other;
        and the shard's bytes."""
        w, p = whole.contiguous(), part.contiguous()
        c = _nbytes(p)
        if _nbytes(w) != c * self._size:  # (one dtype: `_same_dtype`, checked by the callers)
            raise ValueError(f"{what}: {_nbytes(w)} bytes for {self._size} shards of {c}")
        return w, p, c

    def _gather_into(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        _same_dtype(out, inp, "all_gather")
        nv = self._nv(out, inp)
        if nv is not None:
            o, i, c = self._shards(out, inp, "all_gather")
            if _overlap_t(o, i, self._rank):
                i = i.clone()
            self._call(nv.exchange, "all_gather", i.data_ptr(), [(0, c)] * self._size, o.data_ptr(), _segments([c] * self._size))
            if o is not out:
                out.copy_(o)
            return
        fo, fi = _Flat(out, "all_gather"), _Flat(inp, "all_gather", write_back=False)
        if _overlap(fo, fi):
            fi = _Flat(fi.t.clone(), "all_gather", write_back=False)
        self._c("all_gather", fo.span(), fi.span())
        fo.done()

    def allgather(self, outputs: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts: Any = None) -> dist.Work:
        nv = self._nv(*inputs)
        for outs, inp in zip(outputs, inputs):
            flat = torch.empty((self._size,) + tuple(inp.shape), dtype=inp.dtype, device=inp.device if nv else "cpu")
            self._gather_into(flat, inp)
            _fill_list(outs, flat, "all_gather")
        return self._work(outputs, *inputs)

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> dist.Work:
        self._gather_into(output, input)
        return self._work(output, output)

    def allgather_into_tensor_coalesced(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None) -> dist.Work:
        for o, i in zip(outputs, inputs):
            self._gather_into(o, i)
        return self._work(outputs, *outputs)

    def _work(self, result: Any, *tensors: torch.Tensor) -> dist.Work:
        """The work of a finished call: a stream-ordered one for tensors of the NVLink path."""
        if tensors and tensors[0].device.type == "cuda" and self._cuda is not None:
            return self._cuda.work(result)
        return _done(result)

    def _scatter_reduce(self, out: torch.Tensor, inp: torch.Tensor, op: str) -> None:
        _same_dtype(out, inp, "reduce_scatter")
        nv = self._nv(out, inp)
        if nv is not None:
            i, o, c = self._shards(inp, out, "reduce_scatter")
            if _overlap_t(i, o, self._rank):
                i = i.clone()
            self._call(nv.reduce, "reduce_scatter", i.data_ptr(), _segments([c] * self._size), o.data_ptr(), [(0, c)] * self._size, _dtype(out), op)
            if o is not out:
                out.copy_(o)
            return
        fo, fi = _Flat(out, "reduce_scatter"), _Flat(inp, "reduce_scatter", write_back=False)
        if _overlap(fo, fi):
            fi = _Flat(fi.t.clone(), "reduce_scatter", write_back=False)
        self._c("reduce_scatter", fo.span(), fi.span(), _dtype(out), op)
        fo.done()

    def reduce_scatter(self, outputs: List[torch.Tensor], inputs: List[List[torch.Tensor]], opts: Any = None) -> dist.Work:
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        for out, ins in zip(outputs, inputs):
            self._scatter_reduce(out, torch.stack([i.reshape(out.shape) for i in ins]), op)
        return self._work(outputs, *outputs)

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> dist.Work:
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        self._scatter_reduce(output, input, op)
        return self._work(output, output)

    def reduce_scatter_tensor_coalesced(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None) -> dist.Work:
        op = _op_name(opts.reduceOp) if opts is not None else "sum"
        for o, i in zip(outputs, inputs):
            self._scatter_reduce(o, i, op)
        return self._work(outputs, *outputs)

    def alltoall_base(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int],
        input_split_sizes: Sequence[int],
        opts: Any = None,
    ) -> dist.Work:
        n = self._size
        out_splits = _splits(output, output_split_sizes, n)
        in_splits = _splits(input, input_split_sizes, n)
        nv = self._nv(output, input)
        if nv is not None:
            o, i = output.contiguous(), input.contiguous()
            if _overlap_t(o, i, -1):
                i = i.clone()
            self._call(nv.exchange, "all_to_all", i.data_ptr(), _segments(in_splits), o.data_ptr(), _segments(out_splits))
            if o is not output:
                output.copy_(o)
            return nv.work(output)
        fo, fi = _Flat(output, "all_to_all_single"), _Flat(input, "all_to_all_single", write_back=False)
        if _overlap(fo, fi):
            fi = _Flat(fi.t.clone(), "all_to_all_single", write_back=False)
        self._c("all_to_all", fo.addr, out_splits, fi.addr, in_splits)
        fo.done()
        return _done(output)

    def alltoall(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None) -> dist.Work:
        nv = self._nv(*inputs, *outputs)
        dev = inputs[0].device if nv is not None and inputs else "cpu"
        host = (lambda t: t) if nv is not None else (lambda t: _to_host(t, "all_to_all"))
        ins = [host(i).contiguous().view(torch.uint8).reshape(-1) for i in inputs]
        inp = torch.cat(ins) if ins else torch.empty(0, dtype=torch.uint8, device=dev)
        out_sizes = [o.numel() * o.element_size() for o in outputs]
        out = torch.empty(sum(out_sizes), dtype=torch.uint8, device=dev)
        if nv is not None:
            self._call(nv.exchange, "all_to_all", inp.data_ptr(), _segments([x.numel() for x in ins]), out.data_ptr(), _segments(out_sizes))
        else:
            self._c("all_to_all", out.data_ptr(), out_sizes, inp.data_ptr(), [x.numel() for x in ins])
        at = 0
        for o, s in zip(outputs, out_sizes):
            o.copy_(out[at : at + s].view(o.dtype).reshape(o.shape))
            at += s
        return self._work(outputs, *inputs)

    def reduce(self, tensors: List[torch.Tensor], opts: Any) -> dist.Work:
        nv = self._nv(*tensors)
        if nv is not None:
            root, me = self._active_root(opts.rootRank, "reduce"), self._rank
            for t in tensors:
                d, n = t.contiguous(), _nbytes(t)
                if me == root:
                    send = [(0, n if r == me else 0) for r in range(self._size)]
                    recv = [(0, n)] * self._size
                else:
                    send = [(0, n if r == root else 0) for r in range(self._size)]
                    recv = [(0, 0)] * self._size
                self._call(nv.reduce, "reduce", d.data_ptr(), send, d.data_ptr(), recv, _dtype(t), _op_name(opts.reduceOp))
                if d is not t and me == root:
                    t.copy_(d)
            return nv.work(tensors)
        for t in tensors:
            f = _Flat(t, "reduce")
            self._c("reduce", f.addr, f.nbytes, _dtype(t), _op_name(opts.reduceOp), opts.rootRank)
            f.done()
        return _done(tensors)

    def gather(self, outputs: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts: Any) -> dist.Work:
        root = opts.rootRank
        nv = self._nv(*inputs)
        if nv is not None:
            self._active_root(root, "gather")
            for i, inp in enumerate(inputs):
                d, c = inp.contiguous(), _nbytes(inp)
                me = self._rank == root
                send = [(0, c if r == root else 0) for r in range(self._size)]
                if me:
                    flat = torch.empty((self._size,) + tuple(inp.shape), dtype=inp.dtype, device=inp.device)
                    recv = [(r * c, c) for r in range(self._size)]
                    self._call(nv.exchange, "gather", d.data_ptr(), send, flat.data_ptr(), recv)
                    _fill_list(outputs[i], flat, "gather")
                else:
                    recv = [(0, 0)] * self._size
                    self._call(nv.exchange, "gather", d.data_ptr(), send, 0, recv)
            return nv.work(outputs)
        for i, inp in enumerate(inputs):
            fi = _Flat(inp, "gather", write_back=False)
            if self._rank == root:
                flat = torch.empty((self._size,) + tuple(inp.shape), dtype=inp.dtype)
                self._c("gather", (flat.data_ptr(), flat.numel() * flat.element_size()), fi.span(), root)
                _fill_list(outputs[i], flat, "gather")
            else:
                self._c("gather", (0, 0), fi.span(), root)
        return _done(outputs)

    def scatter(self, outputs: List[torch.Tensor], inputs: List[List[torch.Tensor]], opts: Any) -> dist.Work:
        root = opts.rootRank
        nv = self._nv(*outputs)
        if nv is not None:
            self._active_root(root, "scatter")
            for i, out in enumerate(outputs):
                d, c = out.contiguous(), _nbytes(out)
                me = self._rank == root
                recv = [(0, c if r == root else 0) for r in range(self._size)]
                if me:
                    flat = torch.stack([x.reshape(out.shape) for x in inputs[i]]).contiguous()
                    send = [(r * c, c) for r in range(self._size)]
                    self._call(nv.exchange, "scatter", flat.data_ptr(), send, d.data_ptr(), recv)
                else:
                    self._call(nv.exchange, "scatter", 0, [(0, 0)] * self._size, d.data_ptr(), recv)
                if d is not out:
                    out.copy_(d)
            return nv.work(outputs)
        for i, out in enumerate(outputs):
            fo = _Flat(out, "scatter")
            if self._rank == root:
                flat = _to_host(torch.stack([x.reshape(out.shape) for x in inputs[i]]), "scatter").contiguous()
                self._c("scatter", fo.span(), (flat.data_ptr(), flat.numel() * flat.element_size()), root)
            else:
                self._c("scatter", fo.span(), (0, 0), root)
            fo.done()
        return _done(outputs)

    def barrier(self, opts: Any = None) -> dist.Work:
        if self._cuda is not None and self._cuda.comm is not None:
            # A CUDA group's barrier also waits for its collectives, and says if one failed.
            torch.cuda.synchronize(self._cuda.device)
            self._call(self._cuda.comm.check)
        self._c("barrier")
        return _done(None)

    # --- point to point -------------------------------------------------------------------
    def _keep(self, op_id: int, f: _Flat) -> None:
        """Holds a pending operation's buffers until it finished (its Work may be dropped
        first: the communicator still copies into or out of them)."""
        self._inflight = {i: g for i, g in self._inflight.items() if not self._comm.test(i)}
        self._inflight[op_id] = f

    def _queue_p2p(self, nv: _CudaPath, send: bool, peer: int, t: torch.Tensor, tag: int) -> dist.Work:
        """Queues a CUDA send or receive on the current stream. Queued ones are launched
        together (`_flush_p2p`): a `batch_isend_irecv` (which torch hands a backend like this
        one op by op) becomes one launch, in which both directions of a pair progress at once."""
        if not 0 <= int(tag) <= _P2P_MAX_TAG:
            raise ValueError(f"tidewire: {'send to' if send else 'recv from'} rank {peer}: tag {tag} (0 to {_P2P_MAX_TAG} for CUDA tensors)")
        stream = (raw_stream(nv.device), torch._C._cuda_getCurrentStream(nv.device))
        if self._p2p_q and self._p2p_stream != stream:
            self._flush_p2p()  # one launch, one stream
        self._p2p_stream = stream
        d = t if t.is_contiguous() else (t.contiguous() if send else torch.empty_like(t, memory_format=torch.contiguous_format))
        work = _CudaP2PWork(self, nv.device, [t], nv)
        self._p2p_q.append((send, peer, d, int(tag), t, work))
        return work

    def _fail_p2p(self, why: BaseException) -> None:
        """Fails the queued sends and receives without launching them: each one's wait raises
        `why`."""
        q, self._p2p_q = self._p2p_q, []
        for op in q:
            op[5]._error = why

    def _flush_p2p(self) -> None:
        """Launches the queued CUDA sends and receives. Launch i holds the i-th queued message
        of every (direction, peer): each direction keeps its order, and a rank's launch i waits
        only for its peers' launch i (never for a later one, whatever order the ranks queued
        their sends and receives in). A failed launch fails every message not launched yet."""
        if not self._p2p_q:
            return
        q, self._p2p_q = self._p2p_q, []
        (stream, triple) = self._p2p_stream if self._p2p_stream is not None else (0, None)
        path = self._cuda
        waves = _p2p_waves(q)
        for k, wave in enumerate(waves):
            sends = [(o[1], o[2].data_ptr(), _nbytes(o[2]), o[3]) for o in wave if o[0]]
            recvs = [(o[1], o[2].data_ptr(), _nbytes(o[2]), o[3]) for o in wave if not o[0]]
            try:
                if path is None:
                    raise RuntimeError(f"tidewire: rank {self._rank}: the group's CUDA path closed with sends and receives queued")
                if self._p2p_last != triple:
                    # Launches on two streams would share the per-peer chunk counts.
                    self._p2p_last = _follow(self._p2p_last, triple)
                self._call(path.p2p, stream, sends, recvs)
            except BaseException as e:
                # This launch and every later one fail (their messages were never sent).
                for later in waves[k:]:
                    for o in later:
                        o[5]._error = e
                raise
        late = [(o[2], o[4]) for o in q if not o[0] and o[2] is not o[4]]
        if late:
            # Receives into non-contiguous tensors: copied in on the queue's stream.
            with torch.cuda.stream(_stream_of(triple)):
                for d, t in late:
                    t.copy_(d)

    def send(self, tensors: List[torch.Tensor], dst: int, tag: int = 0) -> dist.Work:
        (t,) = tensors
        nv = self._nv(t, message=True)
        if nv is not None:
            return self._queue_p2p(nv, True, dst, t, tag)
        f = _Flat(t, "send", write_back=False)
        op_id = self._c("isend", dst, f.addr, f.nbytes, int(tag))
        self._keep(op_id, f)
        return _P2PWork(self, op_id, f, f"send to rank {dst}")

    def recv(self, tensors: List[torch.Tensor], src: int, tag: int = 0) -> dist.Work:
        (t,) = tensors
        nv = self._nv(t, message=True)
        if nv is not None:
            return self._queue_p2p(nv, False, src, t, tag)
        f = _Flat(t, "recv")
        op_id = self._c("irecv", src, f.addr, f.nbytes, int(tag))
        self._keep(op_id, f)
        return _P2PWork(self, op_id, f, f"recv from rank {src}")

    def recv_anysource(self, tensors: List[torch.Tensor], tag: int = 0) -> dist.Work:
        """The next message of `tag` from whichever rank sends one first (``dist.recv`` and
        ``dist.irecv`` without a source; the work's ``_source_rank()`` names the sender). Over
        the rings: CPU tensors, and CUDA tensors of groups without an NVLink path."""
        (t,) = tensors
        if self._nv(t, message=True) is not None:
            raise RuntimeError(
                f"tidewire: rank {self._rank}: recv from any source on CUDA tensors is not supported: "
                "they travel over NVLink in launches that name both ranks (NCCL has no recv from any "
                "source either); name the source rank, or receive into a CPU tensor from a CPU send"
            )
        f = _Flat(t, "recv")
        op_id = self._c("irecv_any", f.addr, f.nbytes, int(tag))
        self._keep(op_id, f)
        return _P2PWork(self, op_id, f, "recv from any rank", any_source=True)

    def _source_of(self, op_id: int) -> Optional[int]:
        """The group rank the finished receive from any rank `op_id` took its message from."""
        r = self._comm.take_source(op_id)
        return None if r is None else self._members[r]


def _create(opts: Any, pg_options: Any = None) -> ProcessGroupTidewire:
    return ProcessGroupTidewire(opts.store, opts.group_rank, opts.group_size, opts.timeout)


def _register() -> None:
    if BACKEND.upper() not in dist.Backend._plugins:  # type: ignore[attr-defined]
        dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu", "cuda"])


_register()
