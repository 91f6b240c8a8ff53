"""The command line of a rank script (pg_rank.py, ep_rank.py), started by run_group in
test_distributed.py: `SCRIPT BODY RANK SIZE PORT [ARG]`; prints one JSON line with the body's
result ({"ok": ...}) or the traceback ({"error": ...})."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import traceback
from typing import Any, Callable, Dict


def gpu_of(index: int) -> int:
    """The GPU a rank uses: its own index, or with `TIDEWIRE_TEST_SHARED_GPU=1` (a host with one
    GPU; checks correctness, not speed) the index modulo the GPUs there."""
    import torch

    if os.environ.get("TIDEWIRE_TEST_SHARED_GPU") == "1":
        return index % max(1, torch.cuda.device_count())
    return index


def gpus_for_two_ranks() -> bool:
    """Whether this host runs two ranks on GPUs: two of them, or one shared with
    `TIDEWIRE_TEST_SHARED_GPU=1`."""
    import torch

    shared = os.environ.get("TIDEWIRE_TEST_SHARED_GPU") == "1"
    return torch.cuda.is_available() and torch.cuda.device_count() >= (1 if shared else 2)


def main(bodies: Dict[str, Callable[[int, int, int, str], Any]], hard_exit: bool = False) -> None:
    """Runs the body; with `hard_exit` the process then ends at once (no teardown of a group
    whose peer is gone)."""
    body, rank, size, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    arg = sys.argv[5] if len(sys.argv) > 5 else ""
    # A rank still running at its test's deadline is asked where it is (SIGUSR1: every
    # thread's Python stack to stderr) before it is killed.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        result = bodies[body](rank, size, port, arg)
        print(json.dumps({"ok": result}), flush=True)
    except Exception:  # noqa: BLE001
        print(json.dumps({"error": traceback.format_exc()}), flush=True)
    if hard_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
