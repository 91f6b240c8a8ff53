#!/usr/bin/env bash
# session 16, device call 1 (nvidia-h200: one H200, 16 CPUs; CPU only). HEAD (dist/s16a).
# pg_bench --interleave: tidewire and Gloo in the same processes, batches alternating, so each
# ratio comes from the same stretch of the host's time. 4 ranks 512 KiB - 8 MiB, the default
# (D) and at most two reader threads (T2), D T2 D T2; 2 ranks once; 8 B - 4 KiB at 2 and 4
# ranks once; then the 4-rank all_to_all's phases (trace) on its own.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-a --upgrade dist/s16a/*.whl
export PYTHONPATH=/tmp/site-a
{ date -u; nproc; uname -r; cat /sys/kernel/mm/transparent_hugepage/enabled; } > $O/machine.txt
pg() { timeout "$1" python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave "${@:2}" 2>&1 | grep -v Warn; }
big="--min-bytes 512K --max-bytes 8M --step 2 --iters 30"
for run in 1 2; do
  pg 150 --ranks 4 $big > $O/D4-$run.txt; echo "D4-$run rc $? $SECONDS s" >> $O/machine.txt
  TIDEWIRE_PG_COPY_THREADS=2 pg 150 --ranks 4 $big > $O/T2-4-$run.txt; echo "T2-4-$run rc $? $SECONDS s" >> $O/machine.txt
done
pg 120 --ranks 2 $big > $O/D2.txt; echo "D2 rc $? $SECONDS s" >> $O/machine.txt
for n in 2 4; do
  pg 120 --ranks $n --max-bytes 4K --step 4 --iters 30 > $O/small-$n.txt; echo "small-$n rc $? $SECONDS s" >> $O/machine.txt
done
TIDEWIRE_TRACE=tidewire_collective=trace timeout 90 python3 bench/pg_bench.py --device cpu --backends tidewire --ranks 4 --ops all_to_all $big > $O/traced-4.txt 2> /tmp/trace-4.txt
echo "traced rc $? $SECONDS s" >> $O/machine.txt
python3 bench/results/gpu-2026-12-01-session13/call6/phases.py /tmp/trace-4.txt > $O/phases-4.txt 2>&1
