"""GPU memory classification and refusals (run on a GPU host by scripts/gpu-test.sh; skipped
elsewhere with the reason). The NVLink transports are not built yet: GPU memory registers
with its true kind, and requests on it fail at submit naming every transport's refusal."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

import tidewire
from tidewire.mooncake import TransferEngine

torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)


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
