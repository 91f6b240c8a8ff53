"""A1 A2 B1 B2 and Gloo per row, and Gloo's time over each (busbw ratio): python3 table.py r2.txt"""
import sys
runs, cur, tag = {}, None, None
for l in open(sys.argv[1]):
    if l.startswith("## "):
        tag = l.split()[1]; continue
    if l.startswith("# backend"):
        cur = tag if l.split()[2] == "tidewire" else "G"; runs.setdefault(cur, {}); continue
    if l.startswith("#"):
        cur = None; continue
    p = l.split()
    if cur and len(p) == 5 and p[0].isdigit():
        runs[cur][(p[1], int(p[0]))] = float(p[2])
keys = sorted(runs["A1"])
print(f"{'op':>15} {'bytes':>9} " + " ".join(f"{k:>7}" for k in ("A1", "A2", "B1", "B2", "G")) + "   G/A1  G/A2  G/B1  G/B2")
for k in keys:
    v = [runs[r].get(k) for r in ("A1", "A2", "B1", "B2", "G")]
    print(f"{k[0]:>15} {k[1]:>9} " + " ".join(f"{x:7.1f}" for x in v) + "  " + " ".join(f"{v[4] / x:5.2f}" for x in v[:4]))
