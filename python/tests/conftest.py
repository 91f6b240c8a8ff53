"""Shared fixtures: target processes, metadata servers, random data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Iterator, List

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


@pytest.fixture(params=["p2p", "http"])
def metadata(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both metadata backends: "P2PHANDSHAKE" or an HTTP metadata server's URL."""
    if request.param == "p2p":
        yield "P2PHANDSHAKE"
    else:
        server = tidewire.MetadataServer("127.0.0.1", 0)
        yield server.url
        server.stop()


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


def rand(n: int, seed: int) -> bytes:
    """`n` random bytes from `seed` (the same in peer.py)."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
