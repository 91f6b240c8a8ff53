#!/usr/bin/env bash
# session 5, device call 2: CUDA collective tests (two-shot too), then the collective benchmarks
# with NCCL / Gloo in the same run.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nproc; git log -1 --format=%h 2>/dev/null; } > $O/machine.txt
timeout 300 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k cuda > $O/tests.txt 2>&1
{
python3 bench/pg_bench.py --backends tidewire,nccl --device cuda --ranks 2 --dtype bf16 --max-bytes 512M
python3 bench/pg_bench.py --backends tidewire,nccl --device cuda --ranks 2 --dtype bf16 --max-bytes 256K --graph
} > $O/pg-cuda.txt 2>&1
timeout 240 python3 bench/pg_bench.py --backends tidewire,gloo --ranks 2 --dtype fp32 --max-bytes 64M > $O/pg-cpu-2.txt 2>&1
timeout 240 python3 bench/pg_bench.py --backends tidewire,gloo --ranks 4 --dtype fp32 --max-bytes 64M > $O/pg-cpu-4.txt 2>&1
