"""Shared fixtures: target processes, metadata servers, random data."""

from __future__ import annotations

import json
import os
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator, List

import numpy as np
import pytest

import tidewire

PEER = os.path.join(os.path.dirname(__file__), "peer.py")


class Target:
    """A target engine in a child process (python/tests/peer.py)."""

    def __init__(self, metadata: str, name: str, length: int, seed: int) -> None:
        self.seed = seed
        self.proc = subprocess.Popen(
            [sys.executable, PEER, metadata, name, str(length), str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        info = json.loads(line)
        assert "error" not in info, info
        self.name: str = info["name"]
        self.addr: int = info["addr"]
        self.len: int = info["len"]

    def initial(self) -> bytes:
        return rand(self.len, self.seed)

    def notifies(self) -> List[List[str]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("notifies\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def freeze_and_kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def metadata_server() -> Iterator[tidewire.MetadataServer]:
    server = tidewire.MetadataServer("127.0.0.1", 0)
    yield server
    server.stop()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(params=["p2p", "http", "etcd"])
def metadata(request: pytest.FixtureRequest) -> Iterator[str]:
    """Metadata backends: "P2PHANDSHAKE", an HTTP metadata server's URL, or a private etcd."""
    if request.param == "p2p":
        yield "P2PHANDSHAKE"
    elif request.param == "http":
        server = tidewire.MetadataServer("127.0.0.1", 0)
        yield server.url
        server.stop()
    else:
        etcd = os.environ.get("TIDEWIRE_ETCD_BIN") or shutil.which("etcd")
        if not etcd:
            pytest.skip("etcd is not installed (scripts/test.sh installs it)")
        client, peer = _free_port(), _free_port()
        with tempfile.TemporaryDirectory(prefix="tidewire-etcd-") as d:
            proc = subprocess.Popen(
                [etcd, f"--data-dir={d}", f"--listen-client-urls=http://127.0.0.1:{client}",
                 f"--advertise-client-urls=http://127.0.0.1:{client}", f"--listen-peer-urls=http://127.0.0.1:{peer}",
                 f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}", f"--initial-cluster=default=http://127.0.0.1:{peer}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            try:
                deadline = time.time() + 15
                while time.time() < deadline:
                    try:
                        socket.create_connection(("127.0.0.1", client), timeout=0.2).close()
                        break
                    except OSError:
                        time.sleep(0.05)
                time.sleep(0.5)
                yield f"etcd://127.0.0.1:{client}"
            finally:
                proc.kill()
                proc.wait()


@pytest.fixture
def make_target() -> Iterator:
    made: List[Target] = []

    def make(metadata: str = "P2PHANDSHAKE", length: int = 1 << 22, seed: int = 1, name: str = "") -> Target:
        # With a metadata server the name is also the host to bind (Mooncake's local_hostname).
        t = Target(metadata, name or f"127.0.0.1:{30000 + os.getpid() % 10000 + 11 * len(made)}", length, seed)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


@pytest.fixture
def mooncake_modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No `mooncake` package or submodule in sys.modules during the test, and those the test
    registered (tidewire.mooncake.install()) removed after it, the earlier ones restored."""
    def ours() -> List[str]:
        return [n for n in sys.modules if n == "mooncake" or n.startswith("mooncake.")]

    for name in ours():
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in ours():
        del sys.modules[name]


def run_in_threads(worker: Callable[[int], None], n: int = 16, timeout: float = 60.0) -> None:
    """Runs `worker(k)` for k in range(n) on n threads; fails if one is still running after
    `timeout` seconds."""
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + timeout
    for th in threads:
        th.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = sum(th.is_alive() for th in threads)
    assert stuck == 0, f"{stuck} of {n} threads still running after {timeout} s"


def rand(n: int, seed: int) -> bytes:
    """`n` random bytes from `seed` (the same in peer.py)."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
