#!/usr/bin/env bash
# session 17, device call 6 (nvidia-h200: one H200, ranks sharing it): the final code
# (dist/s17g = s17f of call 5 with the kernel's comment) — the EP buffer's GPU tests, the
# stopped-and-resumed rank test and the CUDA elastic flow.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; } > $O/machine.txt
python3 -m pip install -q --no-index --no-deps --target /tmp/site-s17g --upgrade dist/s17g/*.whl
export PYTHONPATH=/tmp/site-s17g
timeout 150 python3 -m pytest -q -p no:cacheprovider python/tests/test_ep.py > $O/tests.txt 2>&1
echo "s17g test_ep rc $? $SECONDS s" >> $O/machine.txt
timeout 140 python3 -m pytest -q -p no:cacheprovider python/tests/test_distributed.py -k "stopped_ep_rank or cuda_an_ep" >> $O/tests.txt 2>&1
echo "s17g stale + cuda elastic rc $? $SECONDS s" >> $O/machine.txt
