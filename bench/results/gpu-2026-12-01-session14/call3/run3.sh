#!/usr/bin/env bash
# session 14, device call 3 (nvidia-h200: 16 CPUs; CPU only). dist/s14b (= s14a with each
# staged copy and each round timed apart). Call 2: staging wins at 2 ranks from 512 KiB, loses
# at 4 ranks (256 KiB all_reduce 284 us staged, 101 through the ring). Where the 4-rank time
# goes: phases of all_reduce / all_gather / reduce_scatter 256 KiB - 8 MiB, traced, with the
# default threads, with staged copies unsplit below 1 MiB, and with 2 threads a rank.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
H=bench/results/gpu-2026-12-01-session14/call3
python3 -m pip install -q --no-index --no-deps --target /tmp/site-b --upgrade dist/s14b/*.whl
{ date -u; nproc; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-b TIDEWIRE_TRACE=tidewire_collective=trace timeout 60 python3 bench/pg_bench.py --device cpu --backends tidewire --ops all_reduce,all_gather,reduce_scatter --min-bytes 256K --max-bytes 8M --step 2 --iters 20 "$@" 2> /tmp/trace.txt | grep -v "^#\|bytes"; python3 $H/phases.py /tmp/trace.txt | grep "rank 0"; }
{
  for n in 4 2; do
    echo "## ranks $n default"; pg --ranks $n
    echo "## ranks $n shared split from 1 MiB"; TIDEWIRE_PG_SHARED_SPLIT_MIN=1048576 pg --ranks $n
    echo "## ranks $n two threads"; TIDEWIRE_PG_COPY_THREADS=2 pg --ranks $n
  done
} > $O/phases.txt 2>&1; echo "rc $? $SECONDS s" >> $O/machine.txt
