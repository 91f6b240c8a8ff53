"""A GPU target process for test_gpu.py: an engine serving one tensor on one GPU.

    python gpu_peer.py DEVICE LENGTH SEED POOL [API]

POOL is "tidewire" (the tensor lives in `tidewire.mem_pool()`) or "torch" (PyTorch's caching
allocator: a sub-allocation of a cudaMalloc block). API is "native" (default: tidewire.Engine)
or "mooncake" (tidewire.mooncake.TransferEngine, protocol "nvlink", as SGLang drives it). The
tensor is filled from SEED. Prints one
JSON line {"name", "addr", "len", "reach", "allocation"} when ready, then answers on stdin:
`digest` (prints {"sha256": ...} of the tensor's bytes), `quit`.
"""

import contextlib
import hashlib
import json
import sys

import torch

import tidewire


def main() -> None:
    device, length, seed, pool_kind = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.cuda.set_device(device)
    pool = tidewire.mem_pool() if pool_kind == "tidewire" else None
    scope = torch.cuda.use_mem_pool(pool) if pool is not None else contextlib.nullcontext()
    with scope:
        data = torch.empty(length, dtype=torch.uint8, device=f"cuda:{device}")
    g = torch.Generator(device=f"cuda:{device}").manual_seed(seed)
    data.copy_(torch.randint(0, 256, (length,), dtype=torch.uint8, device=f"cuda:{device}", generator=g))
    torch.cuda.synchronize()
    api = sys.argv[5] if len(sys.argv) > 5 else "native"
    if api == "mooncake":
        serve_mooncake(data, length)
        return
    with tidewire.Engine() as engine:
        addr, n = engine.register(data)
        region = next(r for r in engine.descriptor()["regions"] if r["addr"] == addr)
        ready(engine.name, addr, n, [r["transport"] for r in region["reach"]], data)
        answer(data)


def serve_mooncake(data, length: int) -> None:
    from tidewire.mooncake import TransferEngine

    engine = TransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "nvlink", "") == 0
    assert engine.register_memory(data.data_ptr(), length) == 0
    ready(f"127.0.0.1:{engine.get_rpc_port()}", data.data_ptr(), length, [], data)
    answer(data)


def ready(name: str, addr: int, n: int, reach: list, data) -> None:
    print(json.dumps({
        "name": name,
        "addr": addr,
        "len": n,
        "reach": reach,
        "allocation": segment_allocation(data.data_ptr()),
    }), flush=True)


def answer(data) -> None:
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "digest":
            torch.cuda.synchronize()
            print(json.dumps({"sha256": hashlib.sha256(data.cpu().numpy().tobytes()).hexdigest()}), flush=True)
        elif cmd == "quit":
            break


def segment_allocation(ptr: int):
    """tidewire's record of the allocator segment holding `ptr` (None for PyTorch's own)."""
    for seg in torch.cuda.memory_snapshot():
        if seg["address"] <= ptr < seg["address"] + seg["total_size"]:
            return tidewire.allocation(seg["address"])
    return None


if __name__ == "__main__":
    main()
