"""GPU memory with torch (run on a GPU host by scripts/gpu-test.sh; skipped elsewhere with the
reason): classification and refusals, tidewire's PyTorch allocator, and torch tensors moved
between two processes (one GPU each) over NVLink with every byte checked."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import subprocess
import sys
import time

import numpy as np
import pytest

import tidewire
import tidewire.mooncake
from tidewire.mooncake import TransferEngine

torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)

GPU_PEER = os.path.join(os.path.dirname(__file__), "gpu_peer.py")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
needs_mem_pool = pytest.mark.skipif(
    not hasattr(torch.cuda, "use_mem_pool"), reason=f"torch {torch.__version__} has no MemPool"
)


def kinds(engine: tidewire.Engine) -> dict:
    return {r["addr"]: r["location"] for r in engine.descriptor()["regions"]}


def test_gpu_tensors_are_classified_from_the_pointer():
    with tidewire.Engine() as e:
        t = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda:0")
        addr, n = e.register(t)
        assert (addr, n) == (t.data_ptr(), 1 << 20)
        assert kinds(e)[addr] == {"kind": "device", "device": 0}
        # A sub-range of the caching allocator's block registers on its own too.
        view = t[4096:8192]
        e.unregister(addr)
        e.register(view.data_ptr(), 4096, "cuda:0")
        assert kinds(e)[view.data_ptr()]["kind"] == "device"
        pinned = torch.empty(1 << 16, dtype=torch.uint8, pin_memory=True)
        paddr, _ = e.register(pinned.data_ptr(), 1 << 16, "cpu")
        assert kinds(e)[paddr] == {"kind": "host_pinned", "device": None}
        assert tidewire.gpu_status()[0]


def test_contradicting_hints_name_both_sides():
    with tidewire.Engine() as e:
        t = torch.zeros(4096, dtype=torch.uint8, device="cuda:0")
        with pytest.raises(tidewire.RegistrationError, match=r"hint \"cpu\" but the pointer is device"):
            e.register(t.data_ptr(), 4096, "cpu")
        host = np.zeros(4096, dtype=np.uint8)
        with pytest.raises(tidewire.RegistrationError, match=r"hint \"cuda:0\" but the pointer is host pageable"):
            e.register(host.ctypes.data, 4096, "cuda:0")
        if torch.cuda.device_count() > 1:
            t1 = torch.zeros(4096, dtype=torch.uint8, device="cuda:1")
            with pytest.raises(tidewire.RegistrationError, match=r"cuda:0.*cuda:1"):
                e.register(t1.data_ptr(), 4096, "cuda:0")


def test_pinned_host_memory_moves_and_gpu_memory_is_refused_at_submit():
    with tidewire.Engine() as target, tidewire.Engine(force_tcp=True) as initiator:
        remote = target.allocate_shared(1 << 20)
        pinned = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8).pin_memory()
        initiator.register(pinned.data_ptr(), 1 << 20, "cpu")
        initiator.write(target.name, pinned.data_ptr(), remote, 1 << 20)
        back = np.full(1 << 20, 0xA5, dtype=np.uint8)
        initiator.register(back)
        initiator.read(target.name, back.ctypes.data, remote, 1 << 20)
        assert np.array_equal(back, pinned.numpy())
        gpu = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda:0")
        initiator.register(gpu)
        with pytest.raises(tidewire.NoTransport) as info:
            initiator.write(target.name, gpu.data_ptr(), remote, 4096)
        text = str(info.value)
        assert "tcp: no" in text and "nvlink: no" in text and "device" in text, text


def test_mooncake_api_returns_a_negative_code_for_gpu_memory(caplog):
    target = TransferEngine()
    assert target.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    remote = target.allocate_managed_buffer(1 << 20)
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    gpu = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda:0")
    assert e.register_memory(gpu.data_ptr(), 1 << 20) == 0
    with caplog.at_level(logging.ERROR, logger="tidewire.mooncake"):
        rc = e.transfer_sync_write(f"127.0.0.1:{target.get_rpc_port()}", gpu.data_ptr(), remote, 4096)
    assert rc < 0
    assert "no transport reaches" in caplog.text
    topo = json.loads(e.get_local_topology())
    assert "cpu:0" in topo


def readline(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    """One line from a child's stdout, or a test failure after `timeout` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"the GPU peer said nothing for {timeout} s"
    line = proc.stdout.readline()
    assert line, f"the GPU peer exited (code {proc.poll()})"
    return line


