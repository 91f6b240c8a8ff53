"""PyTorch memory in tidewire's transferable allocation.

A KV cache allocated with plain `torch.empty(..., device="cuda")` lives in `cudaMalloc`
memory, which peers reach through CUDA IPC only. Allocated through tidewire it is a VMM
allocation exportable as a POSIX file descriptor (and as a FABRIC handle where the
multi-node NVLink fabric is proven), so every NVLink transport the topology allows can
reach it:

    import torch, tidewire
    pool = tidewire.mem_pool()
    with torch.cuda.use_mem_pool(pool):
        kv = torch.empty(layers, pages, page_bytes, dtype=torch.uint8, device="cuda:0")
    engine.register(kv)

The allocator is the C-ABI pair `tidewire_alloc` / `tidewire_free` exported by
`tidewire._native`, loaded by `torch.cuda.memory.CUDAPluggableAllocator`. PyTorch is
imported only when these helpers are called.
"""

from __future__ import annotations

from typing import Any, Optional

from . import _native

#: The C symbols PyTorch loads from the native module.
ALLOC_SYMBOL = "tidewire_alloc"
FREE_SYMBOL = "tidewire_free"


def cuda_allocator() -> Any:
    """A `torch.cuda.memory.CUDAPluggableAllocator` over tidewire's transferable allocation."""
    import torch

    return torch.cuda.memory.CUDAPluggableAllocator(_native.__file__, ALLOC_SYMBOL, FREE_SYMBOL)


def mem_pool() -> Any:
    """A `torch.cuda.MemPool` whose tensors live in tidewire's transferable allocation.

    Use it with `torch.cuda.use_mem_pool(pool)`; needs a PyTorch with `MemPool` (2.6+)."""
    import torch

    if not hasattr(torch.cuda, "MemPool"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.cuda.MemPool (needs 2.6+)")
    return torch.cuda.MemPool(cuda_allocator().allocator())


def allocation(ptr: int) -> Optional[dict]:
    """The tidewire allocation starting at `ptr`: `{ptr, len, device, kind, reason}`, where
    kind is "vmm-fabric", "vmm-posix-fd", "cuda-malloc" or "host-pinned" and reason says why
    that kind; None when tidewire did not allocate `ptr`."""
    return _native.allocation(ptr)


def last_failure() -> Optional[str]:
    """Why the most recent `tidewire_alloc` / `tidewire_free` failed (PyTorch's out-of-memory
    error cannot carry it), or None."""
    return _native.last_allocation_failure()
