#!/usr/bin/env bash
# session 14, device call 4 (nvidia-h200: 16 CPUs; CPU only). dist/s14c: staged from 1 to
# 8 MiB (all_reduce, all_gather, reduce_scatter; all_to_all stages its input in that range).
# A = as built, B = staging off (TIDEWIRE_PG_STAGE_BYTES=0: session 13's algorithms),
# A B A B, 2 and 4 ranks, 512 KiB - 16 MiB, Gloo once in the first A (same command).
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site-c --upgrade dist/s14c/*.whl
{ date -u; nproc; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-c timeout "$1" python3 bench/pg_bench.py --device cpu --min-bytes 512K --max-bytes 16M --step 2 --iters 30 "${@:2}" 2>&1 | grep -v Warn; }
for n in 2 4; do
  {
    echo "## A1"; pg 150 --backends tidewire,gloo --ranks $n
    echo "## B1"; TIDEWIRE_PG_STAGE_BYTES=0 pg 60 --backends tidewire --ranks $n
    echo "## A2"; pg 60 --backends tidewire --ranks $n
    echo "## B2"; TIDEWIRE_PG_STAGE_BYTES=0 pg 60 --backends tidewire --ranks $n
  } > $O/r$n.txt; echo "r$n rc $? $SECONDS s" >> $O/machine.txt
done