class GpuPeer:
    """python/tests/gpu_peer.py in a child process: a tensor on `device`, registered."""

    def __init__(self, device: int, length: int, seed: int, pool: str, api: str = "native") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, GPU_PEER, str(device), str(length), str(seed), pool, api],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        info = json.loads(readline(self.proc))
        self.name: str = info["name"]
        self.addr: int = info["addr"]
        self.len: int = info["len"]
        self.reach: list = info["reach"]
        self.allocation = info["allocation"]

    def digest(self) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write("digest\n")
        self.proc.stdin.flush()
        return json.loads(readline(self.proc))["sha256"]

    def __enter__(self) -> "GpuPeer":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


def tensor_in(pool_kind: str, n: int, device: str, pool=None):
    if pool_kind == "tidewire":
        with torch.cuda.use_mem_pool(pool):
            return torch.empty(n, dtype=torch.uint8, device=device)
    # A sub-allocation of PyTorch's caching allocator, not at its block's start.
    block = torch.empty(n + (1 << 20), dtype=torch.uint8, device=device)
    return block[1 << 20:]


@needs_mem_pool
def test_mem_pool_tensors_live_in_transferable_vmm_memory():
    pool = tidewire.mem_pool()
    with torch.cuda.use_mem_pool(pool):
        t = torch.empty(8 << 20, dtype=torch.uint8, device="cuda:0")
    seg = next(s for s in torch.cuda.memory_snapshot()
               if s["address"] <= t.data_ptr() < s["address"] + s["total_size"])
    info = tidewire.allocation(seg["address"])
    assert info is not None, tidewire.allocator.last_failure()
    assert info["kind"] in ("vmm-posix-fd", "vmm-fabric"), info
    assert info["device"] == 0 and info["len"] >= seg["total_size"] and info["reason"]
    with tidewire.Engine() as e:
        addr, _ = e.register(t)
        region = next(r for r in e.descriptor()["regions"] if r["addr"] == addr)
        assert region["location"] == {"kind": "device_vmm", "device": 0}
        assert "vmm_fd" in [r["transport"] for r in region["reach"]], region
    # Bad input reaches the caller: PyTorch raises its out-of-memory error and tidewire keeps
    # the driver's reason.
    with pytest.raises(RuntimeError):  # torch.cuda.OutOfMemoryError
        with torch.cuda.use_mem_pool(pool):
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda:0")
    assert "cuda:0" in (tidewire.allocator.last_failure() or "")
    del t


@needs_mem_pool
def test_mooncake_nvlink_allocator_feeds_a_mem_pool_of_tidewire_memory(mooncake_modules):
    """SGLang's SGLANG_MOONCAKE_CUSTOM_MEM_POOL=NVLINK path, call for call: the tensors of the
    pool are tidewire allocations every NVLink transport reaches."""
    tidewire.mooncake.install()
    from mooncake.allocator import MemoryBackend, NVLinkAllocator  # type: ignore[import-not-found]

    allocator = NVLinkAllocator.get_allocator(0)
    for same in (torch.device("cuda:0"), "cuda:0"):
        assert NVLinkAllocator.get_allocator(same) is allocator, same
    pool = torch.cuda.MemPool(allocator.allocator())
    with torch.cuda.use_mem_pool(pool):
        t = torch.empty(8 << 20, dtype=torch.uint8, device="cuda:0")
    t.fill_(7)
    torch.cuda.synchronize()
    seg = next(s for s in torch.cuda.memory_snapshot()
               if s["address"] <= t.data_ptr() < s["address"] + s["total_size"])
    info = tidewire.allocation(seg["address"])
    assert info is not None, tidewire.allocator.last_failure()
    assert info["kind"] in ("vmm-posix-fd", "vmm-fabric"), info
    assert info["device"] == 0 and info["len"] >= seg["total_size"]
    assert NVLinkAllocator.detect_mem_backend() == MemoryBackend.USE_CUMEMCREATE
    del t


