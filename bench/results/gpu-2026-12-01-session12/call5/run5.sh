#!/usr/bin/env bash
# session 12, device call 5 (nvidia-h200: one H200, 16 CPUs) with dist/d (= d8d7627: the
# review's fixes, the collectives' headers, the engine channel's saved counter reads):
# the CUDA collective tests with both ranks on the one GPU, then the elastic CPU tests twice
# and the Mooncake-interface tests (the SGLang flow on CPU).
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-d --upgrade dist/d/*.whl
export PYTHONPATH=/tmp/site-d
{ date -u; nproc; } > $O/machine.txt
TIDEWIRE_TEST_SHARED_GPU=1 timeout 240 python3 -m pytest -q -p no:cacheprovider python/tests/test_distributed.py -k cuda > $O/cuda-tests.txt 2>&1
echo "cuda tests rc $? $SECONDS s" >> $O/machine.txt
for i in 1 2; do
  timeout 150 python3 -m pytest -q -p no:cacheprovider python/tests/test_distributed.py -k "every_survivor_agrees" > $O/elastic-$i.txt 2>&1
  echo "elastic run $i rc $? $SECONDS s" >> $O/machine.txt
done
timeout 200 python3 -m pytest -q -p no:cacheprovider python/tests/test_mooncake.py > $O/mooncake.txt 2>&1
echo "mooncake rc $? $SECONDS s" >> $O/machine.txt
