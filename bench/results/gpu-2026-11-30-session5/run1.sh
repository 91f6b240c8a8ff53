#!/usr/bin/env bash
# session 5, device call 1: GPU suite on the review commits, then the all_reduce sweep and an EP trace.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
date -u > $O/date.txt; nvidia-smi -L >> $O/date.txt
time scripts/gpu-test.sh dist $O/t > $O/gpu-test.log 2>&1; echo "gpu-test rc $?" >> $O/gpu-test.log
export PYTHONPATH=/tmp/tidewire-site
{
python3 bench/pg_bench.py --backends nccl --device cuda --dtype bf16 --ops all_reduce --min-bytes 32M --max-bytes 128M
for B in 64 128; do for C in 0 64 256; do
  echo "## blocks $B chunk_kib $C"
  TIDEWIRE_PG_CUDA_BLOCKS=$B TIDEWIRE_PG_CUDA_CHUNK_KIB=$C python3 bench/pg_bench.py --backends tidewire --device cuda --dtype bf16 --ops all_reduce,all_gather --min-bytes 32M --max-bytes 128M 2>&1 | grep -v "^#\|bytes"
done; done
} > $O/sweep.txt 2>&1
mkdir -p $O/tr1 $O/tr256
timeout 120 python3 bench/ep_bench.py --tokens 128 --iters 300 --trace-dir $O/tr1 > $O/ep-default.txt 2>&1
TIDEWIRE_EP_SEND_TASKS=256 timeout 120 python3 bench/ep_bench.py --tokens 128 --iters 300 --trace-dir $O/tr256 > $O/ep-256.txt 2>&1
ls -la $O/tr1 $O/tr256 >> $O/ep-256.txt
gzip -f $O/tr1/*.json $O/tr256/*.json 2>/dev/null; true
