#!/usr/bin/env bash
# session 16, device call 3 (nvidia-h200: one H200, 16 CPUs; CPU only). dist/s16b. Calls 1-2:
# the 4-rank all_to_all at 1 MiB is ~180 us in some launches and ~400 in others, same code.
# Which launches are slow, and with which readers: W (default: blocks half written by their
# sender), R (reads only: TIDEWIRE_PG_A2A_WRITES=0), T1 (one thread, no pool), each launched
# four times in turn, tidewire alone, 1-8 MiB, 40 iterations; the host's CPUs and NUMA nodes.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-b --upgrade dist/s16b/*.whl
export PYTHONPATH=/tmp/site-b
{ date -u; nproc; lscpu | grep -E "Model name|Socket|NUMA|L3|Thread"; ls /sys/devices/system/node | grep node; } > $O/machine.txt 2>&1
pg() { timeout 60 python3 bench/pg_bench.py --device cpu --backends tidewire --ranks 4 --ops all_to_all --min-bytes 1M --max-bytes 8M --step 2 --iters 40 2>&1 | grep -E "^ +[0-9]"; }
for run in 1 2 3 4; do
  echo "## W-$run"; pg
  echo "## R-$run"; TIDEWIRE_PG_A2A_WRITES=0 pg
  echo "## T1-$run"; TIDEWIRE_PG_COPY_THREADS=1 pg
done > $O/runs.txt; echo "runs rc $? $SECONDS s" >> $O/machine.txt
