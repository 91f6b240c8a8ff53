#!/usr/bin/env bash
# session 17, device call 2 (nvidia-h200: one H200, 16 CPUs), ranks sharing the one GPU.
# dist/s17b = 0eaaf9b (peer addresses as kernel arguments); dist/s17c = the working tree (the
# EP table: every rank's buffer read from device memory at each launch, so a graph captured
# before update_ep_member replays on the new buffers).
# 1. s17c: the EP buffer's GPU tests (the graph now replayed across an update_ep_member), the
#    stopped-and-resumed rank test and the CUDA elastic flow.
# 2. ep_bench, s17b against s17c alternating (b c b c), 1 rank (the kernels' fixed cost, no
#    peer) and 2 ranks on the one GPU (time-sliced: a rough figure).
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > $O/machine.txt
for w in s17b s17c; do
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-$w --upgrade dist/$w/*.whl
done
export PYTHONPATH=/tmp/site-s17c
timeout 200 python3 -m pytest -q -p no:cacheprovider python/tests/test_ep.py > $O/tests.txt 2>&1
echo "s17c test_ep rc $? $SECONDS s" >> $O/machine.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider python/tests/test_distributed.py -k "stopped_ep_rank or cuda_an_ep" >> $O/tests.txt 2>&1
echo "s17c stale + cuda elastic rc $? $SECONDS s" >> $O/machine.txt
for w in s17b s17c s17b s17c; do
  for r in 1 2; do
    echo "== $w ranks $r" >> $O/bench.txt
    PYTHONPATH=/tmp/site-$w timeout 60 python3 bench/ep_bench.py --ranks $r --tokens 128 --iters 300 >> $O/bench.txt 2>&1
    echo "$w ranks $r rc $? $SECONDS s" >> $O/machine.txt
  done
done
