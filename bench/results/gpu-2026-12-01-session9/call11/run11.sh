#!/usr/bin/env bash
# session 9, device call 11 (nvidia-h200, one GPU, TIDEWIRE_TEST_SHARED_GPU=1; the pair not lent):
# after the review of the whole change (one stream helper, one device check for the NVLink path,
# the EP buffer's renumbering in one place): the p2p, elastic-scenario and survivors tests.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TIDEWIRE_TEST_SHARED_GPU=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
timeout 250 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_distributed.py -k "send_and_recv or cuda_an_ep_dispatch or new_nvlink_path or default_stream" > $O/py-gpu.txt 2>&1; echo "gpu rc $? $SECONDS s" >> $O/machine.txt
