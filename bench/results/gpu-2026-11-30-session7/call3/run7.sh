#!/usr/bin/env bash
# session 7, device call 3: the metrics cost again after the batch stopped cloning counter handles
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
PG_BENCH_TRACE_AFTER=150 timeout 170 python3 bench/pg_bench.py --backends tidewire,nccl --device cuda --dtype bf16 --graph --max-bytes 64K --iters 20 > $O/pg-graph.txt 2>&1; echo "rc $?" >> $O/pg-graph.txt
echo "all done $SECONDS s" >> $O/machine.txt
