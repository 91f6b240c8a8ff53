#!/usr/bin/env bash
# session 6, device call 3: what recording metrics costs the GPU paged figures (nvlink, 16,384 ×
# 4 KiB pages and 128 × 4 KiB, metrics off/on alternating), and CUDA small calls in graphs with
# NCCL in the same command (call 1 lost NCCL's graph block to its time limit).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
{ for rep in 1 2 3; do for mode in off on; do flag=""; [ $mode = on ] && flag="--metrics"
  for cfg in "--block-size 4KiB --batch-size 16384 --api paged" "--block-size 4KiB --batch-size 128"; do
    echo "## rep $rep metrics $mode [$cfg]"
    timeout 60 dist/tidewire bench --pair --gpu 0 --target-gpu 1 $cfg --duration 2s --baseline none $flag 2>&1 | grep -v "^#\|^tidewire_" | tail -1
  done; done; done
  echo "## with --metrics, the counters"; timeout 60 dist/tidewire bench --pair --gpu 0 --target-gpu 1 --block-size 4KiB --batch-size 16384 --api paged --duration 1s --baseline none --metrics 2>&1 | tail -8
} > $O/metrics-cost.txt 2>&1
echo "cost done $SECONDS s" >> $O/machine.txt
timeout 240 python3 bench/pg_bench.py --backends tidewire,nccl --device cuda --dtype bf16 --graph --max-bytes 64K --iters 20 > $O/pg-graph.txt 2>&1
echo "all done $SECONDS s" >> $O/machine.txt
