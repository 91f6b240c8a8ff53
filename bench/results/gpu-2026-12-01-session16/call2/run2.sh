#!/usr/bin/env bash
# session 16, device call 2 (nvidia-h200: one H200, 16 CPUs; CPU only). dist/s16b = HEAD:
# all_to_all's large direct blocks half read by the receiver, half written by the sender (W,
# the new default) against reads only (R: TIDEWIRE_PG_A2A_WRITES=0), W R W R, each run
# interleaved with Gloo (pg_bench --interleave), 4 ranks then 2 ranks, 512 KiB - 8 MiB; then
# the phases (trace) of W and R at 4 ranks, and of the staged all_gather / all_reduce.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-b --upgrade dist/s16b/*.whl
export PYTHONPATH=/tmp/site-b
{ date -u; nproc; } > $O/machine.txt
pg() { timeout "$1" python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --ops all_to_all --min-bytes 512K --max-bytes 8M --step 2 --iters 40 "${@:2}" 2>&1 | grep -v Warn; }
for n in 4 2; do
  for run in 1 2; do
    echo "## W$n-$run"; pg 90 --ranks $n; echo "W$n-$run rc $? $SECONDS s" >> $O/machine.txt
    echo "## R$n-$run"; TIDEWIRE_PG_A2A_WRITES=0 pg 90 --ranks $n; echo "R$n-$run rc $? $SECONDS s" >> $O/machine.txt
  done
done > $O/ab.txt
tr() { TIDEWIRE_TRACE=tidewire_collective=trace timeout 90 python3 bench/pg_bench.py --device cpu --backends tidewire --ranks 4 --min-bytes 512K --max-bytes 8M --step 2 --iters 30 "$@" 2>/tmp/trace.txt | grep -v Warn; python3 bench/results/gpu-2026-12-01-session13/call6/phases.py /tmp/trace.txt; }
{
  echo "## traced W"; tr --ops all_to_all; echo "## traced R"; TIDEWIRE_PG_A2A_WRITES=0 tr --ops all_to_all
  echo "## traced all_gather, all_reduce"; tr --ops all_gather,all_reduce
} > $O/traced.txt 2>&1; echo "traced rc $? $SECONDS s" >> $O/machine.txt
