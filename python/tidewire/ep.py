"""Expert-parallel dispatch and combine (low-latency form) over NVLink: `tidewire.ep.Buffer`,
with the interface of Mooncake EP's buffer (DeepEP's low-latency API with `active_ranks` and
`timeout_us`).

    buffer = Buffer(group, Buffer.get_ep_buffer_size_hint(T, H, group.size(), E))
    recv_x, recv_count, handle, event, hook = buffer.dispatch(x, topk_idx, active_ranks, T, E, timeout_us)
    out, event, hook = buffer.combine(y, topk_idx, topk_weights, active_ranks, timeout_us, handle)

Construction decides reach: every rank allocates its buffer with the engine's transferable
allocation, the ranks exchange (engine name, address, length) over `group` (any backend), and
each maps every other rank's buffer for its own GPU (CUDA IPC or VMM POSIX-FD on one host,
FABRIC only where proven; each rank imports the handle itself). A rank no NVLink path reaches
is an error at construction, naming it. The kernels are compiled and loaded then, never on the
first dispatch.

Every call runs on the current CUDA stream. A rank that does not answer within `timeout_us`
(when -1: 100 s, `TIDEWIRE_EP_TIMEOUT_US`), or whose process died, is written as 0 into the caller's `active_ranks` and
counts as sending nothing from then on.

Dispatch sends e4m3 rows with one fp32 scale per 128 channels (amax / 448) unless
`use_fp8=False` (bf16); combine is bf16.

Every call can be captured in a CUDA graph: a dispatch's number is taken from a counter in GPU
memory by a kernel on the stream, so each replay numbers its calls afresh.

Not yet: `zero_copy`, and the fallback for ranks no NVLink reaches.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from . import _native

__all__ = ["Buffer", "EventOverlap"]

#: `timeout_us=-1` (the caller sets none) waits this long: the kernels never wait without a
#: deadline. `TIDEWIRE_EP_TIMEOUT_US` overrides it.
DEFAULT_TIMEOUT_US = int(os.environ.get("TIDEWIRE_EP_TIMEOUT_US", 100_000_000))


class EventOverlap:
    """A CUDA event recorded after a call's kernels (and the tensors it must keep alive)."""

    def __init__(self, event: Optional[torch.cuda.Event] = None, extra_tensors: Optional[Tuple[Any, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.current_stream_wait()


def _engine() -> Any:
    from .distributed import engine

    return engine()


class Buffer:
    """One rank's EP buffer over `group` (see the module's documentation)."""

    def __init__(self, group: Any, num_ep_buffer_bytes: int = 0, disable_p2p: bool = False) -> None:
        if disable_p2p:
            raise NotImplementedError("tidewire.ep: disable_p2p (the collective fallback) is not implemented yet")
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        self.device = torch.cuda.current_device()
        if num_ep_buffer_bytes <= 0:
            # The incumbent's default shape: 128 tokens of 7168 channels, 288 experts (rounded to
            # a multiple of the ranks).
            experts = max(self.group_size, 288 // self.group_size * self.group_size)
            num_ep_buffer_bytes = Buffer.get_ep_buffer_size_hint(128, 7168, self.group_size, experts)
        eng = _engine()
        addr, length = _native.EpBuffer.allocate(eng._native, self.device, num_ep_buffer_bytes)
        infos: list = [None] * self.group_size
        dist.all_gather_object(infos, (eng.name, addr, length), group=group)
        self._native = _native.EpBuffer(eng._native, self.rank, self.device, [tuple(i) for i in infos])
        self.paths = self._native.paths()
        # The buffer's dispatch counter, on the GPU: each dispatch's number is taken there by a
        # kernel on the caller's stream, so a CUDA-graph replay numbers its calls afresh.
        self._counter = torch.zeros(1, dtype=torch.int64, device=f"cuda:{self.device}")
        # Each dispatch's number word, token count, top-k and host-side number, by its handle
        # (for its combine).
        self._seqs: Dict[int, Tuple[torch.Tensor, int, int, int]] = {}
        self._dispatches = 0

    @staticmethod
    def get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
        return _native.EpBuffer.size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    def _check(self, t: torch.Tensor, what: str, dtype: torch.dtype) -> torch.Tensor:
        if t.device.type != "cuda" or t.device.index != self.device:
            raise ValueError(f"tidewire.ep: {what} must be on cuda:{self.device}, not {t.device}")
        if t.dtype != dtype:
            raise TypeError(f"tidewire.ep: {what} must be {dtype}, not {t.dtype}")
        return t.contiguous()

    @staticmethod
    def _timeout_ns(timeout_us: int) -> int:
        return (DEFAULT_TIMEOUT_US if timeout_us is None or timeout_us < 0 else int(timeout_us)) * 1000

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        active_ranks: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        timeout_us: int = -1,
        use_fp8: Optional[bool] = None,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> Tuple[Any, torch.Tensor, Tuple[Any, ...], EventOverlap, Optional[Callable[[], None]]]:
        fp8 = True if use_fp8 is None else bool(use_fp8)
        x = self._check(x, "x", torch.bfloat16)
        topk_idx = self._check(topk_idx, "topk_idx", torch.int64)
        active = self._check(active_ranks, "active_ranks", torch.int32)
        if active is not active_ranks:
            raise ValueError("tidewire.ep: active_ranks must be contiguous (the kernels write into it)")
        T, E, R = num_max_dispatch_tokens_per_rank, num_experts, self.group_size
        if x.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
            raise ValueError(f"tidewire.ep: x {tuple(x.shape)} and topk_idx {tuple(topk_idx.shape)} must be [tokens, H] and [tokens, k]")
        num_tokens, hidden = x.shape
        k = topk_idx.shape[1]
        el = E // R
        dev = x.device
        # The two halves of the buffer alternate between calls: a call may not start while the
        # previous call on its half still has its combine to run (its rows would be overwritten).
        number = self._dispatches + 1
        pending = [n for (_, _, _, n) in self._seqs.values() if n % 2 == number % 2]
        if pending:
            raise RuntimeError(
                f"tidewire.ep: dispatch {number} would reuse the buffer half of dispatch {pending[0]}, "
                "whose combine has not run (at most two dispatches may await their combine)"
            )
        seq = torch.empty(1, dtype=torch.int64, device=dev)
        shape = (T, hidden, R, E, seq.data_ptr(), num_tokens, k, self._timeout_ns(timeout_us), fp8)
        # Checked before the call is numbered: a rank that refuses a call must not count it.
        self._native.check(shape)
        stream = torch.cuda.current_stream().cuda_stream
        self._native.begin(stream, self._counter.data_ptr(), seq.data_ptr())
        self._dispatches = number
        recv_x = torch.empty((el, R * T, hidden), dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=dev)
        # One fp32 scale per 128 channels per row, column-major (DeepEP's layout).
        scales = torch.empty((el, hidden // 128, R * T) if fp8 else (0,), dtype=torch.float32, device=dev)
        src_info = torch.empty((el, R * T), dtype=torch.int32, device=dev)
        layout_range = torch.empty((el, R), dtype=torch.int64, device=dev)
        recv_count = torch.zeros((el,), dtype=torch.int32, device=dev)
        self._native.dispatch_send(stream, shape, x.data_ptr(), topk_idx.data_ptr(), active.data_ptr())
        keep = (x, topk_idx, seq)

        def recv() -> None:
            s = torch.cuda.current_stream().cuda_stream
            self._native.dispatch_recv(
                s,
                shape,
                recv_x.data_ptr(),
                src_info.data_ptr(),
                layout_range.data_ptr(),
                recv_count.data_ptr(),
                active.data_ptr(),
                scales.data_ptr(),
            )

        handle = (src_info, layout_range, T, hidden, E)
        self._seqs[src_info.data_ptr()] = (seq, num_tokens, k, number)
        hook = None
        if return_recv_hook:
            hook = recv
        else:
            recv()
        event = EventOverlap(self._event() if async_finish else None, keep)
        packed = (recv_x, scales.transpose(1, 2)) if fp8 else recv_x
        return packed, recv_count, handle, event, hook

    def combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        active_ranks: torch.Tensor,
        timeout_us: int,
        handle: Tuple[Any, ...],
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, EventOverlap, Optional[Callable[[], None]]]:
        if zero_copy:
            raise NotImplementedError("tidewire.ep: zero_copy combine is not implemented yet")
        src_info, layout_range, T, hidden, E = handle
        try:
            seq, num_tokens, k, _ = self._seqs.pop(src_info.data_ptr())
        except KeyError:
            raise ValueError("tidewire.ep: this handle's combine was already run, or it comes from another buffer") from None
        x = self._check(x, "x", torch.bfloat16)
        topk_idx = self._check(topk_idx, "topk_idx", torch.int64)
        topk_weights = self._check(topk_weights, "topk_weights", torch.float32)
        active = self._check(active_ranks, "active_ranks", torch.int32)
        R = self.group_size
        if active is not active_ranks:
            raise ValueError("tidewire.ep: active_ranks must be contiguous (the kernels write into it)")
        if tuple(x.shape) != (E // R, R * T, hidden):
            raise ValueError(f"tidewire.ep: combine input {tuple(x.shape)}, expected {(E // R, R * T, hidden)}")
        if tuple(topk_idx.shape) != (num_tokens, k) or tuple(topk_weights.shape) != (num_tokens, k):
            raise ValueError(
                f"tidewire.ep: topk_idx {tuple(topk_idx.shape)} and topk_weights {tuple(topk_weights.shape)} "
                f"must be the dispatch's [{num_tokens}, {k}]"
            )
        shape = (T, hidden, R, E, seq.data_ptr(), num_tokens, k, self._timeout_ns(timeout_us), False)
        if out is None:
            out = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=x.device)
        elif (
            out.dtype != torch.bfloat16
            or tuple(out.shape) != (num_tokens, hidden)
            or not out.is_contiguous()
            or out.data_ptr() % 16
        ):
            raise ValueError(f"tidewire.ep: out must be a contiguous, 16-byte aligned bf16 [{num_tokens}, {hidden}] tensor")
        stream = torch.cuda.current_stream().cuda_stream
        self._native.combine_send(stream, shape, x.data_ptr(), src_info.data_ptr(), layout_range.data_ptr(), active.data_ptr())
        result = out

        def recv() -> None:
            s = torch.cuda.current_stream().cuda_stream
            self._native.combine_recv(s, shape, topk_idx.data_ptr(), topk_weights.data_ptr(), result.data_ptr(), active.data_ptr())

        hook = None
        if return_recv_hook:
            hook = recv
        else:
            recv()
        event = EventOverlap(self._event() if async_finish else None, (x, topk_idx, topk_weights, seq))
        return out, event, hook

    def _event(self) -> torch.cuda.Event:
        e = torch.cuda.Event()
        e.record(torch.cuda.current_stream())
        return e

    def update_ep_member(self) -> None:
        raise NotImplementedError("tidewire.ep: update_ep_member comes with elastic membership")

    def destroy(self) -> None:
        torch.cuda.current_stream().synchronize()
        self._native.close()
