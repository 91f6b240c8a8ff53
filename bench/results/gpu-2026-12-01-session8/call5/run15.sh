#!/usr/bin/env bash
# session 8, device call 5: metrics cost after counting a successful batch once its lock is
# released (4 KiB x 1, 4 KiB x 128, 16,384 pages; off / on alternating, 5 reps), and the CPU
# collectives against Gloo after the reader pool (2 and 4 ranks, 1-64 MiB).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nproc; } > $O/machine.txt 2>&1
{ for rep in 1 2 3 4 5; do for mode in off on; do flag=""; [ $mode = on ] && flag="--metrics"
  for cfg in "--block-size 4KiB --batch-size 1" "--block-size 4KiB --batch-size 128" "--block-size 4KiB --batch-size 16384 --api paged"; do
    echo "## rep $rep metrics $mode [$cfg]"
    timeout 60 dist/tidewire bench --pair --gpu 0 --target-gpu 1 $cfg --duration 2s --baseline none $flag 2>&1 | grep -v "^#\|^tidewire_" | tail -2
  done; done; done
} > $O/metrics-cost.txt 2>&1
echo "cost done $SECONDS s" >> $O/machine.txt
{ for R in 2 4; do echo "## ranks $R"; timeout 100 python3 bench/pg_bench.py --backends tidewire,gloo --ranks $R --min-bytes 1M --max-bytes 64M --iters 10; done; } > $O/pg-cpu.txt 2>&1
echo "all done $SECONDS s" >> $O/machine.txt
