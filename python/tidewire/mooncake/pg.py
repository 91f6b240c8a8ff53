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
empty; ``get_failed_ranks_hint(pg)`` gives the ranks of the group's last failure. The calls that
change membership (``activate_ranks``, ``recover_ranks``, ``deactivate_ranks``, ``join_group``,
``sync_after_failure``) come with elastic membership and raise ``NotImplementedError`` until
then.
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
    "get_failed_ranks_hint",
    "get_local_success",
    "get_peer_state",
    "join_group",
    "recover_ranks",
    "set_device_filter",
    "set_host_ip",
    "sync_after_failure",
]

_ELASTIC = (
    "tidewire: {} changes group membership, which comes with elastic membership "
    "(not implemented yet); the group keeps its ranks"
)


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


def get_active_ranks(pg: Any = None) -> torch.Tensor:
    """The group's active-rank mask: the tensor given in its options (written in place), or a
    CPU int32 tensor of ones."""
    g = _pg(pg)
    if g._active_ranks is None:
        g._active_ranks = torch.ones(g.size(), dtype=torch.int32)
    return g._active_ranks


def get_peer_state(pg: Any, ranks: Sequence[int]) -> List[bool]:
    """Whether each rank's process is alive, as far as this rank knows (no communication)."""
    dead = set(_pg(pg).dead_ranks())
    return [r not in dead for r in ranks]


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
    raise NotImplementedError(_ELASTIC.format("deactivate_ranks"))


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
        if pg_options.max_group_size < opts.group_size:
            raise ValueError(f"max_group_size {pg_options.max_group_size} < group size {opts.group_size}")
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