@needs_two_gpus
@needs_mem_pool
@pytest.mark.parametrize("remote_pool", ["tidewire", "torch"])
@pytest.mark.parametrize("local_pool", ["tidewire", "torch"])
def test_torch_tensors_move_over_nvlink_both_ways(local_pool, remote_pool):
    n, page = 16 << 20, 4096
    pages = n // page
    with GpuPeer(1, n, seed=7, pool=remote_pool) as peer, tidewire.Engine() as e:
        assert peer.len == n
        assert peer.reach == (["vmm_fd"] if remote_pool == "tidewire" else ["cuda_ipc"]), peer.reach
        if remote_pool == "tidewire":
            assert peer.allocation["kind"].startswith("vmm"), peer.allocation
        pool = tidewire.mem_pool()
        src = tensor_in(local_pool, n, "cuda:0", pool)
        back = tensor_in(local_pool, n, "cuda:0", pool)
        src.zero_()
        back.fill_(0xA5)
        torch.cuda.synchronize()
        e.register(src)
        e.register(back)
        # Fill the source on the current stream without waiting: the write must be ordered
        # after it by the stream argument.
        g = torch.Generator(device="cuda:0").manual_seed(11)
        src.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda:0", generator=g))
        perm = np.random.default_rng(3).permutation(pages).astype(np.uint64)
        local = np.uint64(src.data_ptr()) + np.arange(pages, dtype=np.uint64) * np.uint64(page)
        remote = np.uint64(peer.addr) + perm * np.uint64(page)
        stream = torch.cuda.current_stream().cuda_stream
        e.write(peer.name, local, remote, page, stream=stream)
        expected = torch.empty_like(src)
        expected.view(pages, page)[torch.from_numpy(perm.astype(np.int64)).cuda()] = src.view(pages, page)
        assert peer.digest() == hashlib.sha256(expected.cpu().numpy().tobytes()).hexdigest()
        # Read every page back into poisoned memory, in the same scattered order.
        back_local = np.uint64(back.data_ptr()) + np.arange(pages, dtype=np.uint64) * np.uint64(page)
        e.read(peer.name, back_local, remote, page)
        assert torch.equal(back, src)
        # One large contiguous run (copy engine) and an odd-sized one at odd offsets.
        back.fill_(0xA5)
        torch.cuda.synchronize()
        e.read(peer.name, [back.data_ptr(), back.data_ptr() + (8 << 20) + 3],
               [peer.addr, peer.addr + (8 << 20) + 3], [8 << 20, 4093])
        assert torch.equal(back[: 8 << 20], expected[: 8 << 20])
        lo, hi = (8 << 20) + 3, (8 << 20) + 3 + 4093
        assert torch.equal(back[lo:hi], expected[lo:hi])
        assert bool((back[hi:] == 0xA5).all()) and bool((back[8 << 20:lo] == 0xA5).all())


