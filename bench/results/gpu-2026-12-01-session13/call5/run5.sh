#!/usr/bin/env bash
# session 13, device call 5 (nvidia-h200, one GPU): call 4's failing staged-path test again
# after the review's mend (the no-host-wait checks apply to the NVLink path only), with the
# NVLink-path test beside it; both ranks on the one GPU (correctness only). dist/f.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-f --upgrade dist/f/*.whl
PYTHONPATH=/tmp/site-f TIDEWIRE_TEST_SHARED_GPU=1 timeout 200 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k "staged_through_host or collectives_over_nvlink" > $O/cuda-tests.txt 2>&1
echo "cuda rc $? $SECONDS s" > $O/machine.txt
