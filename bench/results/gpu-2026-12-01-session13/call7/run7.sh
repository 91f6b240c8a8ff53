#!/usr/bin/env bash
# session 13, device call 7 (nvidia-h200: one H200, 16 CPUs; CPU only). Call 6: 2 ranks'
# all_reduce reduces its 2 MiB block (4 MiB call) in 240-270 us and its 4 MiB block (8 MiB
# call) in 240 us, four 512 KiB pieces as slow as four 1 MiB ones. Is it the threads? The
# phases traced with 1, 2, 4 (default) and 8 readers per rank, and with 1 MiB pieces; 2 ranks,
# all_reduce 1-16 MiB. dist/g.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site-g --upgrade dist/g/*.whl
{ date -u; nproc; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-g TIDEWIRE_TRACE=tidewire_collective=trace timeout 60 python3 bench/pg_bench.py --device cpu --backends tidewire --ops all_reduce --ranks 2 --min-bytes 1M --max-bytes 16M --step 2 --iters 30 2> /tmp/trace.txt | grep all_reduce; python3 bench/results/gpu-2026-12-01-session13/call6/phases.py /tmp/trace.txt | grep "rank 0"; }
{
  for t in 1 2 4 8; do echo "## readers $t"; TIDEWIRE_PG_COPY_THREADS=$t pg; done
  echo "## pieces 1 MiB"; TIDEWIRE_PG_REDUCE_PIECE_MIN=1048576 pg
  echo "## readers 4 again"; pg
} > $O/threads.txt 2>&1; echo "rc $? $SECONDS s" >> $O/machine.txt
