#!/usr/bin/env bash
# session 12, device call 3 (nvidia-h200: one H200, 16 CPUs; CPU only).
# CPU all_reduce, B = dist/b as built (the reduced blocks' reads cut as a reduction's;
# reductions from 512 KiB in pieces >= 128 KiB) against C = the same wheel with
# TIDEWIRE_PG_REDUCE_SPLIT_MIN=262144 TIDEWIRE_PG_REDUCE_PIECE_MIN=65536 (both phases of a
# 1 MiB all_reduce on 4 ranks threaded). 4 and 2 ranks, 1 - 8 MiB, 50 iterations, alternating,
# Gloo before and after.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site-b --upgrade dist/b/*.whl
export PYTHONPATH=/tmp/site-b
{ date -u; nproc; } > $O/machine.txt
b() { timeout 90 python3 bench/pg_bench.py --ranks $1 --device cpu --ops all_reduce --min-bytes 1M --max-bytes 8M --step 2 --iters 50 --backends $2 2>&1 | grep -v Warn; }
{
  for n in 4 2; do
    echo "## gloo ranks $n"; b $n gloo
    for rep in 1 2 3; do
      echo "## B ranks $n rep $rep"; b $n tidewire
      echo "## C ranks $n rep $rep"; TIDEWIRE_PG_REDUCE_SPLIT_MIN=262144 TIDEWIRE_PG_REDUCE_PIECE_MIN=65536 b $n tidewire
    done
    echo "## gloo again ranks $n"; b $n gloo
  done
} > $O/ab.txt 2>&1; echo "bench rc $? $SECONDS s" >> $O/machine.txt
