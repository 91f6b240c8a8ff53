#!/usr/bin/env bash
# session 15, device call 2 (nvidia-h200, 16 CPUs, CPU only). Call 1's 4-rank rows were slower
# than session 14's call 6 on rows the staged path does not touch (all_to_all 1 MiB 321-398 us
# against 126-145): the code or the host? A/B of wheels in one call, alternating:
# O = dist/s14e (fff855c, call 6's code), N = dist/s15a (HEAD), 4 ranks, 512 KiB - 8 MiB,
# O N O N, Gloo once at the start.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site-o --upgrade dist/s14e/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/site-n --upgrade dist/s15a/*.whl
{ date -u; nproc; uptime; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-$1 timeout "$2" python3 bench/pg_bench.py --device cpu --ranks 4 --min-bytes 512K --max-bytes 8M --step 2 --iters 30 "${@:3}" 2>&1 | grep -v Warn; }
{
  echo "## G"; pg n 150 --backends gloo
  echo "## O1"; pg o 60 --backends tidewire
  echo "## N1"; pg n 60 --backends tidewire
  echo "## O2"; pg o 60 --backends tidewire
  echo "## N2"; pg n 60 --backends tidewire
} > $O/r4.txt; echo "r4 rc $? $SECONDS s" >> $O/machine.txt; uptime >> $O/machine.txt
