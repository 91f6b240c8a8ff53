"""How much of a 100,000-descriptor batch goes to converting Python descriptors.

    python bench/python_batch.py [--n 100000] [--block 4096] [--reps 5]

Starts a target process (tidewire.mooncake, P2PHANDSHAKE, one managed buffer), then from this
process runs `batch_transfer_sync_write` with the descriptors as Python lists and as numpy
arrays, over shm (same host). Conversion is timed by the native `descriptor_count`, which
runs the same extraction code as the transfer call. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

import tidewire
from tidewire import _native
from tidewire.mooncake import TransferEngine


def target_main(length: int) -> None:
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    addr = e.allocate_managed_buffer(length)
    print(json.dumps({"name": f"127.0.0.1:{e.get_rpc_port()}", "addr": addr}), flush=True)
    sys.stdin.readline()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--block", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--target", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.target:
        return target_main(a.target)
    length = a.n * a.block
    proc = subprocess.Popen([sys.executable, __file__, "--target", str(length)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    info = json.loads(proc.stdout.readline())
    try:
        e = TransferEngine()
        assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        buf = np.ones(length, dtype=np.uint8)
        assert e.register_memory(buf.ctypes.data, length) == 0
        offs = np.arange(a.n, dtype=np.uint64) * a.block
        forms = {
            "lists": ((buf.ctypes.data + offs).tolist(), (info["addr"] + offs).tolist(), [a.block] * a.n),
            "numpy": (buf.ctypes.data + offs, info["addr"] + offs, np.full(a.n, a.block, dtype=np.uint64)),
        }
        rows = []
        for form, (local, remote, lens) in forms.items():
            assert e.batch_transfer_sync_write(info["name"], local, remote, lens) == 0  # warm up
            totals, convs = [], []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                for arr in (local, remote, lens):
                    _native.descriptor_count(arr)
                t1 = time.perf_counter()
                assert e.batch_transfer_sync_write(info["name"], local, remote, lens) == 0
                t2 = time.perf_counter()
                convs.append(t1 - t0)
                totals.append(t2 - t1)
            total, conv = statistics.median(totals), statistics.median(convs)
            rows.append({"form": form, "descriptors": a.n, "block": a.block, "total_ms": total * 1e3,
                         "conversion_ms": conv * 1e3, "moving_ms": (total - conv) * 1e3,
                         "conversion_share": conv / total, "gbps": length / total / 1e9})
        print(f"{'form':<6} {'n':>7} {'total ms':>9} {'convert ms':>10} {'moving ms':>9} {'convert %':>9} {'GB/s':>6}")
        for r in rows:
            print(f"{r['form']:<6} {r['descriptors']:>7} {r['total_ms']:>9.2f} {r['conversion_ms']:>10.3f} "
                  f"{r['moving_ms']:>9.2f} {100 * r['conversion_share']:>8.2f}% {r['gbps']:>6.2f}")
        print(json.dumps({"bench": "python_batch", "tidewire": tidewire.__version__, "rows": rows}))
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
