"""`mooncake.allocator` on tidewire: `NVLinkAllocator` and `MemoryBackend`.

SGLang's NVLink custom memory pool (`SGLANG_MOONCAKE_CUSTOM_MEM_POOL=NVLINK`) builds its KV
cache pool with exactly

    allocator = NVLinkAllocator.get_allocator(device)
    pool = torch.cuda.MemPool(allocator.allocator())

Mooncake answers with a `torch.cuda.memory.CUDAPluggableAllocator` over the
`mc_nvlink_malloc` / `mc_nvlink_free` symbols of its `nvlink_allocator.so`, cached per device.
Here it is the same kind of object over tidewire's `tidewire_alloc` / `tidewire_free`
(exported by `tidewire._native`; see `tidewire.allocator`): tensors in the pool live in
tidewire's transferable allocation (VMM memory exportable as a file descriptor, or as a fabric
handle where the multi-node NVLink fabric is proven), which every NVLink transport of the
engine reaches. PyTorch is imported only when an allocator is made.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import threading
from typing import Any, Dict, Optional

from .. import _native
from ..allocator import ALLOC_SYMBOL, FREE_SYMBOL, cuda_allocator

log = logging.getLogger("tidewire.mooncake")


class MemoryBackend(enum.IntEnum):
    """What memory the allocator hands out (Mooncake's names and values)."""

    USE_CUDAMALLOC = 0
    USE_CUMEMCREATE = 1
    UNKNOWN = -1


def device_index(device: Any) -> Optional[int]:
    """The CUDA device index of `device`: a `torch.device`, an int, or a string "cuda:N"
    ("cuda" alone, or a torch.device without an index, is the current device: None).

    Raises ValueError for a device that is not CUDA or a negative index, TypeError for
    anything else."""
    if isinstance(device, bool):
        raise TypeError(f"device must be a torch.device, an int or 'cuda:N', not {device!r}")
    if isinstance(device, int):
        index: Optional[int] = device
    elif isinstance(device, str):
        kind, sep, rest = device.strip().partition(":")
        if kind != "cuda" or (sep and not rest.strip().isdigit()):
            raise ValueError(f"device {device!r} is not a CUDA device ('cuda:N' or an index)")
        index = int(rest) if sep else None
    elif hasattr(device, "type") and hasattr(device, "index"):  # torch.device
        if device.type != "cuda":
            raise ValueError(f"device {device!r} is not a CUDA device")
        index = device.index
    else:
        raise TypeError(f"device must be a torch.device, an int or 'cuda:N', not {device!r}")
    if index is not None and index < 0:
        raise ValueError(f"device index {index} is negative")
    return index


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "mooncake.allocator.NVLinkAllocator needs PyTorch (it returns a "
            "torch.cuda.memory.CUDAPluggableAllocator for torch.cuda.MemPool); install torch"
        ) from e
    return torch


class NVLinkAllocator:
    """Mooncake's `NVLinkAllocator`: one PyTorch pluggable allocator per CUDA device."""

    _instances: Dict[int, Any] = {}
    _lock = threading.Lock()
    _backend: Optional[MemoryBackend] = None

    @classmethod
    def get_allocator(cls, device: Any) -> Any:
        """The `torch.cuda.memory.CUDAPluggableAllocator` for `device` (a torch.device, an int
        or "cuda:N"), made once per device; its `.allocator()` goes to `torch.cuda.MemPool`.

        Raises ImportError without PyTorch, ValueError or TypeError for a device that is not
        a CUDA device."""
        index = device_index(device)
        torch = _torch()
        if index is None:
            index = torch.cuda.current_device()
        with cls._lock:
            made = cls._instances.get(index)
            if made is None:
                made = cuda_allocator()
                cls._instances[index] = made
            return made

    @classmethod
    def detect_mem_backend(cls) -> MemoryBackend:
        """What `get_allocator`'s memory is, found once by allocating 2 MiB on cuda:0:
        USE_CUMEMCREATE for VMM memory (exportable to peers), USE_CUDAMALLOC when tidewire
        fell back to cudaMalloc, UNKNOWN when it cannot allocate (no GPU; the reason is
        logged)."""
        with cls._lock:
            if cls._backend is None:
                cls._backend = _probe_backend(0)
            return cls._backend


def _probe_backend(device: int) -> MemoryBackend:
    ok, why = _native.gpu_status()
    if not ok:
        log.info("detect_mem_backend: no GPU (%s)", why)
        return MemoryBackend.UNKNOWN
    lib = ctypes.CDLL(_native.__file__)
    alloc, free = getattr(lib, ALLOC_SYMBOL), getattr(lib, FREE_SYMBOL)
    alloc.restype, alloc.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    free.restype, free.argtypes = None, [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    size = 2 << 20
    ptr = alloc(size, device, None)
    if not ptr:
        log.warning("detect_mem_backend: cuda:%d: %s", device, _native.last_allocation_failure())
        return MemoryBackend.UNKNOWN
    try:
        info = _native.allocation(ptr)
    finally:
        free(ptr, size, device, None)
    kind = str(info["kind"]) if info else ""
    return MemoryBackend.USE_CUMEMCREATE if kind.startswith("vmm") else MemoryBackend.USE_CUDAMALLOC
