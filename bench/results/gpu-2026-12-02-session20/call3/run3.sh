#!/usr/bin/env bash
# session 20, device call 3 (nvidia-h200: one H200, ranks sharing it): dist/ep1 = the EP
# buffer's argument checks (active_ranks one word per rank, out's device, 16-byte inputs),
# receive hooks once and before the combine, the fallback's repeated experts; the collective
# layer's Poisoned ranks and all-at-once abort writes. test_ep (the kernels' suite over Gloo with
# the hook checks in its round trips); then the EP bench at T = 128 on one rank (the Python
# checks are on the host path of every call: its per-call time against session 19's).
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; nvidia-smi -L; } > $O/machine.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-ep1 --upgrade dist/ep1/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/site-base --upgrade dist/base/*.whl
export PYTHONPATH=/tmp/site-ep1
timeout 300 python3 -m pytest -v -p no:cacheprovider python/tests/test_ep.py > $O/tests-ep.txt 2>&1
echo "test_ep rc $? $SECONDS s" >> $O/machine.txt
for w in base ep1 base ep1; do
  echo "## $w" >> $O/ep-bench.txt
  PYTHONPATH=/tmp/site-$w timeout 60 python3 bench/ep_bench.py --ranks 1 --tokens 128 --iters 300 >> $O/ep-bench.txt 2>&1
  echo "bench $w rc $? $SECONDS s" >> $O/machine.txt
done
