"""`mooncake.ep`: the process-group names Mooncake's EP module re-exports
(`MooncakeBackendOptions`, `set_device_filter`), from `tidewire.mooncake.pg`. The buffer itself
is `mooncake.mooncake_ep_buffer` (`tidewire.mooncake.mooncake_ep_buffer`)."""

from __future__ import annotations

from .pg import MooncakeBackendOptions, set_device_filter

__all__ = ["MooncakeBackendOptions", "set_device_filter"]
