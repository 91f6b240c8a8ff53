"""`mooncake.ep`: the process-group names Mooncake's EP module re-exports
(`MooncakeBackendOptions`, `set_device_filter`), from `tidewire.mooncake.pg`.

The expert-parallel buffer itself (`mooncake.mooncake_ep_buffer.Buffer`) is not provided yet:
`import mooncake.mooncake_ep_buffer` still raises ModuleNotFoundError, so frameworks' EP feature
checks fall back."""

from __future__ import annotations

from .pg import MooncakeBackendOptions, set_device_filter

__all__ = ["MooncakeBackendOptions", "set_device_filter"]