@needs_two_gpus
@needs_mem_pool
def test_mooncake_api_moves_kv_pages_between_gpus_over_nvlink():
    """SGLang's disaggregation path: both sides drive `mooncake.engine.TransferEngine` with
    protocol "nvlink", KV caches in tidewire's pool, pages written from the prefill GPU to the
    decode GPU with batch_transfer_sync_write, then read back."""
    n, page = 8 << 20, 16384
    pages = n // page
    with GpuPeer(1, n, seed=9, pool="tidewire", api="mooncake") as peer:
        e = TransferEngine()
        assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "nvlink", "") == 0
        pool = tidewire.mem_pool()
        src = tensor_in("tidewire", n, "cuda:0", pool)
        back = tensor_in("tidewire", n, "cuda:0", pool)
        g = torch.Generator(device="cuda:0").manual_seed(5)
        src.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda:0", generator=g))
        back.fill_(0xA5)
        torch.cuda.synchronize()
        assert e.register_memory(src.data_ptr(), n) == 0
        assert e.register_memory(back.data_ptr(), n) == 0
        perm = [int(x) for x in np.random.default_rng(4).permutation(pages)]
        locals_ = [src.data_ptr() + i * page for i in range(pages)]
        remotes = [peer.addr + p * page for p in perm]
        assert e.batch_transfer_sync_write(peer.name, locals_, remotes, [page] * pages) == 0
        expected = torch.empty_like(src)
        expected.view(pages, page)[torch.tensor(perm, device="cuda:0")] = src.view(pages, page)
        assert peer.digest() == hashlib.sha256(expected.cpu().numpy().tobytes()).hexdigest()
        backs = [back.data_ptr() + i * page for i in range(pages)]
        assert e.batch_transfer_sync_read(peer.name, backs, remotes, [page] * pages) == 0
        assert torch.equal(back, src)
        # Out of the peer's region: a negative code, the target untouched.
        assert e.transfer_sync_write(peer.name, src.data_ptr(), peer.addr + n - 100, 4096) < 0
        assert peer.digest() == hashlib.sha256(expected.cpu().numpy().tobytes()).hexdigest()


@needs_two_gpus
@needs_mem_pool
@pytest.mark.parametrize("remote_pool", ["tidewire", "torch"])
def test_a_killed_peers_gpu_memory_comes_back_and_its_later_writes_fail(remote_pool):
    # The scenario of a decode node that restarts: 256 MiB on cuda:1 in the peer's pool,
    # SIGKILLed while we write to it. Our import must not keep its memory allocated.
    n = 256 << 20
    free_before, _ = torch.cuda.mem_get_info(1)
    with tidewire.Engine() as e:
        peer = GpuPeer(1, n, seed=21, pool=remote_pool)
        try:
            src = tensor_in("tidewire", n, "cuda:0", tidewire.mem_pool())
            src.fill_(7)
            torch.cuda.synchronize()
            e.register(src)
            e.write(peer.name, src.data_ptr(), peer.addr, n)
            (status,) = [p for p in e.peers() if p.name == peer.name]
            assert status.state == "open" and status.mappings > 0, status
            peer.proc.kill()
            peer.proc.wait()
            killed = time.time()
            with pytest.raises(tidewire.PeerFailed, match="the peer process exited"):
                e.write(peer.name, src.data_ptr(), peer.addr, n)
            assert time.time() - killed < 1.0
            deadline = time.time() + 10
            while time.time() < deadline:
                (status,) = [p for p in e.peers() if p.name == peer.name]
                if status.mappings == 0 and torch.cuda.mem_get_info(1)[0] + (64 << 20) >= free_before:
                    break
                time.sleep(0.05)
            assert status.state == "retired" and status.mappings == 0, status
            free_after, _ = torch.cuda.mem_get_info(1)
            assert free_after + (64 << 20) >= free_before, (free_before, free_after)
        finally:
            peer.proc.kill()
            peer.proc.wait()


@needs_two_gpus
@needs_mem_pool
def test_complete_on_orders_the_callers_stream_after_the_copies():
    # 256 MiB read from the peer into poisoned memory, then, on the same stream and without
    # any host wait, a clone: it must see every byte (the stream waits on the batch's event).
    n = 256 << 20
    with GpuPeer(1, n, seed=31, pool="tidewire") as peer, tidewire.Engine() as e:
        pool = tidewire.mem_pool()
        back = tensor_in("tidewire", n, "cuda:0", pool)
        back.fill_(0xA5)
        torch.cuda.synchronize()
        e.register(back)
        stream = torch.cuda.current_stream().cuda_stream
        expected = peer.digest()
        for _ in range(3):
            back.fill_(0xA5)  # queued on the stream; the read starts after it
            batch = e.submit(peer.name, "read", back.data_ptr(), peer.addr, n, stream=stream,
                             complete_on=stream)
            seen = back.clone()  # queued on the stream after the batch: waits for it on the GPU
            torch.cuda.synchronize()
            assert hashlib.sha256(seen.cpu().numpy().tobytes()).hexdigest() == expected
            batch.wait(timeout=30)
            assert batch.state() == "done"
