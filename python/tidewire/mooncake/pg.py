"""`mooncake.pg`: Mooncake's torch.distributed names, on the tidewire backend.

`tidewire.mooncake.install()` registers the backends ``"mooncake"`` (cuda) and
``"mooncake-cpu"`` (cpu) on `tidewire.distributed`'s implementation and this module as
``mooncake.pg``, so code written for Mooncake PG runs unchanged::

    from mooncake.pg import MooncakeBackendOptions
    active = torch.ones(world_size, dtype=torch.int32)
    dist.init_process_group("mooncake-cpu", rank=r, world_size=n, pg_options=MooncakeBackendOptions(active))

What differs from Mooncake: a failed operation raises (naming the failed ranks in the
exception's ``ranks``) instead of completing over the survivors. ``get_local_success(work)``
and ``get_failed_ranks_hint(work)`` end the work first (a send or receive within the group's
timeout, a CUDA operation's stream waited for) and say whether it failed here and which ranks
its failure named; ``get_failed_ranks_hint(pg)`` gives the ranks of the group's last failure.

Membership is elastic: every group's ranks agree on the active ranks and an epoch with no fixed
coordinator (any rank may fail, rank 0 included). A rank is removed when a collective fails on
it (with ``auto_deactivate_on_failure``, the default), when the engine sees its process exit,
or when it has sent no heartbeat for the eviction timeout; ``deactivate_ranks`` removes ranks
at once, with no timeout. The mask (``get_active_ranks``, and the tensor given in the options)
is written in place: a CPU mask by the membership's thread as soon as this rank agrees to the
change, a CUDA mask at this rank's next call into the group. A
removed rank that comes back (after a stop) learns that it was removed. Settings:
``set_heartbeat_interval_us`` (100 ms), ``set_eviction_timeout_us`` (5 s),
``set_fault_reconciliation_window_us`` (20 ms), ``set_agreement_phase_timeout_us`` (2 s), or
``TIDEWIRE_PG_HEARTBEAT_US`` / ``_EVICTION_US`` / ``_RECONCILIATION_US`` / ``_PHASE_US``; they
apply to groups created afterwards.

After a change, every member re-forms the group's rings over the active ranks at its next call
(the new rings' addresses travel with the membership, not through the store, which may have
died with its rank) and every collective goes on over the survivors: buffers with a slot per
rank keep their shape, nothing is sent to an inactive rank and what would come from one is
zeros; roots and peers must be active. CUDA tensors take a new NVLink path over the active
ranks, formed at the next CUDA collective.

Joining: a process created with ``MooncakeBackendOptions(active, is_extension=True[,
max_group_size])`` (a replacement in a dead rank's slot, or a rank beyond the founders) works
alone until it is added; ``join_group(pg)`` says it waits and blocks until a view with it is
agreed (``set_join_timeout_us``, 300 s). Any active rank sees it with ``get_peer_state`` and
adds it with ``recover_ranks`` / ``activate_ranks`` (a ``ViewUpdateResponse`` whose
``status`` is a ``ProposalStatus``); the next call re-forms the group with it. Failure modes:
``auto_deactivate_on_failure=False`` leaves failed ranks in the view (only reported; no
eviction) until ``deactivate_ranks``; ``auto_sync_on_failure=False`` makes calls after a
change raise until ``sync_after_failure`` (a ``SyncAfterFailureResponse``). With a cluster
secret (``TIDEWIRE_CLUSTER_SECRET``) the membership's datagrams are sealed with it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os as _os
import time
from datetime import timedelta
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import distributed as _tw

__all__ = [
    "MooncakeBackendOptions",
    "ProposalStatus",
    "SyncAfterFailureResponse",
    "SyncAfterFailureStatus",
    "ViewUpdateResponse",
    "ViewUpdateStatus",
    "activate_ranks",
    "deactivate_ranks",
    "get_active_ranks",
    "get_current_epoch",
    "get_failed_ranks_hint",
    "get_local_success",
    "get_num_synced_ranks",
    "get_peer_state",
    "join_group",
    "recover_ranks",
    "set_agreement_phase_timeout_us",
    "set_collective_timeout_us",
    "set_device_filter",
    "set_eviction_timeout_us",
    "set_fault_reconciliation_window_us",
    "set_heartbeat_interval_us",
    "set_host_ip",
    "set_join_timeout_us",
    "set_p2p_timeout_us",
    "sync_after_failure",
]


#: Elastic membership's timeouts in microseconds (setters below; environment overrides).
_settings = {
    "heartbeat": int(_os.environ.get("TIDEWIRE_PG_HEARTBEAT_US", 100_000)),
    "eviction": int(_os.environ.get("TIDEWIRE_PG_EVICTION_US", 5_000_000)),
    "reconciliation": int(_os.environ.get("TIDEWIRE_PG_RECONCILIATION_US", 20_000)),
    "phase": int(_os.environ.get("TIDEWIRE_PG_PHASE_US", 2_000_000)),
    "join": int(_os.environ.get("TIDEWIRE_PG_JOIN_US", 300_000_000)),
    # 0: the timeout torch hands the group (init_process_group's / new_group's `timeout`).
    "collective": int(_os.environ.get("TIDEWIRE_PG_COLLECTIVE_TIMEOUT_US", 0)),
    # 0: point-to-point waits have the group's timeout.
    "p2p": int(_os.environ.get("TIDEWIRE_PG_P2P_TIMEOUT_US", 0)),
}


class ProposalStatus(enum.IntEnum):
    """How a membership change (``activate_ranks``, ``recover_ranks``, ``deactivate_ranks``)
    ended."""

    Rejected = 0
    Applied = 1
    AppliedWithDroppedRanks = 2


#: Mooncake's other name for it.
ViewUpdateStatus = ProposalStatus


class SyncAfterFailureStatus(enum.IntEnum):
    """How ``sync_after_failure`` ended."""

    Reconciled = 0
    NoPending = 1
    Rejected = 2


class ViewUpdateResponse(NamedTuple):
    """What a membership change returns: its status, the epoch in force after it, the ranks
    the view lost on the way (other than those asked for), and why it was rejected."""

    status: ProposalStatus
    new_epoch: int
    dropped_ranks: List[int]
    reject_reason: str


class SyncAfterFailureResponse(NamedTuple):
    status: SyncAfterFailureStatus
    reject_reason: str


def _set(name: str, us: int) -> None:
    if int(us) <= 0:
        raise ValueError(f"the {name} must be positive, not {us} µs")
    _settings[name] = int(us)


def set_heartbeat_interval_us(us: int) -> None:
    """How often every rank of a group tells the others it lives."""
    _set("heartbeat", us)


def set_eviction_timeout_us(us: int) -> None:
    """How long a rank may stay silent (no heartbeat) before it is removed: set it above the
    start-up time of the slowest rank."""
    _set("eviction", us)


def set_fault_reconciliation_window_us(us: int) -> None:
    """How long the agreement gathers the failures of one event before it proposes."""
    _set("reconciliation", us)


def set_join_timeout_us(us: int) -> None:
    """How long ``join_group`` waits to be added (300 s unless set): set it above the time the
    other ranks take to notice the joiner and call ``recover_ranks``."""
    _set("join", us)


def set_collective_timeout_us(us: int) -> None:
    """The timeout of groups created afterwards (every collective and point-to-point wait of
    the group, and its membership calls), instead of the one torch hands the backend (0: torch's
    again)."""
    if int(us) < 0:
        raise ValueError(f"the collective timeout must not be negative, not {us} µs")
    _settings["collective"] = int(us)


def set_p2p_timeout_us(us: int) -> None:
    """The deadline of each point-to-point wait (``isend``/``irecv``, ``work.wait()``) in groups
    created afterwards (0: the group's timeout). A wait past it fails the group, naming the
    peer, as a collective's does."""
    if int(us) < 0:
        raise ValueError(f"the p2p timeout must not be negative, not {us} µs")
    _settings["p2p"] = int(us)


def set_agreement_phase_timeout_us(us: int) -> None:
    """How long the agreement waits for a rank's answer (or a leader's progress) before it
    suspects it."""
    _set("phase", us)


def _group_id(peers: Sequence[str]) -> int:
    """A group's id from its founders' addresses (datagrams of other groups are dropped)."""
    return int.from_bytes(hashlib.sha256(json.dumps(list(peers)).encode()).digest()[:8], "little")


def _start_membership(
    pg: "_tw.ProcessGroupTidewire", rank: int, size: int, slots: int, mask: Optional[torch.Tensor], joiner: bool
) -> None:
    """Binds this rank's membership socket and starts the agreement. Founders (every rank of
    the group's creation) exchange addresses through the store and publish them, with the
    group's id, for later joiners; a joiner (a replacement in a dead rank's slot, or a rank
    beyond the founders) reads them and follows the group's views until it is added."""
    from .. import _native

    from .._store import exchange

    member = _native.ElasticMember(_tw.engine()._native, _tw._host)
    us = _settings
    timings = (us["heartbeat"] / 1e6, us["eviction"] / 1e6, us["reconciliation"] / 1e6, us["phase"] / 1e6)
    if joiner:
        founders = _wait_key(pg._store, "tidewire/elastic-founders", pg._timeout, rank)
        theirs = int(founders.get("slots", slots))
        peers = list(founders["peers"]) + [""] * (slots - len(founders["peers"]))
        if theirs != slots or len(peers) != slots or rank >= slots:
            # (The founders would drop its frames, from a slot they do not have, without a word.)
            raise ValueError(
                f"tidewire: rank {rank} joins a group of {theirs} slots (max_group_size at its creation); "
                f"its options say {slots}"
            )
        members = [r for r in range(int(founders["size"])) if r != rank]
        member.start(rank, peers, int(founders["id"]), 0, members, *timings, pg._auto_deactivate)
    else:
        peers = exchange(pg._store, rank, size, "tidewire/elastic", member.address, pg._timeout)
        gid = _group_id(peers)
        # Every founder writes the same value: whoever joins later finds it.
        pg._store.set(
            "tidewire/elastic-founders", json.dumps({"id": str(gid), "peers": peers, "size": size, "slots": slots})
        )
        member.start(rank, peers + [""] * (slots - size), gid, 0, list(range(size)), *timings, pg._auto_deactivate)
        if mask is not None and mask.device.type == "cpu" and mask.is_contiguous():
            # A host mask is written by the membership's thread as soon as the view changes (a
            # CUDA mask at the next call into the group: no CUDA call on the membership's thread).
            member.watch_mask(mask.data_ptr(), mask.numel())
    pg._elastic = member


def _wait_key(store: Any, key: str, timeout: timedelta, rank: int) -> Any:
    """The JSON under `key` in `store`, waited for at most `timeout`."""
    end = time.monotonic() + timeout.total_seconds()
    while not store.check([key]):
        if time.monotonic() > end:
            raise TimeoutError(
                f"tidewire: rank {rank} joins a group whose founders published no {key} within "
                f"{timeout.total_seconds():.1f} s (was the group created before, with the same store?)"
            )
        time.sleep(0.005)
    return json.loads(store.get(key))


class MooncakeBackendOptions:
    """Options of a ``mooncake`` / ``mooncake-cpu`` group. Two constructor families, as in
    Mooncake::

        MooncakeBackendOptions(active_ranks: int32 tensor[, is_extension[, max_group_size]])
        MooncakeBackendOptions(max_group_size: int[, is_extension[, auto_deactivate_on_failure,
                               auto_sync_on_failure]])

    ``active_ranks`` is the caller's tensor (CPU or CUDA); the backend writes membership into it
    in place. Not deactivating automatically while syncing automatically is refused.
    """

    def __init__(self, first: Any, is_extension: bool = False, *rest: Any) -> None:
        self.is_extension = bool(is_extension)
        self.auto_deactivate_on_failure = True
        self.auto_sync_on_failure = True
        if isinstance(first, torch.Tensor):
            if first.dim() != 1 or first.dtype != torch.int32:
                raise TypeError(f"active_ranks must be a 1-D int32 tensor, not {first.dtype} {tuple(first.shape)}")
            if len(rest) > 1:
                raise TypeError("MooncakeBackendOptions(active_ranks[, is_extension[, max_group_size]])")
            self.active_ranks: Optional[torch.Tensor] = first
            self.max_group_size = int(rest[0]) if rest else first.numel()
        elif isinstance(first, int):
            if len(rest) not in (0, 2):
                raise TypeError(
                    "MooncakeBackendOptions(max_group_size[, is_extension[, auto_deactivate_on_failure, "
                    "auto_sync_on_failure]])"
                )
            self.active_ranks = None
            self.max_group_size = first
            if rest:
                self.auto_deactivate_on_failure, self.auto_sync_on_failure = bool(rest[0]), bool(rest[1])
        else:
            raise TypeError(f"MooncakeBackendOptions: an int32 tensor or an int first, not {type(first).__name__}")
        if self.max_group_size < 1:
            raise ValueError(f"max_group_size {self.max_group_size} must be positive")
        if not self.auto_deactivate_on_failure and self.auto_sync_on_failure:
            raise ValueError(
                "auto_sync_on_failure=True needs auto_deactivate_on_failure=True (a failed rank must be "
                "deactivated before the survivors can sync)"
            )

    def __repr__(self) -> str:
        return (
            f"MooncakeBackendOptions(max_group_size={self.max_group_size}, is_extension={self.is_extension}, "
            f"auto_deactivate_on_failure={self.auto_deactivate_on_failure}, "
            f"auto_sync_on_failure={self.auto_sync_on_failure})"
        )


_device_filter: List[str] = []


def set_device_filter(names: Sequence[str]) -> None:
    """Mooncake restricts its RDMA devices with this; tidewire picks its paths itself, so the
    filter is recorded (``device_filter()``) and has no other effect."""
    global _device_filter
    _device_filter = list(names)


def device_filter() -> List[str]:
    return list(_device_filter)


def set_host_ip(ip: str) -> None:
    """The address this process's engine binds and publishes (before the first group)."""
    _tw.set_host_ip(ip)


def _pg(pg: Any) -> "_tw.ProcessGroupTidewire":
    pg = pg if pg is not None else dist.group.WORLD
    if not isinstance(pg, _tw.ProcessGroupTidewire):
        raise TypeError(f"not a tidewire / mooncake group: {pg!r}")
    return pg


def _sync_mask(g: "_tw.ProcessGroupTidewire") -> None:
    if g._active_ranks is None:
        g._active_ranks = torch.ones(g.size(), dtype=torch.int32)
    g._sync_mask()


def get_active_ranks(pg: Any = None) -> torch.Tensor:
    """The group's active-rank mask: the tensor given in its options (written in place), or a
    CPU int32 tensor, holding the view this rank has agreed to."""
    g = _pg(pg)
    _sync_mask(g)
    assert g._active_ranks is not None
    return g._active_ranks


def get_current_epoch(pg: Any = None) -> int:
    """The epoch of the view in force here (0 at creation, one more per change)."""
    g = _pg(pg)
    _sync_mask(g)
    return g._elastic.view()[0] if g._elastic is not None else 0


def get_peer_state(pg: Any, ranks: Sequence[int]) -> List[bool]:
    """For each rank, as far as this rank knows (no communication): an active rank, whether it
    lives (heard within the eviction timeout, its process not seen gone); a rank outside the
    view, whether a process in its slot waits to be added (it called ``join_group``)."""
    g = _pg(pg)
    if g._elastic is None:
        return [0 <= r < g.size() for r in ranks]
    dead = set(g.dead_ranks())
    active = set(g._elastic.view()[1])
    states = g._elastic.peer_states()
    out = []
    for r in ranks:
        r = int(r)
        if not 0 <= r < len(states):
            out.append(False)
        elif r in active:
            out.append(r not in dead and states[r][0])
        else:
            out.append(states[r][1])
    return out


def get_num_synced_ranks(pg: Any) -> int:
    """How many slots outside the view hold a process that waits to be added (what
    ``recover_ranks`` could activate now), as this rank knows (no communication)."""
    g = _pg(pg)
    if g._elastic is None:
        return 0
    active = set(g._elastic.view()[1])
    return sum(1 for r, (_, ready) in enumerate(g._elastic.peer_states()) if ready and r not in active)


def _outcome(work: Any) -> Optional[BaseException]:
    """Why `work` failed on this rank, or None: a send or receive is ended first (within the
    group's timeout), a CUDA operation's stream waited for; a collective on CPU tensors that
    failed raised at its call and returned no work."""
    outcome = getattr(work, "outcome", None)
    return outcome() if callable(outcome) else None


def get_local_success(work: Any) -> bool:
    """Whether the operation of `work` succeeded on this rank (ended first: see `_outcome`).
    Unlike Mooncake's, a failed operation also raises at its call or its wait."""
    return _outcome(work) is None


def get_failed_ranks_hint(work_or_pg: Any) -> List[int]:
    """The ranks a failed operation named (for a work, ended first: see `_outcome`), or the
    ranks of a group's last failure (for a group)."""
    if isinstance(work_or_pg, _tw.ProcessGroupTidewire):
        return work_or_pg.failed_ranks()
    e = _outcome(work_or_pg)
    return list(getattr(e, "ranks", [])) if e is not None else []


def _elastic_group(pg: Any, what: str) -> "_tw.ProcessGroupTidewire":
    g = _pg(pg)
    if g._elastic is None:
        raise RuntimeError(f"tidewire: {what}: this group has no elastic membership (a group of one rank)")
    return g


def _ranks(g: "_tw.ProcessGroupTidewire", ranks: Sequence[int], what: str) -> List[int]:
    out = sorted({int(r) for r in ranks})
    slots = len(g._elastic.peer_states())
    bad = [r for r in out if not 0 <= r < slots]
    if bad:
        raise ValueError(f"tidewire: {what}: ranks {bad} outside the group's {slots} slots")
    return out


def _wait_view(g: "_tw.ProcessGroupTidewire", done: Any, end: float) -> Tuple[int, List[int], bool, bool]:
    """Waits until the view's members satisfy `done`, this rank is fenced, or `end` (monotonic)
    passes: `(epoch, members, fenced, late)`."""
    epoch, members, fenced = g._elastic.view()
    while not fenced and not done(members):
        left = end - time.monotonic()
        if left <= 0:
            return epoch, members, fenced, True
        epoch, members, fenced = g._elastic.wait_view(epoch, left)
    return epoch, members, fenced, False


def activate_ranks(pg: Any, ranks: Sequence[int]) -> ViewUpdateResponse:
    """Adds `ranks` (processes that called ``join_group`` in those slots) to the group's view:
    waits for each to say it is ready, asks the group to add them, and returns once this rank
    has installed a view with them (``Applied``); ``Rejected`` with the reason when a rank is
    not ready, or no view with them is agreed, within the group's timeout. Any active rank may
    call it, one call is enough, and calling it for ranks already active changes nothing."""
    g = _elastic_group(pg, "activate_ranks")
    want = _ranks(g, ranks, "activate_ranks")
    end = time.monotonic() + g._timeout.total_seconds()
    epoch, members, fenced = g._elastic.view()
    before = set(members)
    if fenced:
        return ViewUpdateResponse(ProposalStatus.Rejected, epoch, [], f"rank {g.rank()} was removed from the group")
    while True:
        # Recomputed every pass: another rank's call may have added them meanwhile (and a
        # joiner stops saying it waits once it is added).
        epoch, members, fenced = g._elastic.view()
        missing = [r for r in want if r not in members]
        states = g._elastic.peer_states()
        waiting = [r for r in missing if not states[r][1]]
        if fenced or not waiting:
            break
        if time.monotonic() > end:
            return ViewUpdateResponse(
                ProposalStatus.Rejected, epoch, [],
                f"ranks {waiting} did not say they wait to be added (join_group) within the group's timeout",
            )
        time.sleep(0.002)
    if fenced:
        return ViewUpdateResponse(ProposalStatus.Rejected, epoch, [], f"rank {g.rank()} was removed from the group")
    if missing:
        try:
            g._elastic.request([], missing)
        except _tw._native.TidewireError as e:  # fenced meanwhile, or a rank not added yet
            return ViewUpdateResponse(ProposalStatus.Rejected, epoch, [], str(e))
    epoch, members, fenced, late = _wait_view(g, lambda m: set(want) <= set(m), end)
    if late:
        return ViewUpdateResponse(
            ProposalStatus.Rejected, epoch, [],
            f"no view with ranks {want} agreed within the group's timeout (the request stays pending: a later "
            "agreement may still add them)",
        )
    _sync_mask(g)
    if fenced:
        return ViewUpdateResponse(ProposalStatus.Rejected, epoch, [], f"rank {g.rank()} was removed from the group")
    dropped = sorted(before - set(members))
    status = ProposalStatus.AppliedWithDroppedRanks if dropped else ProposalStatus.Applied
    return ViewUpdateResponse(status, epoch, dropped, "")


def recover_ranks(pg: Any, ranks: Sequence[int]) -> ViewUpdateResponse:
    """The same as ``activate_ranks`` (Mooncake's name for bringing replacements back)."""
    return activate_ranks(pg, ranks)


def deactivate_ranks(pg: Any, ranks: Sequence[int]) -> ViewUpdateResponse:
    """Removes `ranks` from the group's view (a planned shrink: no timeout is waited for);
    returns once this rank has agreed to a view without them (``Applied``), ``Rejected`` after
    the group's timeout."""
    g = _elastic_group(pg, "deactivate_ranks")
    gone = set(_ranks(g, ranks, "deactivate_ranks"))
    epoch, members, _ = g._elastic.view()
    before = set(members)
    try:
        g._elastic.request(sorted(gone), [])
    except _tw._native.TidewireError as e:  # removed, not added yet, or a change that leaves no member
        return ViewUpdateResponse(ProposalStatus.Rejected, epoch, [], str(e))
    end = time.monotonic() + g._timeout.total_seconds()
    epoch, members, fenced, late = _wait_view(g, lambda m: not gone & set(m), end)
    if late:
        return ViewUpdateResponse(
            ProposalStatus.Rejected, epoch, [],
            f"no view without ranks {sorted(gone)} agreed within the group's timeout (the request stays pending: "
            "a later agreement may still remove them)",
        )
    if fenced and g.rank() not in gone:
        return ViewUpdateResponse(ProposalStatus.Rejected, epoch, [], f"rank {g.rank()} was removed from the group")
    _sync_mask(g)
    dropped = sorted(before - set(members) - gone)
    status = ProposalStatus.AppliedWithDroppedRanks if dropped else ProposalStatus.Applied
    return ViewUpdateResponse(status, epoch, dropped, "")


def join_group(pg: Any) -> None:
    """Called by a joining rank (created with ``is_extension=True``): tells the group it waits
    to be added, and blocks until a view with it is agreed (another rank calls
    ``recover_ranks``/``activate_ranks``), at most the join timeout (``set_join_timeout_us``,
    300 s); raises ``TimeoutError`` then, ``RuntimeError`` for a rank that is not joining."""
    g = _elastic_group(pg, "join_group")
    if not g._joining:
        raise RuntimeError(f"tidewire: join_group: rank {g.rank()} is not joining (created without is_extension=True, or added already)")
    g._elastic.set_ready()
    end = time.monotonic() + _settings["join"] / 1e6
    epoch, members, fenced, late = _wait_view(g, lambda m: g.rank() in m, end)
    if late or fenced:
        raise TimeoutError(
            f"tidewire: join_group: rank {g.rank()} was not added within {_settings['join'] / 1e6:.0f} s "
            f"(the group is at epoch {epoch} with ranks {members})"
        )
    g._joining = False
    mask = g._active_ranks
    if mask is not None and mask.device.type == "cpu" and mask.is_contiguous():
        g._elastic.watch_mask(mask.data_ptr(), mask.numel())
    g._mask_epoch = -1
    _sync_mask(g)


def sync_after_failure(pg: Any) -> SyncAfterFailureResponse:
    """Brings this rank's group in line with the agreed view after failures: waits (within the
    group's timeout) until ranks this rank saw fail are out of the view, then re-forms the
    group over the view's ranks. ``Reconciled`` if it changed anything, ``NoPending`` if the
    group was already formed over the view in force, ``Rejected`` (with the reason) if this
    rank was removed or the agreement did not finish in time."""
    g = _elastic_group(pg, "sync_after_failure")
    if g._joining:
        return SyncAfterFailureResponse(SyncAfterFailureStatus.Rejected, f"rank {g.rank()} was not added yet (join_group)")
    end = time.monotonic() + g._timeout.total_seconds()
    failed = (set(g.failed_ranks()) | set(g.dead_ranks())) if g._auto_deactivate else set()
    epoch, members, fenced, late = _wait_view(g, lambda m: not failed & set(m), end)
    if late:
        return SyncAfterFailureResponse(
            SyncAfterFailureStatus.Rejected, f"ranks {sorted(failed & set(members))} are still in the view"
        )
    if fenced:
        return SyncAfterFailureResponse(SyncAfterFailureStatus.Rejected, f"rank {g.rank()} was removed from the group")
    _sync_mask(g)
    if epoch == g._comm_epoch:
        return SyncAfterFailureResponse(SyncAfterFailureStatus.NoPending, "")
    g._reform(epoch, members)
    return SyncAfterFailureResponse(SyncAfterFailureStatus.Reconciled, "")


def _create(opts: Any, pg_options: Any = None, cuda: bool = True) -> "_tw.ProcessGroupTidewire":
    if pg_options is not None and not isinstance(pg_options, MooncakeBackendOptions):
        raise TypeError(f"pg_options of a mooncake group must be MooncakeBackendOptions, not {type(pg_options).__name__}")
    joiner = pg_options is not None and pg_options.is_extension
    slots = pg_options.max_group_size if pg_options is not None else opts.group_size
    if slots < opts.group_size:
        raise ValueError(f"max_group_size {slots} < group size {opts.group_size}")
    if joiner and opts.group_rank >= slots:
        raise ValueError(f"a joining rank {opts.group_rank} beyond max_group_size {slots}")
    timeout = opts.timeout
    if _settings["collective"]:
        timeout = timedelta(microseconds=_settings["collective"])
    pg = _tw.ProcessGroupTidewire(opts.store, opts.group_rank, opts.group_size, timeout, "mooncake", cuda, joiner=joiner)
    if _settings["p2p"]:
        pg._p2p_timeout_s = _settings["p2p"] / 1e6
        pg._comm.set_p2p_timeout(pg._p2p_timeout_s)
    if pg_options is not None:
        pg._active_ranks = pg_options.active_ranks
        pg._auto_deactivate = pg_options.auto_deactivate_on_failure
        pg._auto_sync = pg_options.auto_sync_on_failure
    if opts.group_size > 1 or slots > 1:
        _start_membership(pg, opts.group_rank, opts.group_size, slots, pg._active_ranks, joiner)
        if joiner:
            pg._mask_epoch = -1  # itself alone, written now
            _sync_mask(pg)
    return pg


def _create_cpu(opts: Any, pg_options: Any = None) -> "_tw.ProcessGroupTidewire":
    """A ``mooncake-cpu`` group: CPU tensors only, so no GPU buffer."""
    return _create(opts, pg_options, cuda=False)


def register_backends() -> None:
    """Registers ``mooncake`` (cuda) and ``mooncake-cpu`` (cpu) once."""
    plugins = dist.Backend._plugins  # type: ignore[attr-defined]
    if "MOONCAKE" not in plugins:
        dist.Backend.register_backend("mooncake", _create, extended_api=True, devices=["cuda"])
    if "MOONCAKE-CPU" not in plugins:
        dist.Backend.register_backend("mooncake-cpu", _create_cpu, extended_api=True, devices=["cpu"])
