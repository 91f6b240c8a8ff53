#!/usr/bin/env bash
# session 18, device call 5 (nvidia-h200: one H200, ranks sharing it): dist/s18d = ce49518 (the
# review's mends: release threads in the relaxed capture mode, gate tensors kept natively, the
# capture check before re-forming). What the device time left allows: the stale-graph test, the
# CUDA elastic flow with the EP buffer, the graph-replay collectives test.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; } > $O/machine.txt
python3 -m pip install -q --no-index --no-deps --target /tmp/site-s18d --upgrade dist/s18d/*.whl
export PYTHONPATH=/tmp/site-s18d
timeout 140 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py \
  -k "re_formed_moves_nothing or elastic_flow_on_cuda or over_nvlink_match_the_references_and_replay_in_a_graph" > $O/tests.txt 2>&1
echo "s18d rc $? $SECONDS s" >> $O/machine.txt
