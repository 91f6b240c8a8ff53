"""The Pythonic API: arrays as memory and as descriptors, typed exceptions, async handles."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

import tidewire
from conftest import rand, run_in_threads


class DLPackOnly:
    """Exposes an array through DLPack alone (as a torch CPU tensor does)."""

    def __init__(self, array: np.ndarray) -> None:
        self._a = array

    def __dlpack__(self, *args, **kwargs):  # noqa: ANN
        return self._a.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):  # noqa: ANN
        return self._a.__dlpack_device__()


class FakeCuda:
    __cuda_array_interface__ = {"data": (0x7000_0000, False), "shape": (16,), "typestr": "<f4", "version": 3}


@pytest.fixture
def pair():
    with tidewire.Engine() as target, tidewire.Engine(force_tcp=True) as initiator:
        yield target, initiator


def test_numpy_and_dlpack_descriptors_move_every_byte(pair):
    target, initiator = pair
    n, block = 512, 4096
    remote = target.allocate_shared(n * block)
    data = np.frombuffer(rand(n * block, 11), dtype=np.uint8).copy()
    addr, length = initiator.register(data)
    assert length == n * block
    order = np.random.default_rng(1).permutation(n).astype(np.uint64)
    local_addrs = addr + np.arange(n, dtype=np.uint64) * block
    remote_addrs = remote + order * block
    initiator.write(target.name, local_addrs, remote_addrs, block)
    back = np.full(n * block, 0xA5, dtype=np.uint8)
    back_addr, _ = initiator.register(DLPackOnly(back))
    initiator.read(target.name, DLPackOnly(back_addr + np.arange(n, dtype=np.uint64) * block),
                   DLPackOnly(remote_addrs), np.full(n, block, dtype=np.uint64))
    assert np.array_equal(back, data)
    # Lists work too.
    initiator.write(target.name, [addr], [remote], [block])


def test_typed_exceptions(pair):
    target, initiator = pair
    remote = target.allocate_shared(8192)
    buf = np.zeros(8192, dtype=np.uint8)
    addr, _ = initiator.register(buf)
    with pytest.raises(tidewire.RemoteAccessDenied, match="denied access"):
        initiator.write(target.name, addr, remote + 4096, 8192)
    with pytest.raises(tidewire.NotRegistered):
        initiator.write(target.name, addr + 8192, remote, 16)
    with pytest.raises(tidewire.RegistrationError, match="overlaps"):
        initiator.register(addr, 16)
    if not tidewire.gpu_status()[0]:
        with pytest.raises(tidewire.InvalidArgument, match="CUDA memory cannot be registered: GPU unavailable"):
            initiator.register(FakeCuda())
    with pytest.raises(tidewire.InvalidArgument, match="read-only"):
        ro = np.zeros(16, dtype=np.uint8)
        ro.flags.writeable = False
        initiator.register(ro)
    with pytest.raises(tidewire.InvalidArgument, match="64-bit"):
        initiator.write(target.name, np.array([1], dtype=np.uint32), [remote], 16)
    with pytest.raises(tidewire.InvalidArgument, match="differ in length"):
        initiator.write(target.name, [addr, addr], [remote], [16, 16])
    with pytest.raises(tidewire.PeerUnreachable):
        initiator.write("127.0.0.1:1", addr, remote, 16)
    with pytest.raises(tidewire.InvalidArgument):
        initiator.submit(target.name, "copy", addr, remote, 16)
    assert issubclass(tidewire.Timeout, tidewire.TidewireError)


def test_async_handles_notifications_and_probe(pair):
    target, initiator = pair
    remote = target.allocate_shared(1 << 20)
    data = np.frombuffer(rand(1 << 20, 12), dtype=np.uint8).copy()
    addr, _ = initiator.register(data)
    batch = initiator.submit(target.name, "write", [addr], [remote], [1 << 20], notify=("done", "7"))
    assert batch.wait(timeout=10) is True
    assert batch.state() == "done" and batch.counts() == (1, 0, 0)
    assert batch.statuses() == [("done", None)]
    notes = []
    for _ in range(200):
        notes += target.notifications()
        if notes:
            break
        threading.Event().wait(0.01)
    assert notes == [tidewire.Notification(initiator.name, "done", "7")]
    assert initiator.probe(target.name) > 0
    desc = initiator.peer_descriptor(target.name)
    assert desc["name"] == target.name and desc["regions"][0]["addr"] == remote


def test_metadata_server_and_segment_not_found(metadata_server):
    with tidewire.Engine(metadata=metadata_server.url, name="prefill-0") as a:
        with pytest.raises(tidewire.SegmentNotFound):
            a.probe("decode-9")
        with pytest.raises(tidewire.MetadataError, match="already used"):
            tidewire.Engine(metadata=metadata_server.url, name="prefill-0")


def test_many_python_threads_share_one_engine(pair):
    target, initiator = pair
    remote = target.allocate_shared(16 << 16)
    data = np.frombuffer(rand(16 << 16, 13), dtype=np.uint8).copy()
    addr, _ = initiator.register(data)
    errors = []

    def worker(k: int) -> None:
        try:
            for _ in range(20):
                initiator.write(target.name, addr + (k << 16), remote + (k << 16), 1 << 16)
        except tidewire.TidewireError as e:
            errors.append(e)

    run_in_threads(worker)
    assert not errors
    back = np.zeros(16 << 16, dtype=np.uint8)
    baddr, _ = initiator.register(back)
    initiator.read(target.name, baddr, remote, 16 << 16)
    assert np.array_equal(back, data)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_gets_a_clear_error_and_no_deadlock():
    engine = tidewire.Engine()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not use (or join the threads of) the parent's engine
        try:
            engine.descriptor()
            os.write(w, b"used")
        except tidewire.TidewireError as e:
            os.write(w, b"error:" + str(e).encode()[:200])
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    msg = os.read(r, 512)
    assert status == 0
    assert msg.startswith(b"error:") and b"fork" in msg
    assert engine.descriptor()["name"] == engine.name, "the parent's engine still works"
    engine.shutdown()


def test_bad_timeouts_are_invalid_arguments_not_panics(pair):
    target, initiator = pair
    remote = target.allocate_shared(4096)
    src = np.zeros(4096, dtype=np.uint8)
    addr, _ = initiator.register(src)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(tidewire.InvalidArgument, match="timeout"):
            initiator.submit(target.name, "write", [addr], [remote], [4096], timeout=bad)
    batch = initiator.submit(target.name, "write", [addr], [remote], [4096])
    assert batch.wait(timeout=float("inf")) is True
    assert batch.wait(timeout=-5) is True


def test_a_cluster_secret_is_needed_on_both_sides(tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cret\n")
    with tidewire.Engine(cluster_secret="s3cret") as target, tidewire.Engine(
        force_tcp=True, cluster_secret_file=str(secret_file)
    ) as initiator, tidewire.Engine(force_tcp=True) as stranger:
        assert target.cluster_secret_fingerprint == initiator.cluster_secret_fingerprint
        assert stranger.cluster_secret_fingerprint is None
        remote = target.allocate_shared(4096)
        data = np.frombuffer(rand(4096, 5), dtype=np.uint8).copy()
        addr, _ = initiator.register(data)
        initiator.write(target.name, [addr], [remote], [4096])
        back = np.zeros(4096, dtype=np.uint8)
        back_addr, _ = initiator.register(back)
        initiator.read(target.name, [back_addr], [remote], [4096])
        assert np.array_equal(back, data)
        # Without the secret: refused, with the reason, and counted by the target.
        s_addr, _ = stranger.register(np.zeros(4096, dtype=np.uint8))
        with pytest.raises(tidewire.TidewireError, match="secret"):
            stranger.write(target.name, [s_addr], [remote], [4096])
        assert target.refused_connections >= 1
    with pytest.raises(tidewire.InvalidArgument):
        tidewire.Engine(cluster_secret="x", cluster_secret_file=str(secret_file))
