"""Runs one body of the test suites' rank programs on R ranks (python/tests/pg_rank.py or
ep_rank.py, their own checks) under the tests' watchdog, and prints each rank's result:

    R=8 python bench/rank_group.py BODY ARG DEADLINE_S SCRIPT EXPECT_DEAD

SCRIPT is `pg_rank` or `ep_rank`; EXPECT_DEAD the rank the body kills (-1: none). Every rank
still running at the deadline is killed, and the line says FAILED with what the ranks printed.
For the GPU-host scripts (bench/gpu-multi.sh) and one-off device calls."""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "tests"))

import test_distributed as t  # noqa: E402


def main() -> None:
    body, arg, deadline, script, dead = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    size = int(os.environ["R"])
    t0 = time.monotonic()
    try:
        res = t.run_group(body, size, arg, deadline=deadline, expect_dead=dead, script=t.RANK.replace("pg_rank", script))
        for r, out in enumerate(res):
            print(body, arg, "rank", r, json.dumps(out)[:3000], flush=True)
        print(body, arg, f"{time.monotonic() - t0:.0f} s", flush=True)
    except BaseException as e:  # noqa: BLE001 (the run's record: whatever ended it)
        print(body, arg, "FAILED", f"{time.monotonic() - t0:.0f} s", str(e)[:12000], flush=True)


if __name__ == "__main__":
    main()
