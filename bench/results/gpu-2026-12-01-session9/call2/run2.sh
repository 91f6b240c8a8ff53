#!/usr/bin/env bash
# session 9, device call 2 (nvidia-h200, one GPU, TIDEWIRE_TEST_SHARED_GPU=1): the CUDA elastic
# scenario again after the test's fix (a failed CUDA collective says so at the group's next call).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TIDEWIRE_TEST_SHARED_GPU=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
timeout 200 python3 -m pytest -q -rs -s -p no:cacheprovider python/tests/test_distributed.py -k "cuda_an_ep_dispatch" > $O/py-elastic.txt 2>&1; echo "elastic rc $? $SECONDS s" >> $O/machine.txt
