#!/usr/bin/env bash
# session 13, device call 4 (nvidia-h200: one H200, 16 CPUs). dist/f = this session's code
# (works' outcome(), get_local_success on CUDA works, the debug log's choices, peers opened
# within the group's timeout): the collectives' CUDA tests with both ranks on the one GPU
# (correctness only), with the new check that async_op and wait() do not hold the host; then
# the CPU kill / stop test with a pending receive and the debug-log test on this host.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-f --upgrade dist/f/*.whl
{ date -u; nproc; nvidia-smi -L; } > $O/machine.txt 2>&1
PYTHONPATH=/tmp/site-f TIDEWIRE_TEST_SHARED_GPU=1 timeout 300 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k cuda > $O/cuda-tests.txt 2>&1
echo "cuda rc $? $SECONDS s" >> $O/machine.txt
PYTHONPATH=/tmp/site-f timeout 150 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k "killed_or_stopped_rank_fails or debug_log or mooncake_pg_names" > $O/cpu-tests.txt 2>&1
echo "cpu rc $? $SECONDS s" >> $O/machine.txt
