"""The Mooncake-compatible layer: Mooncake's Python package, module for module, on tidewire.

Submodules mirror Mooncake's import paths, so code written for Mooncake runs unchanged once
`install()` has registered them under the name `mooncake`:

- `tidewire.mooncake.engine` is `mooncake.engine`: `TransferEngine`, `TransferOpcode`,
  `TransferNotify` (also importable from here).
- `tidewire.mooncake.allocator` is `mooncake.allocator`: `NVLinkAllocator`, whose
  `get_allocator(device).allocator()` feeds `torch.cuda.MemPool` (SGLang's
  `SGLANG_MOONCAKE_CUSTOM_MEM_POOL=NVLINK`) with tidewire's transferable GPU allocation.

- `tidewire.mooncake.pg` is `mooncake.pg` (with torch installed): `MooncakeBackendOptions`,
  `get_active_ranks`, `get_peer_state`, ...; `install()` also registers the torch.distributed
  backends ``"mooncake"`` and ``"mooncake-cpu"`` on `tidewire.distributed`.
- `tidewire.mooncake.ep` is `mooncake.ep`'s process-group names (`MooncakeBackendOptions`,
  `set_device_filter`).

- `tidewire.mooncake.mooncake_ep_buffer` is `mooncake.mooncake_ep_buffer` (with torch):
  `Buffer` and `EventOverlap` from `tidewire.ep` (dispatch and combine over NVLink).

    from tidewire.mooncake import install
    install()
    from mooncake.engine import TransferEngine          # tidewire's
    from mooncake.allocator import NVLinkAllocator      # tidewire's
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from . import allocator, engine
from .engine import TransferEngine, TransferNotify, TransferOpcode

__all__ = ["SUBMODULES", "TransferEngine", "TransferNotify", "TransferOpcode", "allocator", "engine", "install"]

#: The submodules this package provides, each registered as `mooncake.<name>` by `install()`.
SUBMODULES = ("engine", "allocator")
#: The submodules that need torch, registered by `install()` when torch imports.
TORCH_SUBMODULES = ("pg", "ep", "mooncake_ep_buffer")


def install() -> types.ModuleType:
    """Registers every submodule in `SUBMODULES` as `mooncake.<name>` in sys.modules (and a
    `mooncake` package, if none is imported yet), so `import mooncake.engine` and
    `from mooncake.allocator import NVLinkAllocator` load tidewire. Calling it again is
    harmless. Returns the `mooncake.engine` module.

    An already imported `mooncake` package (Mooncake's own) is kept: only the submodules above
    are replaced in it, its other submodules stay Mooncake's."""
    pkg = sys.modules.get("mooncake")
    if pkg is None:
        pkg = types.ModuleType("mooncake", __doc__)
        pkg.__path__ = []  # a package, so `import mooncake.engine` resolves
        sys.modules["mooncake"] = pkg
    names = list(SUBMODULES)
    if importlib.util.find_spec("torch") is not None:
        names += TORCH_SUBMODULES
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        setattr(pkg, name, module)
        sys.modules[f"mooncake.{name}"] = module
    if "pg" in names:
        sys.modules["mooncake.pg"].register_backends()
    return engine
