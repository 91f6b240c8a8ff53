"""O1 N1 O2 N2 and Gloo per row, and Gloo's time over each (busbw ratio): python3 table.py r4.txt"""
import sys
runs, cur, tag = {}, None, None
for l in open(sys.argv[1]):
    if l.startswith("## "):
        tag = l.split()[1]; continue
    if l.startswith("# backend"):
        cur = tag; runs.setdefault(cur, {}); continue
    p = l.split()
    if cur and len(p) == 5 and p[0].isdigit():
        runs[cur][(p[1], int(p[0]))] = float(p[2])
names = ("O1", "N1", "O2", "N2", "G")
print(f"{'op':>15} {'bytes':>9} " + " ".join(f"{k:>7}" for k in names) + "   G/O1  G/N1  G/O2  G/N2")
for k in sorted(runs["G"]):
    v = [runs[r].get(k) for r in names]
    if None in v:
        continue
    print(f"{k[0]:>15} {k[1]:>9} " + " ".join(f"{x:7.1f}" for x in v) + "  " + " ".join(f"{v[4] / x:5.2f}" for x in v[:4]))
