"""The rows of a call's pg_bench output, one column per run, and Gloo's time over each of
ours (the busbw ratio; the time ratio for small rows). A run is a `## TAG` section (its first
two words name it: `## run 1 small` and `## run 1 large` are one run); Gloo's rows are compared
with ours of the same run, else with the first Gloo run.   python3 table.py call3/r4.txt"""
import sys

cols, rows, col = {}, set(), None
for line in open(sys.argv[1]):
    if line.startswith("## "):
        tag = " ".join(line.split()[1:3])
        continue
    if line.startswith("# backend"):
        col = ("gloo " if line.split()[2] == "gloo" else "") + tag
        cols.setdefault(col, {})
        continue
    p = line.split()
    if col and len(p) == 5 and p[0].isdigit():
        cols[col][(p[1], int(p[0]))] = float(p[2])
        rows.add((p[1], int(p[0])))
ours = [c for c in cols if not c.startswith("gloo ")]
gloo = [c for c in cols if c.startswith("gloo ")]
print(f"{'op':>15} {'bytes':>9} " + " ".join(f"{c:>9}" for c in gloo + ours) + "  " + " ".join(f"{'x ' + c:>9}" for c in ours))
for k in sorted(rows):
    times = [cols[c].get(k) for c in gloo + ours]
    ratios = []
    for c in ours:
        g = cols.get("gloo " + c, cols[gloo[0]]).get(k)
        t = cols[c].get(k)
        ratios.append(f"{g / t:9.2f}" if g and t else f"{'-':>9}")
    print(f"{k[0]:>15} {k[1]:>9} " + " ".join(f"{t:9.1f}" if t else f"{'-':>9}" for t in times) + "  " + " ".join(ratios))
