"""`mooncake.pg`: Mooncake's torch.distributed names, on the tidewire backend.

`tidewire.mooncake.install()` registers the backends ``"mooncake"`` (cuda) and
``"mooncake-cpu"`` (cpu) on `tidewire.distributed`'s implementation and this module as
``mooncake.pg``, so code written for Mooncake PG runs unchanged::

    from mooncake.pg import MooncakeBackendOptions
    active = torch.ones(world_size, dtype=torch.int32)
    dist.init_process_group("mooncake-cpu", rank=r, world_size=n, pg_options=MooncakeBackendOptions(active))

What differs from Mooncake: a failed operation raises (naming the failed ranks in the
exception's ``ranks``) instead of completing over the survivors, so every work this backend
returns succeeded: ``get_local_success(work)`` is True and ``get_failed_ranks_hint(work)``
empty; ``get_failed_ranks_hint(pg)`` gives the ranks of the group's last failure.

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
zeros; roots and peers must be active. CUDA tensors are staged through host memory from then
on. Not yet: joiners (``is_extension``, ``join_group``, ``activate_ranks``,
``recover_ranks``) and ``sync_after_failure``.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import distributed as _tw

__all__ = [
    "MooncakeBackendOptions",
    "activate_ranks",
    "deactivate_ranks",
    "get_active_ranks",
    "get_current_epoch",
    "get_failed_ranks_hint",
    "get_local_success",
    "get_peer_state",
    "join_group",
    "recover_ranks",
    "set_agreement_phase_timeout_us",
    "set_device_filter",
    "set_eviction_timeout_us",
    "set_fault_reconciliation_window_us",
    "set_heartbeat_interval_us",
    "set_host_ip",
    "sync_after_failure",
]

_ELASTIC = (
    "tidewire: {} (ranks joining a group) is not implemented yet: elastic membership removes ranks "
    "(failures, deactivate_ranks) but does not add them"
)

import os as _os

#: Elastic membership's timeouts in microseconds (setters below; environment overrides).
_settings = {
    "heartbeat": int(_os.environ.get("TIDEWIRE_PG_HEARTBEAT_US", 100_000)),
    "eviction": int(_os.environ.get("TIDEWIRE_PG_EVICTION_US", 5_000_000)),
    "reconciliation": int(_os.environ.get("TIDEWIRE_PG_RECONCILIATION_US", 20_000)),
    "phase": int(_os.environ.get("TIDEWIRE_PG_PHASE_US", 2_000_000)),
}


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


def set_agreement_phase_timeout_us(us: int) -> None:
    """How long the agreement waits for a rank's answer (or a leader's progress) before it
    suspects it."""
    _set("phase", us)


def _start_membership(pg: "_tw.ProcessGroupTidewire", rank: int, size: int, mask: Optional[torch.Tensor]) -> None:
    """Binds this rank's membership socket, exchanges addresses through the group's store
    (while every rank is there, at creation) and starts the agreement."""
    from .. import _native

    from .._store import exchange

    member = _native.ElasticMember(_tw._host)
    peers = exchange(pg._store, rank, size, "tidewire/elastic", member.address, pg._timeout)
    active = mask.cpu().tolist()[:size] if mask is not None else [1] * size
    members = [r for r, a in enumerate(active) if a]
    if rank not in members:
        raise NotImplementedError(_ELASTIC.format("a rank outside the initial mask"))
    us = _settings
    member.start(rank, peers, 0, members, us["heartbeat"] / 1e6, us["eviction"] / 1e6, us["reconciliation"] / 1e6, us["phase"] / 1e6)
    if mask is not None and mask.device.type == "cpu" and mask.is_contiguous():
        # A host mask is written by the membership's thread as soon as the view changes (a
        # CUDA mask at the next call into the group: no CUDA call on the membership's thread).
        member.watch_mask(mask.data_ptr(), mask.numel())
    pg._elastic = member


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
    """Whether each rank is alive and active, as far as this rank knows (no communication)."""
    g = _pg(pg)
    dead = set(g.dead_ranks())
    active = set(g._elastic.view()[1]) if g._elastic is not None else set(range(g.size()))
    return [r not in dead and r in active for r in ranks]


def get_local_success(work: Any) -> bool:
    """Every work this backend returns succeeded (a failure raises instead)."""
    return True


def get_failed_ranks_hint(work_or_pg: Any) -> List[int]:
    """The ranks of the last failure of a group (for a work: none, see the module's doc)."""
    if isinstance(work_or_pg, _tw.ProcessGroupTidewire):
        return work_or_pg.failed_ranks()
    return []


def activate_ranks(pg: Any, ranks: Sequence[int]) -> None:
    raise NotImplementedError(_ELASTIC.format("activate_ranks"))


def recover_ranks(pg: Any, ranks: Sequence[int]) -> None:
    raise NotImplementedError(_ELASTIC.format("recover_ranks"))


def deactivate_ranks(pg: Any, ranks: Sequence[int]) -> None:
    """Removes `ranks` from the group's view (a planned shrink: no timeout is waited for);
    returns once this rank has agreed to a view without them, or raises after the group's
    timeout."""
    import time

    g = _pg(pg)
    if g._elastic is None:
        raise RuntimeError("tidewire: this group has no elastic membership (a group of one rank)")
    gone = {int(r) for r in ranks}
    g._elastic.request(sorted(gone), [])
    end = time.monotonic() + g._timeout.total_seconds()
    epoch, members, fenced = g._elastic.view()
    while not fenced and gone & set(members):
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"tidewire: deactivate_ranks({sorted(gone)}): no agreement within the group's timeout")
        epoch, members, fenced = g._elastic.wait_view(epoch, left)
    _sync_mask(g)


def join_group(pg: Any) -> None:
    raise NotImplementedError(_ELASTIC.format("join_group"))


def sync_after_failure(pg: Any) -> None:
    raise NotImplementedError(_ELASTIC.format("sync_after_failure"))


def _create(opts: Any, pg_options: Any = None, cuda: bool = True) -> "_tw.ProcessGroupTidewire":
    if pg_options is not None and not isinstance(pg_options, MooncakeBackendOptions):
        raise TypeError(f"pg_options of a mooncake group must be MooncakeBackendOptions, not {type(pg_options).__name__}")
    if pg_options is not None and pg_options.is_extension:
        raise NotImplementedError(_ELASTIC.format("a joining rank (is_extension=True)"))
    pg = _tw.ProcessGroupTidewire(opts.store, opts.group_rank, opts.group_size, opts.timeout, "mooncake", cuda)
    if pg_options is not None:
        pg._active_ranks = pg_options.active_ranks
        pg._auto_deactivate = pg_options.auto_deactivate_on_failure
        if pg_options.max_group_size < opts.group_size:
            raise ValueError(f"max_group_size {pg_options.max_group_size} < group size {opts.group_size}")
    if opts.group_size > 1:
        _start_membership(pg, opts.group_rank, opts.group_size, pg._active_ranks)
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
