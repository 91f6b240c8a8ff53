"""`mooncake.mooncake_ep_buffer`: Mooncake EP's buffer, on `tidewire.ep`.

`Buffer` and `EventOverlap` are `tidewire.ep`'s (the same interface: `dispatch`, `combine`,
`get_ep_buffer_size_hint`, `return_recv_hook`, `active_ranks`, `timeout_us`). What differs from
Mooncake's, said in `tidewire.ep`'s documentation: CUDA-graph capture raises
NotImplementedError instead of running, `update_ep_member` comes with elastic membership."""

from __future__ import annotations

from ..ep import Buffer, EventOverlap

__all__ = ["Buffer", "EventOverlap"]
