#!/usr/bin/env bash
# session 9, device call 6 (nvidia-h200, one GPU, TIDEWIRE_TEST_SHARED_GPU=1; the pair not lent):
# the point-to-point test after its non-contiguous case was fixed (shapes), and the CUDA
# collective tests with every body on the shared GPU.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TIDEWIRE_TEST_SHARED_GPU=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
timeout 200 python3 -m pytest -q -rs -x -p no:cacheprovider python/tests/test_distributed.py -k "send_and_recv" > $O/py-p2p.txt 2>&1; echo "p2p rc $? $SECONDS s" >> $O/machine.txt
timeout 330 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_distributed.py -k "(cuda or default_stream) and not send_and_recv" > $O/py-coll.txt 2>&1; echo "coll rc $? $SECONDS s" >> $O/machine.txt
