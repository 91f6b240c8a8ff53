#!/usr/bin/env bash
# session 14, device call 6 (nvidia-h200, one GPU, 16 CPUs). dist/s14e (fff855c + the CUDA
# suite's new part: functional collectives, two groups over the same ranks, groups of one,
# destroy and a new init, all on CUDA tensors). 1) the CUDA collectives' tests with both ranks
# on the one GPU (correctness only); 2) the CPU rows of the code as committed, A = staged
# 1-8 MiB, B = staging off, A B A B, 2 and 4 ranks, Gloo once in A1.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-e --upgrade dist/s14e/*.whl
{ date -u; nproc; } > $O/machine.txt
PYTHONPATH=/tmp/site-e TIDEWIRE_TEST_SHARED_GPU=1 timeout 240 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k "staged_through_host or collectives_over_nvlink or another_stream" > $O/cuda-tests.txt 2>&1
echo "cuda rc $? $SECONDS s" >> $O/machine.txt
pg() { PYTHONPATH=/tmp/site-e timeout "$1" python3 bench/pg_bench.py --device cpu --min-bytes 512K --max-bytes 16M --step 2 --iters 30 "${@:2}" 2>&1 | grep -v Warn; }
for n in 2 4; do
  {
    echo "## A1"; pg 150 --backends tidewire,gloo --ranks $n
    echo "## B1"; TIDEWIRE_PG_STAGE_BYTES=0 pg 60 --backends tidewire --ranks $n
    echo "## A2"; pg 60 --backends tidewire --ranks $n
    echo "## B2"; TIDEWIRE_PG_STAGE_BYTES=0 pg 60 --backends tidewire --ranks $n
  } > $O/r$n.txt; echo "r$n rc $? $SECONDS s" >> $O/machine.txt
done
