#!/usr/bin/env bash
# session 7, device call 2: what recording metrics costs the nvlink figures (4 KiB x 1,
# 4 KiB x 128, 16,384 x 4 KiB pages; off / on alternating, 5 reps), NCCL's graph block of
# pg_bench with a stack dump if it hangs, and the EP pair at T=128 against the reference.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
{ for rep in 1 2 3 4 5; do for mode in off on; do flag=""; [ $mode = on ] && flag="--metrics"
  for cfg in "--block-size 4KiB --batch-size 1" "--block-size 4KiB --batch-size 128" "--block-size 4KiB --batch-size 16384 --api paged"; do
    echo "## rep $rep metrics $mode [$cfg]"
    timeout 60 dist/tidewire bench --pair --gpu 0 --target-gpu 1 $cfg --duration 2s --baseline none $flag 2>&1 | grep -v "^#\|^tidewire_" | tail -2
  done; done; done
} > $O/metrics-cost.txt 2>&1
echo "cost done $SECONDS s" >> $O/machine.txt
PG_BENCH_TRACE_AFTER=50 timeout 70 python3 bench/pg_bench.py --backends nccl --device cuda --dtype bf16 --graph --max-bytes 1K --iters 5 > $O/nccl-graph.txt 2>&1; echo "rc $?" >> $O/nccl-graph.txt
echo "nccl done $SECONDS s" >> $O/machine.txt
timeout 120 python3 bench/ep_bench.py --tokens 128 > $O/ep.txt 2>&1; echo "rc $?" >> $O/ep.txt
echo "all done $SECONDS s" >> $O/machine.txt
