#!/usr/bin/env bash
# session 5, device call 3: which host, small CUDA calls in graphs at 64 and 128 blocks, CPU vs Gloo >= 1 MiB.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nvidia-smi topo -m; nproc; } > $O/machine.txt 2>&1
for B in 64 128; do
  echo "## blocks $B"
  TIDEWIRE_PG_CUDA_BLOCKS=$B timeout 60 python3 bench/pg_bench.py --backends tidewire --device cuda --dtype bf16 --ops all_reduce,all_gather --max-bytes 256K --graph --iters 10
  TIDEWIRE_PG_CUDA_BLOCKS=$B timeout 60 python3 bench/pg_bench.py --backends tidewire --device cuda --dtype bf16 --ops all_reduce --max-bytes 128K --step 16 --iters 10
done > $O/graph.txt 2>&1
timeout 150 python3 bench/pg_bench.py --backends tidewire,gloo --ranks 2 --dtype fp32 --min-bytes 1M --max-bytes 64M > $O/pg-cpu-2.txt 2>&1
timeout 150 python3 bench/pg_bench.py --backends tidewire,gloo --ranks 4 --dtype fp32 --min-bytes 1M --max-bytes 64M > $O/pg-cpu-4.txt 2>&1
