#!/usr/bin/env bash
# session 15, device call 1 (nvidia-h200, one GPU, 16 CPUs). dist/s15a (HEAD: the staged range
# 1 MiB to 2 MiB per rank as committed in session 14, never measured on this host in that
# form; the fabric READ-fence change does not touch these paths). 1) the CUDA collectives'
# tests with both ranks on the one GPU (correctness only, a regression run of the final code);
# 2) the CPU rows, 8 B - 16 MiB, 2 and 4 ranks, tidewire and Gloo in the same command, twice.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-a --upgrade dist/s15a/*.whl
{ date -u; nproc; } > $O/machine.txt
PYTHONPATH=/tmp/site-a TIDEWIRE_TEST_SHARED_GPU=1 timeout 240 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k "staged_through_host or collectives_over_nvlink or another_stream" > $O/cuda-tests.txt 2>&1
echo "cuda rc $? $SECONDS s" >> $O/machine.txt
pg() { PYTHONPATH=/tmp/site-a timeout "$1" python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --step 2 --iters 30 "${@:2}" 2>&1 | grep -v Warn; }
for n in 2 4; do
  {
    for run in 1 2; do
      echo "## run $run small"; pg 60 --ranks $n --min-bytes 8 --max-bytes 4K
      echo "## run $run large"; pg 120 --ranks $n --min-bytes 512K --max-bytes 16M
    done
  } > $O/r$n.txt; echo "r$n rc $? $SECONDS s" >> $O/machine.txt
done
