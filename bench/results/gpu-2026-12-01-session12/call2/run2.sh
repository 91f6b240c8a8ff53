#!/usr/bin/env bash
# session 12, device call 2 (nvidia-h200: one H200, 16 CPUs; CPU only).
# CPU all_reduce A/B: A = dist/a (all_reduce's reads of the reduced blocks cut as plain
# copies: one thread below 1 MiB), B = dist/b (cut as a reduction's: from 512 KiB, pieces of
# >= 128 KiB). 4 and 2 ranks, 512 KiB - 8 MiB, alternating A B, Gloo before and after.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
for w in a b; do python3 -m pip install -q --no-index --no-deps --target /tmp/site-$w --upgrade dist/$w/*.whl; done
{ date -u; nproc; } > $O/machine.txt
b() { PYTHONPATH=/tmp/site-$2 timeout 60 python3 bench/pg_bench.py --ranks $1 --device cpu --ops all_reduce --min-bytes 512K --max-bytes 8M --step 2 --backends $3 2>&1 | grep -v Warn; }
{
  for n in 4 2; do
    echo "## gloo ranks $n"; b $n a gloo
    for rep in 1 2 3; do
      echo "## A ranks $n rep $rep"; b $n a tidewire
      echo "## B ranks $n rep $rep"; b $n b tidewire
    done
    echo "## gloo again ranks $n"; b $n a gloo
  done
} > $O/ab.txt 2>&1; echo "bench rc $? $SECONDS s" >> $O/machine.txt
