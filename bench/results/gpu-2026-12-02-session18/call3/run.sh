#!/usr/bin/env bash
# session 18, device call 3 (nvidia-h200: one H200, ranks sharing it). dist/s18c = s18b + the
# CUDA path's gate (a graph captured before the group re-formed moves nothing on replay and is
# logged). The new test with s18b (no gate: expected to fail) and s18c; test_distributed -k cuda
# and test_ep with s18c; pg_bench's graph-replayed all_reduce (2 ranks sharing the GPU) b c b c.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; } > $O/machine.txt
for w in s18b s18c; do
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-$w --upgrade dist/$w/*.whl
done
K=test_a_cuda_graph_captured_before_the_group_re_formed
PYTHONPATH=/tmp/site-s18b timeout 100 python3 -m pytest -q -p no:cacheprovider python/tests/test_distributed.py -k $K > $O/stale-s18b.txt 2>&1
echo "s18b stale-graph test rc $? $SECONDS s" >> $O/machine.txt
PYTHONPATH=/tmp/site-s18c timeout 230 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k cuda > $O/tests.txt 2>&1
echo "s18c test_distributed -k cuda rc $? $SECONDS s" >> $O/machine.txt
PYTHONPATH=/tmp/site-s18c timeout 100 python3 -m pytest -v -p no:cacheprovider python/tests/test_ep.py >> $O/tests.txt 2>&1
echo "s18c test_ep rc $? $SECONDS s" >> $O/machine.txt
for w in s18b s18c s18b s18c; do
  echo "== $w" >> $O/bench.txt
  PYTHONPATH=/tmp/site-$w timeout 40 python3 bench/pg_bench.py --device cuda --ranks 2 --backends tidewire --graph \
    --ops all_reduce --max-bytes 256K --iters 200 >> $O/bench.txt 2>&1
  echo "$w pg_bench graph rc $? $SECONDS s" >> $O/machine.txt
done
