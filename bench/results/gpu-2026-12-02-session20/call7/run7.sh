#!/usr/bin/env bash
# session 20, device call 7 (nvidia-h200: one H200, ranks sharing it): dist/rev1 = the review's
# mends (a dispatch without a hook clears its handle address's hook state; a rank of another
# shape is not reported as failed): the kernels' suite over Gloo and the four shape tests.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-rev1 --upgrade dist/rev1/*.whl
export PYTHONPATH=/tmp/site-rev1
timeout 150 python3 -m pytest -v -p no:cacheprovider python/tests/test_ep.py -k "gloo-p2p-288 or another_shape" > $O/tests-ep.txt 2>&1
echo "test_ep rc $? $SECONDS s" > $O/machine.txt
