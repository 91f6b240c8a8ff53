"""Expert-parallel dispatch and combine (low-latency form) over NVLink: `tidewire.ep.Buffer`,
with the interface of Mooncake EP's buffer (DeepEP's low-latency API with `active_ranks` and
`timeout_us`).

    buffer = Buffer(group, Buffer.get_ep_buffer_size_hint(T, H, group.size(), E))
    recv_x, recv_count, handle, event, hook = buffer.dispatch(x, topk_idx, active_ranks, T, E, timeout_us)
    out, event, hook = buffer.combine(y, topk_idx, topk_weights, active_ranks, timeout_us, handle)

Construction decides reach: every rank allocates its buffer with the engine's transferable
allocation, the ranks exchange (engine name, address, length) through the group's store (a rank
that does not take part is named within the store's timeout), and each maps every other rank's
buffer for its own GPU (CUDA IPC or VMM POSIX-FD on one host, FABRIC only where proven; each
rank imports the handle itself). If any rank has no GPU path to another, or asked for
`disable_p2p`, every rank takes the fallback over the group's collectives (correct, slow, not
capturable in a CUDA graph; its calls wait as long as the group's collectives do, the group's
timeout rather than `timeout_us`), logged once with the ranks and reasons and kept in
`Buffer.fallback`. The kernels are compiled and loaded at construction, never on the first
dispatch.

Over an elastic group (`mooncake` / `mooncake-cpu`, `tidewire.mooncake.pg`) the buffers are
exchanged through the group's membership at the epoch in force (not the store), ranks outside
the group's view take no part (mapped as absent), every call zeroes the ranks the view dropped
in the caller's `active_ranks`, and ranks the kernels marked inactive are reported to the group
as failed; a replacement added to the group makes its buffer while the others call
`update_ep_member()`. A buffer over a host-only group (`mooncake-cpu`), or without CUDA, takes
the collective fallback on host tensors.

Every call runs on the current CUDA stream. A rank that does not answer within `timeout_us`
(when -1: 100 s, `TIDEWIRE_EP_TIMEOUT_US`), or whose process died, is written as 0 into the
caller's `active_ranks` and counts as sending nothing from then on. With `return_recv_hook`, a
call's hook runs once, and a dispatch's combine is refused until its hook has run (its layout
is written by the hook's kernel).

Dispatch sends e4m3 rows with one fp32 scale per 128 channels (amax / 448) unless
`use_fp8=False` (bf16); combine is bf16. Received rows are packed per local expert, this
rank's own first, then the other ranks' from this rank on (`layout_range` holds each source's
begin and count; `recv_count` the total, as grouped GEMMs on the masked layout read it).

Every call can be captured in a CUDA graph: a dispatch's number is taken from a counter in GPU
memory by the send kernel on the stream, so each replay numbers its calls afresh, and every
rank's buffer is read from a table in GPU memory at each launch, so a graph captured before an
`update_ep_member()` replays on the new buffers (a replay whose shape the new buffers cannot
hold takes part in nothing and marks every other rank inactive). At most two
dispatches may be in flight (the buffer's two halves): a third is refused until the first's
combine, receive hook included, has been launched. A buffer's dispatches run on one stream,
or on streams the caller orders (two send kernels running at once would number their calls
wrong): a dispatch on another stream while one is in flight is refused; one after the earlier
call's combine is not checked.

`zero_copy=True` is accepted: this buffer hands out no area for the caller to write expert
outputs into, so such a combine reads its input like any other (logged once).
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _native
from ._cuda import raw_stream
from ._store import exchange as _store_exchange

__all__ = ["Buffer", "EventOverlap", "quantize_fp8"]

log = logging.getLogger("tidewire.ep")

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


def quantize_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`x` (bf16 `[n, H]`) as e4m3 with one fp32 scale per 128 channels, as the dispatch kernel
    makes it: scale = max(amax, 1e-4) / 448, values times 1 / scale rounded to nearest even and
    saturated. Returns `(q [n, H] float8_e4m3fn, scales [n, H / 128] fp32)`."""
    n, h = x.shape
    f = x.float().view(n, h // 128, 128)
    scale = f.abs().amax(dim=-1).clamp(min=1e-4) / 448.0
    inv = 1.0 / scale
    q = (f * inv.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(n, h), scale


def _refuse_capture(t: torch.Tensor, buf: Any) -> None:
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"tidewire.ep: the collective fallback cannot be captured in a CUDA graph ({getattr(buf, 'fallback', '')})")


class _Collective:
    """Dispatch and combine over the group's collectives (`all_to_all_single`), for ranks no GPU
    path reaches: correct, slow (the split sizes cross to the host), not capturable in a CUDA
    graph. The same results as the kernels: rows packed per local expert, our own first, then
    the other ranks' from ours on, each source's tokens in token order."""

    def __init__(self, group: Any) -> None:
        self.group = group
        # Gloo (and any backend without CUDA) moves host tensors.
        backend = str(dist.get_backend(group)).lower()
        self.host = "nccl" not in backend and "tidewire" not in backend and "mooncake" not in backend

    def _all_to_all(self, send: torch.Tensor, send_splits: List[int], recv_splits: List[int]) -> torch.Tensor:
        dev = send.device
        if self.host:
            send = send.cpu()
        recv = torch.empty((sum(recv_splits),) + tuple(send.shape[1:]), dtype=send.dtype, device=send.device)
        dist.all_to_all_single(recv, send.contiguous(), recv_splits, send_splits, group=self.group)
        return recv.to(dev)

    def _splits(self, send_counts: torch.Tensor) -> List[int]:
        recv = self._all_to_all(send_counts.view(-1, 1), [1] * len(send_counts), [1] * len(send_counts))
        return recv.view(-1).tolist()

    def dispatch(self, buf: "Buffer", x, topk, active, T, E, fp8, async_finish, return_recv_hook):  # type: ignore[no-untyped-def]
        _refuse_capture(x, buf)
        R, rank, dev = buf.group_size, buf.rank, x.device
        el, (n, H), k = E // R, x.shape, topk.shape[1]
        # Every valid selection, ordered by (expert, token): per destination, per expert, the
        # tokens in order.
        flat = topk.reshape(-1)
        token = torch.arange(n, device=dev).repeat_interleave(k)
        slot_k = torch.arange(k, device=dev).repeat(n)
        ok = (flat >= 0) & (flat < E)
        # A token reaches an expert once, as in the kernels: a repeat of an expert earlier in
        # its row selects nothing (nor is its weight applied at the combine).
        if k > 1:
            same = topk.unsqueeze(2) == topk.unsqueeze(1)  # [n, j, i]: slot j's expert is slot i's
            earlier = torch.ones(k, k, dtype=torch.bool, device=dev).tril(-1)
            ok &= ~(same & earlier).any(2).reshape(-1)
        ok &= active[(flat.clamp(0, E - 1) // el).long()] != 0
        e_sel, t_sel, k_sel = flat[ok], token[ok], slot_k[ok]
        order = torch.argsort(e_sel * max(n, 1) + t_sel, stable=True)
        e_sel, t_sel, k_sel = e_sel[order], t_sel[order], k_sel[order]
        dest = e_sel // el
        send_counts = torch.bincount(dest, minlength=R)
        if fp8:
            q, sc = quantize_fp8(x)
            payload = torch.cat([q.view(torch.uint8), sc.view(torch.uint8)], dim=1)
        else:
            payload = x.view(torch.uint8)
        meta = torch.stack([e_sel, t_sel], dim=1).to(torch.int64)
        rows = torch.cat([payload[t_sel], meta.view(torch.uint8)], dim=1)
        send_splits = send_counts.tolist()
        recv_splits = self._splits(send_counts)
        got = self._all_to_all(rows, send_splits, recv_splits)
        width = payload.shape[1]
        gmeta = got[:, width:].contiguous().view(torch.int64).view(-1, 2)
        src = torch.repeat_interleave(torch.arange(R, device=dev), torch.tensor(recv_splits, device=dev))
        local = gmeta[:, 0] - rank * el
        # Packed per local expert, our own rows first, then the other ranks' from ours on
        # (rank + 1, ..., wrapping), as the kernels pack them; each source's tokens stay in
        # token order (stable sort).
        turn = (src - rank) % R
        order = torch.argsort(local * R + turn, stable=True)
        got, gmeta, src, local, turn = got[order], gmeta[order], src[order], local[order], turn[order]
        by_turn = torch.bincount(local * R + turn, minlength=el * R).view(el, R)
        recv_count = by_turn.sum(1).to(torch.int32)
        begin_turn = torch.cumsum(by_turn, dim=1) - by_turn
        back_to_rank = (torch.arange(R, device=dev) - rank) % R  # rank s's turn
        counts, begin = by_turn[:, back_to_rank], begin_turn[:, back_to_rank]
        layout_range = (begin << 32) | counts
        starts = torch.cumsum(recv_count.long(), 0) - recv_count.long()
        slot = torch.arange(got.shape[0], device=dev) - starts[local]
        recv_x = torch.empty((el, R * T, H), dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=dev)
        src_info = torch.empty((el, R * T), dtype=torch.int32, device=dev)
        src_info[local, slot] = gmeta[:, 1].to(torch.int32)
        scales = None
        if fp8:
            recv_x.view(torch.uint8)[local, slot] = got[:, :H]
            scales = torch.empty((el, H // 128, R * T), dtype=torch.float32, device=dev)
            sc_rows = got[:, H:width].contiguous().view(torch.float32)
            scales.transpose(1, 2)[local, slot] = sc_rows
        else:
            recv_x.view(torch.uint8).view(el, R * T, 2 * H)[local, slot] = got[:, :width]
        handle = (src_info, layout_range, T, H, E)
        # For the combine: what we sent (to match the rows that come back) and what came.
        buf._seqs[src_info.data_ptr()] = ((t_sel, k_sel, send_splits, recv_splits, local, slot, src), n, k, 0)
        event = EventOverlap(buf._event() if async_finish else None, (x, topk))
        packed = (recv_x, scales.transpose(1, 2)) if scales is not None else recv_x
        hook = (lambda: None) if return_recv_hook else None
        return packed, recv_count, handle, event, hook

    def combine(self, buf: "Buffer", y, weights, state, out, async_finish, return_recv_hook):  # type: ignore[no-untyped-def]
        _refuse_capture(y, buf)
        t_sel, k_sel, send_splits, recv_splits, local, slot, src = state
        # Back to each source in the order it sent: per source, per local expert, its tokens.
        back = y[local, slot][torch.argsort(src, stable=True)]
        got = self._all_to_all(back, recv_splits, send_splits)
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        w = weights[t_sel, k_sel].unsqueeze(1)
        acc.index_add_(0, t_sel, got.float() * w)
        out.copy_(acc.to(torch.bfloat16))
        event = EventOverlap(buf._event() if async_finish else None, (y, weights))
        hook = (lambda: None) if return_recv_hook else None
        return out, event, hook


def _engine() -> Any:
    from .distributed import engine

    return engine()


def _store(group: Any) -> Any:
    """The group's store (torch's, prefixed for the group), or None for a group torch does not
    know (then the exchange goes through `all_gather_object`)."""
    try:
        return dist.distributed_c10d._get_process_group_store(group)
    except KeyError:  # a group torch has no entry for
        return None


#: Buffers made per group so far in this process (every rank makes them in the same order, so
#: the number names one construction on every rank).
_made: Dict[str, int] = {}


def exchange(group: Any, tag: str, payload: Any, timeout: Optional[timedelta] = None) -> List[Any]:
    """Every rank's `payload` (JSON-able), by rank, through the group's store. A rank that has
    not published within `timeout` (the store's own by default: the group's) is named in the
    `TimeoutError`."""
    rank, size = group.rank(), group.size()
    store = _store(group)
    if store is None:
        out: List[Any] = [None] * size
        dist.all_gather_object(out, payload, group=group)
        return out
    limit = timeout if timeout is not None else getattr(store, "timeout", timedelta(seconds=300))
    return _store_exchange(store, rank, size, f"tidewire/ep/{tag}", payload, limit)


def _elastic_group(group: Any) -> Any:
    """The tidewire group whose membership `group` carries (a `mooncake` / `mooncake-cpu`
    group of more than one slot), or None."""
    from .distributed import ProcessGroupTidewire

    if isinstance(group, ProcessGroupTidewire) and group._elastic is not None:
        return group
    return None


def _host_only(group: Any) -> bool:
    """Whether `group` moves host tensors only (a ``mooncake-cpu`` group)."""
    try:
        return str(dist.get_backend(group)) == "mooncake-cpu"
    except (KeyError, ValueError, RuntimeError):  # a group torch has no entry for
        return False


#: An elastic exchange's unreached reasons are cut to this many characters (the membership
#: carries each announcement in one datagram).
_REASON_CHARS = 96


class Buffer:
    """One rank's EP buffer over `group` (see the module's documentation)."""

    def __init__(self, group: Any, num_ep_buffer_bytes: int = 0, disable_p2p: bool = False) -> None:
        self.group = group
        self.rank = group.rank()
        self.group_size = group.size()
        #: The GPU of the calls; None without CUDA or over a group for host tensors only
        #: (``mooncake-cpu``): only the collective fallback then, on host tensors.
        self.device: Optional[int] = (
            torch.cuda.current_device() if torch.cuda.is_available() and not _host_only(group) else None
        )
        name = str(getattr(group, "group_name", "") or "")
        if not name:
            # The exchange's keys must be the same on every rank: a process-local id is not.
            raise ValueError(f"tidewire.ep.Buffer: the group {group!r} has no name to agree on across ranks")
        self._tag = f"{name}/{_made.get(name, 0)}"
        _made[name] = _made.get(name, 0) + 1
        #: The elastic group whose view the buffer follows (None: every rank, always).
        self._elastic = _elastic_group(group)
        if self._elastic is not None and self._elastic._joining:
            raise RuntimeError(
                f"tidewire.ep.Buffer: rank {self.rank} joins its group and was not added yet: call "
                "mooncake.pg.join_group(group) first"
            )
        #: Exchanges made at the current epoch of the elastic group (the key of the next one).
        self._rounds: Dict[int, int] = {}
        self._native: Any = None
        #: This rank's buffer (address, length) while it has one.
        self._own: Tuple[int, int] = (0, 0)
        self._destroyed = False
        self._fallback: Optional[_Collective] = None
        #: The fallback's EP metrics (made at its first call).
        self._fallback_metrics: Any = None
        #: Why calls go through the group's collectives instead of the NVLink kernels (None:
        #: they do not).
        self.fallback: Optional[str] = None
        if num_ep_buffer_bytes <= 0:
            # The incumbent's default shape: 128 tokens of 7168 channels, 288 experts (rounded to
            # a multiple of the ranks).
            experts = max(self.group_size, 288 // self.group_size * self.group_size)
            num_ep_buffer_bytes = Buffer.get_ep_buffer_size_hint(128, 7168, self.group_size, experts)
        # The buffer's dispatch counter, on the GPU: the last call's number, and the send
        # kernel's finished blocks (0 between calls). Each dispatch's number is taken there by
        # the send kernel on the caller's stream, so a CUDA-graph replay numbers its calls afresh.
        self._counter = torch.zeros(2, dtype=torch.int64, device=f"cuda:{self.device}" if self.device is not None else "cpu")
        # Every rank's buffer as the kernels read it at each launch (written by each native
        # buffer this object makes): a call captured in a CUDA graph follows update_ep_member.
        # The native buffer keeps it for the process (1 KiB): a graph replayed after this object
        # is gone reads the zeroed table (reaches nobody), never memory handed out again.
        self._table = torch.zeros(_native.EpBuffer.table_bytes() // 8, dtype=torch.int64, device=self._counter.device)
        # Each dispatch's number word, token count, top-k and host-side number, by its handle
        # (for its combine).
        self._seqs: Dict[int, Tuple[Any, int, int, int]] = {}
        # Dispatches whose combine has not launched its receive half yet (their buffer half is
        # still in use), with the stream each was launched on.
        self._open: Dict[int, int] = {}
        # Dispatches (by handle) whose receive hook has not run: their combine is refused.
        self._unreceived: set = set()
        self._dispatches = 0
        self._updates = 0
        self._zero_copy_logged = False
        #: The ranks whose buffers are mapped (all but those outside the elastic group's view
        #: at the last exchange), the ranks the group's view dropped since, the epoch that was
        #: read at, and the mask the calls apply to the caller's `active_ranks` (one tensor for
        #: the buffer's life) with whether it holds a 0.
        self._mapped: List[int] = list(range(self.group_size))
        self._left: List[int] = []
        self._seen_epoch = -1
        self._keep_dev = torch.ones(self.group_size, dtype=torch.int32, device=self._counter.device)
        self._keep_on = False
        #: The kernels' inactive marks per source rank already reported to the group.
        self._marks_seen = [0] * self.group_size
        #: The kernels' marks for calls of another shape already raised.
        self._shapes_seen = [0] * self.group_size
        if self._elastic is not None:
            self._round(disable_p2p, num_ep_buffer_bytes)
            return
        unreached: List[Any] = []
        if not disable_p2p and self.device is not None:
            self._store_buffers("buffers", num_ep_buffer_bytes, None)
            unreached = [list(u) for u in self._native.unreached()]
        # Every rank's verdict: one rank's missing path (or disable_p2p) sends every rank to the
        # fallback, so that all ranks run the same protocol.
        verdicts = exchange(
            group, f"{self._tag}/reach", {"disable_p2p": bool(disable_p2p), "no_cuda": self.device is None, "unreached": unreached}
        )
        self._decide(verdicts, None)

    def _decide(self, verdicts: List[Any], why_else: Optional[str]) -> None:
        """Takes the kernels, or the fallback for every rank if any rank's verdict (None: a
        rank outside the view) asks for it, or `why_else` says why."""
        why = [f"rank {r}: no CUDA device" for r, v in enumerate(verdicts) if v is not None and v.get("no_cuda")]
        why += [f"rank {r}: disable_p2p" for r, v in enumerate(verdicts) if v is not None and v["disable_p2p"]]
        why += [f"rank {r} -> rank {p}: {reason}" for r, v in enumerate(verdicts) if v is not None for p, reason in v["unreached"]]
        if why_else is not None and not why:
            why.append(why_else)
        if why:
            if self.fallback is None:
                self.fallback = "; ".join(why)
                log.warning("tidewire.ep: %d ranks over the group's collectives, not NVLink (%s)", self.group_size, self.fallback)
            if self._native is not None:
                self._native.close()
                self._native = None
            self._fallback = _Collective(self.group)
            self.paths = ["local" if r == self.rank else "collective" for r in range(self.group_size)]
        else:
            self.paths = self._native.paths()

    def _publish_buffer(self, nbytes: int, used: Optional[int], members: List[int], publish: Callable[[Any], List[Any]]) -> List[Any]:
        """Allocates this rank's new buffer (`nbytes`), publishes it (with `used`, the call
        numbers this rank used, when given) through `publish`, which returns what every rank
        published, by rank (None: outside the view, or no buffer), and maps every rank's when
        each of `members` published one. Our allocation is freed if no buffer object came to
        own it (a failure, or a member without a buffer). Returns what every rank published."""
        eng = _engine()
        self._own = _native.EpBuffer.allocate(eng._native, self.device, nbytes)
        owned = False
        try:
            infos = publish([eng.name, *self._own] + ([] if used is None else [used]))
            if all(infos[r] is not None for r in members):
                peers = [(i[0], int(i[1]), int(i[2])) if i is not None else ("", 0, 0) for i in infos]
                # The buffer owns the allocation from here (freed with it, or if this fails).
                owned = True
                self._native = _native.EpBuffer(eng._native, self.rank, self.device, peers, self._table)
            return infos
        finally:
            if not owned:
                eng._native.free_device(self._own[0])  # no buffer object owns it

    def _store_buffers(self, key: str, nbytes: int, used: Optional[int]) -> List[Any]:
        """`_publish_buffer` through the store, under `key`, every rank a member."""
        return self._publish_buffer(nbytes, used, list(range(self.group_size)), lambda mine: exchange(self.group, f"{self._tag}/{key}", mine))

    def _kernels(self) -> Any:
        """The native buffer the kernels launch on; an error saying why there is none."""
        if self._native is None:
            why = "it was destroyed" if self._destroyed else "its last update_ep_member failed (call it again on every rank)"
            raise RuntimeError(f"tidewire.ep: rank {self.rank}: the EP buffer maps no peers: {why}")
        return self._native

    def _used(self) -> int:
        """The call numbers already used here: the GPU counter, or more if calls were captured
        in a graph and not replayed yet."""
        return max(int(self._counter[0].item()), self._dispatches)

    def _release(self, background: bool) -> None:
        """Drops the buffer and the mappings of the others' (at an update every member does it
        at once, after meeting the others): a new membership gets new buffers. A process the
        group dropped while it was stopped may still map our old buffer and, resumed, write
        into it (a launch it was about to make, a kernel that waited past the change): our old
        buffer is freed once every process that mapped it released it, and stays allocated,
        written by nobody's calls, when one does not within the engine's stall deadline. That
        wait runs on a thread of its own with `background` (nobody's next exchange waits for
        a stopped process)."""
        if self._native is not None:
            self._native.close(background=background)
            self._native = None
            self._marks_seen = [0] * self.group_size  # the next buffer's kernels count afresh
            self._shapes_seen = [0] * self.group_size

    def _exchange(self, key: str, payload: Any, epoch: int, members: List[int]) -> List[Any]:
        """Every member's `payload` by rank (None for a rank outside the view) through the
        elastic group's membership, at `epoch`: the store is not used (it lives in one rank's
        process, which may be the one that died). Every member makes the same exchanges at an
        epoch, in the same order: the keys count them."""
        g = self._elastic
        full = f"ep/{self._tag}/{epoch}.{self._rounds.get(epoch, 0)}/{key}"
        g._elastic.announce(full, json.dumps(payload), epoch)
        try:
            got = g._elastic.collect(full, epoch, members, g._timeout.total_seconds())
        except _native.TidewireError as e:
            g._elastic.withdraw(full)
            if getattr(e, "kind", "") != "ViewChanged":
                g._failed(getattr(e, "ranks", []))
            raise
        out: List[Any] = [None] * self.group_size
        for r, v in zip(members, got):
            out[r] = json.loads(v)
        return out

    def _exchange_current(self, key: str, payload: Any) -> Tuple[int, List[int], List[Any]]:
        """`_exchange` at the view in force, again at the new view while the view changes under
        it (every member sees the change and meets the others at the new epoch), until the
        group's timeout: `(epoch, members, payloads)`. Members beyond this buffer's ranks (a
        group extended after it was made) take no part."""
        g = self._elastic
        end = time.monotonic() + g._timeout.total_seconds()
        while True:
            epoch, members, fenced = g._elastic.view()
            if fenced or self.rank not in members:
                raise RuntimeError(f"tidewire.ep: rank {self.rank} is not in its group's view (epoch {epoch}, active {members})")
            members = [r for r in members if r < self.group_size]
            try:
                return epoch, members, self._exchange(key, payload, epoch, members)
            except _native.TidewireError as e:
                if getattr(e, "kind", "") != "ViewChanged" or time.monotonic() > end:
                    raise

    def _round(self, no_p2p: bool, nbytes: int) -> None:
        """One exchange with the elastic group's members (at construction and at each
        `update_ep_member`): every member's buffer and reach, the dispatch counters, and the
        ranks outside the view (mapped as absent: the kernels neither write to them nor wait
        for them). A member with no buffer (disable_p2p, no CUDA, or on the fallback already)
        sends every member to the fallback. The members meet first; at an update each then
        drops its buffer (`_release`) and the round maps new ones: nothing a process outside
        the new view writes through its old mappings reaches a buffer the new calls use."""
        epoch, members, infos = self._buffers_round(no_p2p, nbytes)
        unreached = [[r, why[:_REASON_CHARS]] for r, why in self._native.unreached()] if self._native is not None else []
        verdict = {"disable_p2p": bool(no_p2p), "no_cuda": self.device is None, "unreached": unreached[:8]}
        verdicts = self._exchange("reach", verdict, epoch, members)  # a change now fails the round
        self._rounds = {epoch: self._rounds.get(epoch, 0) + 1}  # earlier epochs' keys are done
        without = [r for r in members if infos[r] is None]
        self._decide(verdicts, f"ranks {without} have no EP buffer (on the fallback already)" if without else None)
        self._number_from(max([int(i[3]) for i in infos if i is not None] + [0]))
        self._mapped = [r for r in range(self.group_size) if infos[r] is not None or (self._native is None and r in members)]
        self._left, self._seen_epoch = [], epoch
        self._set_keep()

    def _buffers_round(self, no_p2p: bool, nbytes: int) -> Tuple[int, List[int], List[Any]]:
        """`_round`'s first two exchanges: the members meet (after which each drops a buffer it
        has), then exchange new buffers and map them: `(epoch, members, what each published)`.
        A change of the view meanwhile starts both again at the new view, until the group's
        timeout."""
        eng = _engine() if self.device is not None else None
        used = self._used() if eng is not None else 0
        end = time.monotonic() + self._elastic._timeout.total_seconds()
        while True:
            epoch, members, _ = self._exchange_current("release", None)
            if self._native is not None:
                nbytes = self._own[1]
                self._release(True)

            def publish(mine: Any, epoch: int = epoch, members: List[int] = members) -> List[Any]:
                return self._exchange("buffers", mine, epoch, members)

            try:
                if self._fallback is None and not no_p2p and eng is not None:
                    infos = self._publish_buffer(nbytes or self._own[1], used, members, publish)
                else:
                    infos = publish(None)
                return epoch, members, infos
            except _native.TidewireError as e:
                if getattr(e, "kind", "") != "ViewChanged" or time.monotonic() > end:
                    raise

    def _number_from(self, top: int) -> None:
        """The next call is numbered after `top` (the highest any rank used: a restarted rank
        counts from 0, and no signal of an earlier call may pass for one of the next); no call
        is open any more."""
        self._counter[0].fill_(top)
        self._counter[1].zero_()
        self._dispatches = top
        self._open.clear()
        self._seqs.clear()
        self._unreceived.clear()

    def _set_keep(self) -> None:
        """The mask applied to the caller's `active_ranks`: the ranks mapped and still in the
        view. Written in place into one tensor for the buffer's life (a call captured in a CUDA
        graph keeps applying it as it changes); never while a capture runs (the copy would be
        captured): `_agree` leaves a view change to the next call outside one."""
        out = set(range(self.group_size)) - set(self._mapped) | set(self._left)
        keep = torch.ones(self.group_size, dtype=torch.int32)
        keep[sorted(out)] = 0
        self._keep_dev.copy_(keep)
        self._keep_on = bool(out)

    def _agree(self, active: torch.Tensor) -> None:
        """Before a call: the kernels' verdicts go to the group and the group's to the call.
        Ranks the kernels marked inactive since the last call (deadline passed, process died)
        are reported to the group's membership as failed; ranks the group's view dropped are
        zeroed in the caller's `active_ranks` (with the ranks that take no part), so no call
        waits for them. No GPU synchronisation: the marks are host-mapped words.

        A rank whose signal named another shape of call (tokens per rank, hidden size, experts
        or fp8) was marked inactive by the kernels and none of its rows were read: the next
        call raises, naming it (a caller that goes on would lose its experts' work silently)."""
        if self._native is not None:
            odd = self._native.shape_marks()
            new_odd = [r for r, (n, seen) in enumerate(zip(odd, self._shapes_seen)) if n > seen]
            self._shapes_seen = list(odd)
            if new_odd:
                # Their marks are a configuration error, not a failure: not reported to the
                # group as failed ranks at the next call. (Only theirs: another rank's mark of
                # the same stretch is a failure, and is reported.)
                marks = self._native.marks()
                for r in new_odd:
                    self._marks_seen[r] = max(self._marks_seen[r], marks[r])
                raise RuntimeError(
                    f"tidewire.ep: rank {self.rank}: rank(s) {new_odd} called with another shape than this rank "
                    "(num_max_dispatch_tokens_per_rank, hidden, num_experts or use_fp8 differ): the kernels read "
                    "none of their rows and marked them inactive in active_ranks; every rank must pass the same"
                )
        g = self._elastic
        if g is not None:
            if self._native is not None:
                marks = self._native.marks()
                new = [r for r, (n, seen) in enumerate(zip(marks, self._marks_seen)) if n > seen]
                if new:
                    self._marks_seen = list(marks)
                    log.warning("tidewire.ep: rank %d: the kernels marked ranks %s inactive; told the group", self.rank, new)
                    g._failed(new)
            epoch = g._elastic.epoch()
            # A view change seen while a capture runs waits for the next call outside one (the
            # masks' copies would be captured; the epoch stays unseen until then).
            if epoch != self._seen_epoch and not (active.is_cuda and torch.cuda.is_current_stream_capturing()):
                # The group's own mask (a CUDA one is written at a call into the group, on the
                # caller's stream: this is one), often the tensor passed here.
                g._sync_mask()
                view_epoch, members, fenced = g._elastic.view()
                if fenced or self.rank not in members:
                    # Dropped while it was stopped or cut off: its calls would write into
                    # buffers the others no longer read (or worse, before they learn of it).
                    raise RuntimeError(
                        f"tidewire.ep: rank {self.rank} was removed from its group (epoch {view_epoch}, active "
                        f"{members}); its EP buffer takes part in nothing more"
                    )
                self._left = sorted(set(self._left) | (set(range(self.group_size)) - set(members)))
                self._seen_epoch = epoch
                self._set_keep()
        if self._keep_on:
            active.mul_(self._keep_dev)

    @staticmethod
    def get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
        return _native.EpBuffer.size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    def _check(self, t: torch.Tensor, what: str, dtype: torch.dtype) -> torch.Tensor:
        """`t` (argument `what`, e.g. "dispatch: x") on the buffer's device with `dtype`, made
        contiguous."""
        # (The messages are formatted only on the way out: this runs four times a call.)
        if self.device is None:
            if t.is_cuda:
                raise ValueError(f"tidewire.ep: rank {self.rank}, {what} must be a host tensor (this buffer has no CUDA device), not {t.device}")
        elif not t.is_cuda or t.get_device() != self.device:
            raise ValueError(f"tidewire.ep: rank {self.rank}, {what} must be on cuda:{self.device}, not {t.device}")
        if t.dtype is not dtype:
            raise TypeError(f"tidewire.ep: rank {self.rank}, {what} must be {dtype}, not {t.dtype}")
        return t.contiguous()

    def _check_active(self, active_ranks: torch.Tensor, op: str) -> torch.Tensor:
        """The caller's `active_ranks`: one int32 word per rank of the group, contiguous (the
        kernels read and clear every rank's word in place)."""
        active = self._check(active_ranks, op + ": active_ranks", torch.int32)
        if active is not active_ranks:
            raise ValueError(f"tidewire.ep: rank {self.rank}, {op}: active_ranks must be contiguous (the kernels write into it)")
        if active.shape != (self.group_size,):
            raise ValueError(
                f"tidewire.ep: rank {self.rank}, {op}: active_ranks {tuple(active.shape)} must be [{self.group_size}], "
                "one word per rank of the group"
            )
        return active

    def _check_aligned(self, t: torch.Tensor, what: str) -> None:
        """The kernels move rows 16 bytes at a time: `t` must start on a 16-byte boundary (a
        view at an odd offset would fault the kernel and lose the CUDA context)."""
        if t.data_ptr() % 16:
            raise ValueError(f"tidewire.ep: rank {self.rank}, {what} must start on a 16-byte boundary (address {t.data_ptr():#x})")

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
        x = self._check(x, "dispatch: x", torch.bfloat16)
        topk_idx = self._check(topk_idx, "dispatch: topk_idx", torch.int64)
        active = self._check_active(active_ranks, "dispatch")
        T, E, R = num_max_dispatch_tokens_per_rank, num_experts, self.group_size
        if x.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
            raise ValueError(f"tidewire.ep: x {tuple(x.shape)} and topk_idx {tuple(topk_idx.shape)} must be [tokens, H] and [tokens, k]")
        num_tokens, hidden = x.shape
        k = topk_idx.shape[1]
        el = E // R
        dev = x.device
        if E <= 0 or E % R or T <= 0 or num_tokens > T:
            raise ValueError(f"tidewire.ep: {num_tokens} tokens of at most {T}, {E} experts over {R} ranks (a positive multiple)")
        self._agree(active)
        if self._fallback is not None:
            packed, count, handle, event, hook = self._fallback_call(
                "dispatch", active, self._fallback.dispatch, self, x, topk_idx, active, T, E, fp8, async_finish, return_recv_hook
            )
            # (Its receive already ran: the hook keeps the kernels' rules all the same.)
            return packed, count, handle, event, self._dispatch_hook(handle[0].data_ptr(), "", hook)
        native = self._kernels()
        self._check_aligned(x, "dispatch: x")
        # The two halves of the buffer alternate between calls: a call may not start while the
        # previous call on its half has not launched its combine's receive half (its rows would
        # be overwritten).
        number = self._dispatches + 1
        pending = sorted(n for n in self._open if n % 2 == number % 2)
        if pending:
            raise RuntimeError(
                f"tidewire.ep: dispatch {number} would reuse the buffer half of dispatch {pending[0]}, "
                "whose combine (receive half included) has not run: at most two dispatches may be in flight"
            )
        stream = raw_stream(torch.cuda.current_device())
        if pending_other := [n for n, s in self._open.items() if s != stream]:
            # The send kernels number the calls from the buffer's counter: two of them running
            # at once (on two streams) would number them wrong.
            raise RuntimeError(
                f"tidewire.ep: dispatch {number} on stream {stream:#x} while dispatch {min(pending_other)} on stream "
                f"{self._open[min(pending_other)]:#x} is in flight: a buffer's dispatches run on one stream at a time"
            )
        seq = torch.empty(1, dtype=torch.int64, device=dev)
        shape = (T, hidden, R, E, seq.data_ptr(), num_tokens, k, self._timeout_ns(timeout_us), fp8)
        recv_x = torch.empty((el, R * T, hidden), dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=dev)
        # One fp32 scale per 128 channels per row, column-major (DeepEP's layout).
        scales = torch.empty((el, hidden // 128, R * T) if fp8 else (0,), dtype=torch.float32, device=dev)
        src_info = torch.empty((el, R * T), dtype=torch.int32, device=dev)
        layout_range = torch.empty((el, R), dtype=torch.int64, device=dev)
        recv_count = torch.empty((el,), dtype=torch.int32, device=dev)
        outs = (recv_x.data_ptr(), scales.data_ptr(), src_info.data_ptr(), layout_range.data_ptr(), recv_count.data_ptr())
        # One native call: the call is checked (a call a rank refuses is not numbered), numbered
        # on the GPU, sent (our own experts' rows straight into the outputs), and received
        # unless the caller's hook does that.
        native.dispatch(
            stream, shape, self._counter.data_ptr(), x.data_ptr(), topk_idx.data_ptr(), active.data_ptr(), outs, not return_recv_hook
        )
        self._dispatches = number
        self._open[number] = stream
        keep = (x, topk_idx, seq)
        if return_recv_hook:

            # The hook holds the output tensors (not just their addresses): the caller may drop
            # some (recv_count, the scales of a bf16 call) before it runs the hook, and their
            # memory must not go to another tensor before the receive kernel has written it.
            held = (recv_x, scales, src_info, layout_range, recv_count, seq)

            def launch() -> None:
                s = raw_stream(torch.cuda.current_device())
                native.dispatch_recv(s, shape, outs, active.data_ptr())
                _ = held  # named here, so the closure keeps the tensors until the hook runs

        hook = self._dispatch_hook(src_info.data_ptr(), f" {number}", launch if return_recv_hook else None)
        handle = (src_info, layout_range, T, hidden, E)
        self._seqs[src_info.data_ptr()] = (seq, num_tokens, k, number)
        event = EventOverlap(self._event() if async_finish else None, keep)
        packed = (recv_x, scales.transpose(1, 2)) if fp8 else recv_x
        return packed, recv_count, handle, event, hook

    def _dispatch_hook(self, key: int, label: str, launch: Optional[Callable[[], None]]) -> Optional[Callable[[], None]]:
        """The receive hook of the dispatch whose handle is `key`: `launch` once (a second
        launch would wait for signals no rank sends again, marking every rank inactive at its
        deadline, or read a half a newer call reuses); its combine is refused until then. None
        without `launch` (no hook asked for: a dropped dispatch whose hook never ran may have
        had its handle at this address, which is cleared)."""
        if launch is None:
            self._unreceived.discard(key)
            return None
        self._unreceived.add(key)

        def hook() -> None:
            if key not in self._unreceived:
                raise RuntimeError(
                    f"tidewire.ep: rank {self.rank}: dispatch{label}'s receive hook already ran (or the buffer was updated since)"
                )
            launch()
            self._unreceived.discard(key)

        return hook

    def _once(self, label: str, launch: Optional[Callable[[], None]]) -> Optional[Callable[[], None]]:
        """A combine's receive hook: `launch` once (None without `launch`)."""
        if launch is None:
            return None
        ran = [False]

        def hook() -> None:
            if ran[0]:
                raise RuntimeError(f"tidewire.ep: rank {self.rank}: the combine of dispatch{label}: its receive hook already ran")
            launch()
            ran[0] = True

        return hook

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
        if zero_copy and not self._zero_copy_logged:
            # DeepEP's zero_copy skips copying an input the caller wrote into the buffer itself;
            # this buffer hands out no such area, so the combine reads `x` as usual (same result).
            log.info("tidewire.ep: zero_copy combine reads its input in place like any combine (no buffer area is handed out)")
            self._zero_copy_logged = True
        src_info, layout_range, T, hidden, E = handle
        # The handle is used up only once its combine launched: a combine refused below (a bad
        # argument) leaves its dispatch open for a corrected one.
        key = src_info.data_ptr()
        if key not in self._seqs:
            raise ValueError(
                f"tidewire.ep: rank {self.rank}, combine: this handle's combine was already run, or the handle comes from "
                "another buffer or from before an update_ep_member (which ends every call in flight)"
            )
        seq, num_tokens, k, number = self._seqs[key]
        if key in self._unreceived:
            # Its layout and sources are not written yet: the combine would send rows an older
            # call's values select.
            raise RuntimeError(
                f"tidewire.ep: rank {self.rank}: combine of dispatch {number} before that dispatch's receive hook ran"
            )
        x = self._check(x, "combine: x", torch.bfloat16)
        topk_idx = self._check(topk_idx, "combine: topk_idx", torch.int64)
        topk_weights = self._check(topk_weights, "combine: topk_weights", torch.float32)
        active = self._check_active(active_ranks, "combine")
        R = self.group_size
        if tuple(x.shape) != (E // R, R * T, hidden):
            raise ValueError(f"tidewire.ep: combine input {tuple(x.shape)}, expected {(E // R, R * T, hidden)}")
        if tuple(topk_idx.shape) != (num_tokens, k) or tuple(topk_weights.shape) != (num_tokens, k):
            raise ValueError(
                f"tidewire.ep: topk_idx {tuple(topk_idx.shape)} and topk_weights {tuple(topk_weights.shape)} "
                f"must be the dispatch's [{num_tokens}, {k}]"
            )
        if out is None:
            out = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=x.device)
        elif (
            out.device != x.device
            or out.dtype != torch.bfloat16
            or tuple(out.shape) != (num_tokens, hidden)
            or not out.is_contiguous()
            or out.data_ptr() % 16
        ):
            raise ValueError(
                f"tidewire.ep: rank {self.rank}, combine: out must be a contiguous, 16-byte aligned bf16 "
                f"[{num_tokens}, {hidden}] tensor on {x.device} (got {out.dtype} {tuple(out.shape)} on {out.device})"
            )
        self._agree(active)
        if self._fallback is not None:
            out, event, hook = self._fallback_call(
                "combine", active, self._fallback.combine, self, x, topk_weights, seq, out, async_finish, return_recv_hook
            )
            del self._seqs[key]
            return out, event, self._once("", hook)
        native = self._kernels()
        self._check_aligned(x, "combine: x")
        shape = (T, hidden, R, E, seq.data_ptr(), num_tokens, k, self._timeout_ns(timeout_us), False)
        io = (x.data_ptr(), src_info.data_ptr(), layout_range.data_ptr(), topk_idx.data_ptr(), topk_weights.data_ptr(), out.data_ptr())
        stream = raw_stream(torch.cuda.current_device())
        native.combine(stream, shape, io, active.data_ptr(), not return_recv_hook)
        del self._seqs[key]
        hook: Optional[Callable[[], None]] = None
        if return_recv_hook:

            held = (x, src_info, layout_range, topk_idx, topk_weights, out, seq)

            def launch() -> None:
                s = raw_stream(torch.cuda.current_device())
                native.combine_recv(s, shape, io, active.data_ptr())
                _ = held  # named here, so the closure keeps the tensors until the hook runs
                self._open.pop(number, None)

            hook = self._once(f" {number}", launch)

        else:
            self._open.pop(number, None)
        event = EventOverlap(self._event() if async_finish else None, (x, topk_idx, topk_weights, seq))
        return out, event, hook

    def _fallback_call(self, op: str, active: torch.Tensor, fn: Any, *args: Any) -> Any:
        """A call over the group's collectives, counted in the EP metrics. One that fails naming
        ranks (dead, or silent past the group's timeout) writes them as 0 into the caller's
        `active_ranks` before raising: the next call skips them (the group re-forms over the
        others)."""
        ranks: List[int] = []
        try:
            return fn(*args)
        except Exception as e:
            ranks = [r for r in getattr(e, "ranks", []) if 0 <= r < active.numel()]
            if ranks:
                active[ranks] = 0
            raise
        finally:
            # The slow path (its split sizes cross to the host): reading the mask here costs
            # at most one more wait.
            if self._fallback_metrics is None:
                self._fallback_metrics = _native.EpFallbackMetrics(self.rank, self.group_size)
            self._fallback_metrics.counted(op, ranks, int((active != 0).sum()))

    def _event(self) -> Optional[torch.cuda.Event]:
        if self.device is None:
            return None  # host tensors: the call is done when it returns
        e = torch.cuda.Event()
        e.record(torch.cuda.current_stream())
        return e

    def update_ep_member(self) -> None:
        """Re-exchanges every rank's buffer and maps them again, and agrees on the next call's
        number. Every rank calls it, with no call in flight.

        Over an elastic group (``mooncake`` / ``mooncake-cpu``) it takes the group's view:
        the exchange goes through the group's membership at the epoch in force (not the store,
        which lives in one rank's process), ranks outside the view are mapped as absent (their
        `active_ranks` entry is zeroed by every call), and a rank restarted into its slot and
        added back to the group (whose new buffer makes the same exchange at its construction)
        is mapped again. Over any other group the exchange goes through the store, keyed by
        this process's update count: every rank must have made as many."""
        if self._destroyed:
            raise RuntimeError(f"tidewire.ep: rank {self.rank}: update_ep_member on a destroyed buffer")
        self._updates += 1
        if self.device is not None:
            # Every stream's calls on this buffer are done (not only the current stream's).
            torch.cuda.synchronize(self.device)
        if self._elastic is not None:
            self._round(False, 0)
            return
        if self._fallback is not None:
            return  # the collective fallback holds nothing of the peers
        # As over an elastic group: every rank meets the others, drops its buffer and maps new
        # ones (see `_release`).
        used = self._used()
        exchange(self.group, f"{self._tag}/update{self._updates}/release", None)
        self._release(True)
        infos = self._store_buffers(f"update{self._updates}", self._own[1], used)
        self._number_from(max(int(i[3]) for i in infos))

    def destroy(self) -> None:
        if self.device is not None:
            torch.cuda.current_stream().synchronize()
        self._release(False)
        self._destroyed = True
