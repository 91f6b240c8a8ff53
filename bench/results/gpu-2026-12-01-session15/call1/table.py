"""Per row: tidewire's and Gloo's time in each run, and Gloo's time over tidewire's (the busbw
ratio; the time ratio for the small rows): python3 table.py r2.txt"""
import sys
runs, run, cur = {}, None, None
for l in open(sys.argv[1]):
    if l.startswith("## run"):
        run = l.split()[2]; continue
    if l.startswith("# backend"):
        cur = (run, l.split()[2]); runs.setdefault(cur, {}); continue
    p = l.split()
    if cur and len(p) == 5 and p[0].isdigit():
        runs[cur][(p[1], int(p[0]))] = float(p[2])
keys = sorted({k for r in runs.values() for k in r}, key=lambda k: (k[0], k[1]))
print(f"{'op':>15} {'bytes':>9} {'tw1':>8} {'gloo1':>8} {'tw2':>8} {'gloo2':>8}  {'x1':>6} {'x2':>6}")
for k in keys:
    t1, g1 = runs[("1", "tidewire")].get(k), runs[("1", "gloo")].get(k)
    t2, g2 = runs[("2", "tidewire")].get(k), runs[("2", "gloo")].get(k)
    if None in (t1, g1, t2, g2):
        continue
    print(f"{k[0]:>15} {k[1]:>9} {t1:8.1f} {g1:8.1f} {t2:8.1f} {g2:8.1f}  {g1 / t1:6.2f} {g2 / t2:6.2f}")
