#!/usr/bin/env bash
# session 17, device call 1 (nvidia-h200: one H200, 16 CPUs), every rank on the one GPU
# (TIDEWIRE_TEST_SHARED_GPU=1). dist/s17a = 9e2d053 (the EP buffer reused across
# update_ep_member); dist/s17b = the working tree (a new buffer per membership).
# 1. The new test (a stopped EP rank, replaced, resumed, dispatching) with s17a: expected to
#    fail (its stale dispatch read as the replacement's), showing the hazard is real.
# 2. With s17b: the same test, the EP buffer's GPU tests, the collectives' CUDA tests (the
#    SGLang elastic flow with the EP buffer, killed and stopped ranks, the survivors' path).
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $O/machine.txt
for w in s17a s17b; do
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-$w --upgrade dist/$w/*.whl
done
PYTHONPATH=/tmp/site-s17a timeout 150 python3 -m pytest -q -p no:cacheprovider python/tests/test_distributed.py \
  -k stopped_ep_rank > $O/old-stale.txt 2>&1
echo "old wheel, stale test rc $? $SECONDS s" >> $O/machine.txt
export PYTHONPATH=/tmp/site-s17b
timeout 150 python3 -m pytest -q -p no:cacheprovider python/tests/test_distributed.py -k stopped_ep_rank > $O/new-stale.txt 2>&1
echo "new wheel, stale test rc $? $SECONDS s" >> $O/machine.txt
timeout 200 python3 -m pytest -q -p no:cacheprovider python/tests/test_ep.py > $O/new-ep.txt 2>&1
echo "new wheel, test_ep rc $? $SECONDS s" >> $O/machine.txt
timeout 240 python3 -m pytest -q -p no:cacheprovider python/tests/test_distributed.py -k "cuda and not stopped_ep_rank" > $O/new-cuda.txt 2>&1
echo "new wheel, cuda tests rc $? $SECONDS s" >> $O/machine.txt
