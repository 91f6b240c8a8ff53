#!/usr/bin/env bash
# session 18, device call 1 (nvidia-h200: one H200, ranks sharing it): branch next/ep-prologue
# (bd66591 = main 6ed3bb3 + combine_send's block verdict, tw_fits over every rank, graph replays
# checked against the truth, a graph replayed after destroy) — the EP buffer's GPU tests, the
# collectives' CUDA tests (the stopped EP rank, the elastic flow), test_gpu / test_native.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; nvidia-smi -L; } > $O/machine.txt
python3 -m pip install -q --no-index --no-deps --target /tmp/site-s18a --upgrade dist/s18a/*.whl
export PYTHONPATH=/tmp/site-s18a
timeout 170 python3 -m pytest -v -p no:cacheprovider python/tests/test_ep.py > $O/tests-ep.txt 2>&1
echo "test_ep rc $? $SECONDS s" >> $O/machine.txt
timeout 220 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k cuda > $O/tests-coll.txt 2>&1
echo "test_distributed -k cuda rc $? $SECONDS s" >> $O/machine.txt
timeout 150 python3 -m pytest -v -p no:cacheprovider python/tests/test_gpu.py python/tests/test_native.py > $O/tests-gpu.txt 2>&1
echo "test_gpu test_native rc $? $SECONDS s" >> $O/machine.txt
