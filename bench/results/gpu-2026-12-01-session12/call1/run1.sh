#!/usr/bin/env bash
# session 12, device call 1 (nvidia-h200: one H200, 16 CPUs).
# 1. The collectives' CUDA tests with both ranks on the one GPU (TIDEWIRE_TEST_SHARED_GPU=1):
#    correctness of the p2p kernel's launch bounds and of the elastic re-forming rule.
# 2. CPU all_reduce, 4 ranks, 512 KiB - 8 MiB: the reductions' thread thresholds A/B
#    (default 512K/128K; 256K/64K; 128K/64K; plain reads 512K/256K), Gloo in the same run.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $O/machine.txt
TIDEWIRE_TEST_SHARED_GPU=1 timeout 300 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k cuda > $O/cuda-tests.txt 2>&1
echo "cuda tests rc $? $SECONDS s" >> $O/machine.txt
b() { timeout 60 python3 bench/pg_bench.py --ranks 4 --device cpu --ops all_reduce --min-bytes 512K --max-bytes 8M --step 2 --backends $1 2>&1 | grep -v Warn; }
{
  echo "## gloo"; b gloo
  for rep in 1 2; do
    echo "## default rep $rep"; b tidewire
    echo "## reduce 256K/64K rep $rep"; TIDEWIRE_PG_REDUCE_SPLIT_MIN=262144 TIDEWIRE_PG_REDUCE_PIECE_MIN=65536 b tidewire
    echo "## reduce 128K/64K rep $rep"; TIDEWIRE_PG_REDUCE_SPLIT_MIN=131072 TIDEWIRE_PG_REDUCE_PIECE_MIN=65536 b tidewire
    echo "## reduce 256K/64K + reads 512K/256K rep $rep"; TIDEWIRE_PG_REDUCE_SPLIT_MIN=262144 TIDEWIRE_PG_REDUCE_PIECE_MIN=65536 TIDEWIRE_PG_READ_SPLIT_MIN=524288 TIDEWIRE_PG_READ_PIECE_MIN=262144 b tidewire
  done
  echo "## gloo again"; b gloo
} > $O/ab.txt 2>&1; echo "bench rc $? $SECONDS s" >> $O/machine.txt
