#!/usr/bin/env bash
# session 11, device call 5 (nvidia-h200-x2, its 32-CPU host; CPU only): the 4-rank CPU
# collectives against Gloo under the readers' thread count (TIDEWIRE_PG_COPY_THREADS 1, 2, 4
# (the default here), 8), all_reduce and all_to_all 512 KiB - 4 MiB, and the host's NUMA layout.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nproc; lscpu | grep -Ei "model name|socket|numa|mhz"; } > $O/machine.txt 2>&1
timeout 40 python3 bench/pg_bench.py --backends gloo --ranks 4 --device cpu --ops all_to_all,all_reduce --min-bytes 512K --max-bytes 4M --step 2 2>&1 | grep -v Warn > $O/gloo.txt
for th in 1 2 4 8 2 4; do
  echo "## TIDEWIRE_PG_COPY_THREADS=$th"
  TIDEWIRE_PG_COPY_THREADS=$th timeout 40 python3 bench/pg_bench.py --backends tidewire --ranks 4 --device cpu --ops all_to_all,all_reduce --min-bytes 512K --max-bytes 4M --step 2 2>&1 | grep -v Warn
done > $O/threads.txt 2>&1; echo "rc $? $SECONDS s" >> $O/machine.txt
