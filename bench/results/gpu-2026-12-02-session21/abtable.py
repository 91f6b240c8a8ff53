"""Tidewire's and Gloo's time per call from interleaved pg_bench runs (`## NAME` before each run),
a column per run, Gloo's time over tidewire's (the busbw ratio) beside each:
python3 abtable.py FILE [OP ...]."""
import sys

runs = {}
cur = sec = None
for line in open(sys.argv[1]):
    if line.startswith("## "):
        cur = line[3:].strip()
        continue
    if line.startswith("# backend"):
        sec = line.split()[2]
        continue
    if line.startswith("# tidewire against"):
        sec = None
        continue
    p = line.split()
    if sec and len(p) == 5 and p[0].isdigit():
        runs.setdefault(cur, {}).setdefault((p[1], int(p[0])), {})[sec] = float(p[2])
ops = sys.argv[2:] or sorted({k[0] for r in runs.values() for k in r})
names = list(runs)
print(f"{'op':>14} {'bytes':>9} " + " ".join(f"{n:>17}" for n in names))
for op in ops:
    keys = sorted(k for k in next(iter(runs.values())) if k[0] == op)
    for k in keys:
        cells = []
        for n in names:
            d = runs[n].get(k, {})
            t, g = d.get("tidewire"), d.get("gloo")
            cells.append(f"{t:7.0f} ({g / t:5.2f}x)" if t and g else f"{'-':>17}")
        print(f"{op:>14} {k[1]:>9} " + " ".join(f"{c:>17}" for c in cells))
