"""Each variant's two runs and Gloo per row, Gloo's time over each: python3 table.py r4.txt"""
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
names = [n for n in runs if n != "G"]
print(f"{'bytes':>9} {'G':>7} " + " ".join(f"{n:>8}" for n in names))
for k in sorted(runs["G"], key=lambda k: k[1]):
    g = runs["G"][k]
    print(f"{k[1]:>9} {g:7.1f} " + " ".join(f"{runs[n].get(k, float('nan')):8.1f}" for n in names))
    print(f"{'x Gloo':>9} {'':>7} " + " ".join(f"{g / runs[n][k]:8.2f}" if k in runs[n] else f"{'-':>8}" for n in names))
