#!/usr/bin/env bash
# session 21, device call 4 (nvidia-h200: one H200, 16 CPUs; CPU only). One wheel (dist/pipes):
# (call 3's code, and one group's own copy on the flows' thread). A = pipes, B =
# TIDEWIRE_PG_PIPES=0. Interleaved with Gloo, all_to_all 256 KiB - 32 MiB, 4 and 2 ranks,
# A B twice each: where a pipe (one thread a pair) loses to reads split over threads.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-a --upgrade dist/pipes2/*.whl
{ date -u; nproc; uname -r; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-a timeout 90 python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --iters 40 --min-bytes 256K --max-bytes 32M --step 2 "$@" 2>&1 | grep -v Warn; }
{
  for i in 1 2; do
    [ $SECONDS -lt 420 ] || break
    echo "## A4-$i"; pg --ranks 4 --ops all_to_all; echo "A4-$i rc $? $SECONDS s" >> $O/machine.txt
    echo "## B4-$i"; TIDEWIRE_PG_PIPES=0 pg --ranks 4 --ops all_to_all; echo "B4-$i rc $? $SECONDS s" >> $O/machine.txt
    echo "## A2-$i"; pg --ranks 2 --ops all_to_all; echo "A2-$i rc $? $SECONDS s" >> $O/machine.txt
    echo "## B2-$i"; TIDEWIRE_PG_PIPES=0 pg --ranks 2 --ops all_to_all; echo "B2-$i rc $? $SECONDS s" >> $O/machine.txt
  done
} > $O/a2a.txt
python3 bench/results/gpu-2026-12-01-session16/abtable.py $O/a2a.txt > $O/table.txt
cat $O/table.txt; cat $O/machine.txt
