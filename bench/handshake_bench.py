"""The cost of a handshake with and without a cluster secret: `Engine.probe` opens a new
connection each time (connect, handshake, one probe). `python bench/handshake_bench.py`."""

import time

import tidewire


def run(secret):  # noqa: ANN001, ANN201
    with tidewire.Engine(cluster_secret=secret) as t, tidewire.Engine(cluster_secret=secret, force_tcp=True) as i:
        i.probe(t.name)
        xs = []
        for _ in range(500):
            a = time.perf_counter(); i.probe(t.name); xs.append((time.perf_counter() - a) * 1e6)
        xs.sort()
        return xs[len(xs)//2], xs[int(len(xs)*0.99)]
for rep in range(3):
    for s in (None, "bench-secret"):
        p50, p99 = run(s)
        print(f"rep {rep} secret {'yes' if s else 'no '}: connect + handshake + probe p50 {p50:.1f} us p99 {p99:.1f} us")
