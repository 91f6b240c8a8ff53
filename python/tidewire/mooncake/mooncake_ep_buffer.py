"""`mooncake.mooncake_ep_buffer`: Mooncake EP's buffer, on `tidewire.ep`.

`Buffer` and `EventOverlap` are `tidewire.ep`'s (the same interface: `dispatch`, `combine`,
`get_ep_buffer_size_hint`, `return_recv_hook`, `active_ranks`, `timeout_us`, CUDA-graph
capture, `update_ep_member`, `zero_copy` accepted). What differs from Mooncake's is said in
`tidewire.ep`'s documentation."""

from __future__ import annotations

from ..ep import Buffer, EventOverlap

__all__ = ["Buffer", "EventOverlap"]
