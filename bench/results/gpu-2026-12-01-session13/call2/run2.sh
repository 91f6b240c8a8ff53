#!/usr/bin/env bash
# session 13, device call 2 (nvidia-h200: one H200, 16 CPUs; CPU only). Call 1 left the CPU
# all_reduce at 2-4 MiB at 2.8-2.9x Gloo (2 and 4 ranks) and 2 ranks' 4 MiB (576 us) barely
# faster than 8 MiB (608 us). Settings by env, same wheel (dist/e = ece62ac), alternated twice:
# the reader threads per rank (default: CPUs / ranks, at most 4) and the reductions' pieces.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site-e --upgrade dist/e/*.whl
{ date -u; nproc; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-e timeout "$1" python3 bench/pg_bench.py --device cpu --min-bytes 1M --max-bytes 8M --step 2 --iters 50 "${@:2}" 2>&1 | grep -v Warn; }
{
  echo "## gloo 2 ranks"; pg 60 --ranks 2 --ops all_reduce --backends gloo
  echo "## gloo 4 ranks"; pg 60 --ranks 4 --ops all_reduce,all_to_all --backends gloo
  for rep in 1 2; do
    echo "## default 2 ranks rep $rep"; pg 40 --ranks 2 --ops all_reduce --backends tidewire
    echo "## threads 8 2 ranks rep $rep"; TIDEWIRE_PG_COPY_THREADS=8 pg 40 --ranks 2 --ops all_reduce --backends tidewire
    echo "## threads 6 2 ranks rep $rep"; TIDEWIRE_PG_COPY_THREADS=6 pg 40 --ranks 2 --ops all_reduce --backends tidewire
    echo "## pieces 128K 2 ranks rep $rep"; TIDEWIRE_PG_REDUCE_PIECE_MIN=131072 pg 40 --ranks 2 --ops all_reduce --backends tidewire
    echo "## default 4 ranks rep $rep"; pg 50 --ranks 4 --ops all_reduce,all_to_all --backends tidewire
    echo "## threads 3 4 ranks rep $rep"; TIDEWIRE_PG_COPY_THREADS=3 pg 50 --ranks 4 --ops all_reduce,all_to_all --backends tidewire
    echo "## pieces 128K 4 ranks rep $rep"; TIDEWIRE_PG_REDUCE_PIECE_MIN=131072 pg 50 --ranks 4 --ops all_reduce,all_to_all --backends tidewire
    echo "## read split 512K 4 ranks rep $rep"; TIDEWIRE_PG_READ_SPLIT_MIN=524288 TIDEWIRE_PG_READ_PIECE_MIN=262144 pg 50 --ranks 4 --ops all_reduce,all_to_all --backends tidewire
  done
} > $O/sweep.txt 2>&1; echo "sweep rc $? $SECONDS s" >> $O/machine.txt
