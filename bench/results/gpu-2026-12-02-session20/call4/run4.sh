#!/usr/bin/env bash
# session 20, device call 4 (nvidia-h200: one H200, ranks sharing it): dist/shape1 = every EP
# signal carries 16 bits naming the call's shape (tokens per rank, hidden, experts, fp8); a
# signal of another shape marks its sender inactive, counted apart, and the next call raises
# naming it. test_ep (the new shape tests: hidden, experts, tokens, fp8 differing between the
# two ranks; the kernels' suite over Gloo); the EP bench at T = 128 on one rank, ep1 (call 3's
# wheel) against shape1, twice each.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; nvidia-smi -L; } > $O/machine.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-shape1 --upgrade dist/shape1/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/site-ep1 --upgrade dist/ep1/*.whl
export PYTHONPATH=/tmp/site-shape1
timeout 400 python3 -m pytest -v -p no:cacheprovider python/tests/test_ep.py > $O/tests-ep.txt 2>&1
echo "test_ep rc $? $SECONDS s" >> $O/machine.txt
for w in ep1 shape1 ep1 shape1; do
  echo "## $w" >> $O/ep-bench.txt
  PYTHONPATH=/tmp/site-$w timeout 60 python3 bench/ep_bench.py --ranks 1 --tokens 128 --iters 300 >> $O/ep-bench.txt 2>&1
  echo "bench $w rc $? $SECONDS s" >> $O/machine.txt
done
