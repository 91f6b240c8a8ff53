#!/usr/bin/env bash
# session 5, device call 4: what makes 128-block collective kernels stall ~155 us a call.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nvidia-smi -q | grep -i -E "multiprocessor|compute mode|mig mode" ; } > $O/machine.txt 2>&1
run() { echo "## $*"; env "$@" timeout 40 python3 bench/pg_bench.py --backends tidewire --device cuda --dtype bf16 --ops all_reduce --max-bytes 32K --step 16 --graph --iters 10 2>&1 | grep -v "^#\|bytes"; }
{
run TIDEWIRE_PG_CUDA_BLOCKS=128
run TIDEWIRE_PG_CUDA_BLOCKS=128 TIDEWIRE_PG_CUDA_POLL_SHIFT=16
run TIDEWIRE_PG_CUDA_BLOCKS=96
run TIDEWIRE_PG_CUDA_BLOCKS=128 TIDEWIRE_PG_CUDA_THREADS=256
run TIDEWIRE_PG_CUDA_BLOCKS=112
run TIDEWIRE_PG_CUDA_BLOCKS=64 TIDEWIRE_PG_CUDA_POLL_SHIFT=16
} > $O/stall.txt 2>&1
