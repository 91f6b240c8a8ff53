"""Every rank's value through a group's store, with a deadline that names the missing ranks."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any, List


def exchange(store: Any, rank: int, size: int, key: str, payload: Any, timeout: timedelta) -> List[Any]:
    """Every rank's `payload` (JSON-able), by rank: ours is set under `key/<rank>`, then every
    other rank's is waited for. A rank that has not published within `timeout` is named in the
    `TimeoutError`."""
    keys = [f"{key}/{r}" for r in range(size)]
    store.set(keys[rank], json.dumps(payload))
    deadline = time.monotonic() + timeout.total_seconds()
    missing = [r for r in range(size) if r != rank]
    while missing:
        missing = [r for r in missing if not store.check([keys[r]])]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"tidewire: rank {rank}: rank(s) {missing} of {size} published no {key} within "
                f"{timeout.total_seconds():.1f} s"
            )
        time.sleep(0.002)
    return [json.loads(store.get(k)) for k in keys]
