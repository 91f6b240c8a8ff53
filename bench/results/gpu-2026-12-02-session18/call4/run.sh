#!/usr/bin/env bash
# session 18, device call 4 (nvidia-h200: one H200, ranks sharing it): the stale-graph test
# (its body now registered) with s18b (no gate) and s18c (the gate).
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; } > $O/machine.txt
K=test_a_cuda_graph_captured_before_the_group_re_formed
for w in s18c s18b; do
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-$w --upgrade dist/$w/*.whl
  PYTHONPATH=/tmp/site-$w timeout 60 python3 -m pytest -q -p no:cacheprovider python/tests/test_distributed.py -k $K > $O/stale-$w.txt 2>&1
  echo "$w stale-graph test rc $? $SECONDS s" >> $O/machine.txt
done
