#!/usr/bin/env bash
# session 14, device call 5 (nvidia-h200: 16 CPUs; CPU only). dist/s14d: all_to_all stages only
# the blocks the direct pairs read (call 4 staged the whole input and lost to direct reads).
# A = staged all_to_all, B = TIDEWIRE_PG_A2A_STAGED=0 (direct reads), A B A B, 2 and 4 ranks,
# 512 KiB - 16 MiB, Gloo once in the first A.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site-d --upgrade dist/s14d/*.whl
{ date -u; nproc; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-d timeout "$1" python3 bench/pg_bench.py --device cpu --ops all_to_all --min-bytes 512K --max-bytes 16M --step 2 --iters 40 "${@:2}" 2>&1 | grep -v Warn; }
for n in 2 4; do
  {
    echo "## A1"; pg 100 --backends tidewire,gloo --ranks $n
    echo "## B1"; TIDEWIRE_PG_A2A_STAGED=0 pg 60 --backends tidewire --ranks $n
    echo "## A2"; pg 60 --backends tidewire --ranks $n
    echo "## B2"; TIDEWIRE_PG_A2A_STAGED=0 pg 60 --backends tidewire --ranks $n
  } > $O/r$n.txt; echo "r$n rc $? $SECONDS s" >> $O/machine.txt
done
