"""Medians of the phases the collectives' trace logged (`rank R: OP of N bytes: phases (µs)
a 1.0, b 2.0, ...`), by operation, size and rank: python3 phases.py TRACE_FILE."""
import re
import statistics
import sys
from collections import defaultdict

rows = defaultdict(lambda: defaultdict(list))
pat = re.compile(r"rank (\d+): (\w+) of (\d+) bytes: phases \(µs\) (.*)$")
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    m = pat.search(line)
    if not m:
        continue
    rank, op, n, rest = int(m[1]), m[2], int(m[3]), m[4]
    for i, part in enumerate(rest.split(", ")):
        name, v = part.rsplit(" ", 1)
        rows[(op, n, rank)][f"{i}:{name}"].append(float(v))
for (op, n, rank), phases in sorted(rows.items()):
    cells = "  ".join(f"{k.split(':')[1]} {statistics.median(v):7.1f}" for k, v in sorted(phases.items()))
    total = sum(statistics.median(v) for v in phases.values())
    print(f"{op:>10} {n:>9} rank {rank}: {cells}  (sum {total:.1f}, {len(next(iter(phases.values())))} calls)")
