#!/usr/bin/env bash
# session 13, device call 6 (nvidia-h200: one H200, 16 CPUs; CPU only). Where 2 ranks'
# all_reduce spends 4 MiB's time (as long as 8 MiB's, calls 1-3): the direct-read collectives'
# phases, timed at trace level (dist/g = this session's code with the phase timing), 2 and 4
# ranks, all_reduce and all_gather 1-16 MiB; the same bench untraced beside it.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site-g --upgrade dist/g/*.whl
{ date -u; nproc; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-g timeout 60 python3 bench/pg_bench.py --device cpu --backends tidewire --ops all_reduce,all_gather --min-bytes 1M --max-bytes 16M --step 2 --iters 30 "$@"; }
for n in 2 4; do
  pg --ranks $n > $O/plain-$n.txt 2>&1; echo "plain $n rc $? $SECONDS s" >> $O/machine.txt
  TIDEWIRE_TRACE=tidewire_collective=trace pg --ranks $n > $O/traced-$n.txt 2> /tmp/trace-$n.txt; echo "traced $n rc $? $SECONDS s" >> $O/machine.txt
  python3 bench/results/gpu-2026-12-01-session13/call6/phases.py /tmp/trace-$n.txt > $O/phases-$n.txt 2>&1
done
