#!/usr/bin/env bash
# session 18, device call 2 (nvidia-h200: one H200, 16 CPUs). dist/s18b = s18a (call 1) with
# (1) the old view's communicator and NVLink path freed on a thread of their own at re-forming,
# (2) the EP table's load overlapped: dispatch_send stores it at the count's barrier, and
# combine_send loads each warp's first piece of rows before the table's barrier.
# Tests (shared GPU): test_ep, test_distributed -k cuda; then ncu registers / duration of the two
# kernels (a, b), then ep_bench T=128 a b a b at 1 and 2 ranks.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ date -u; nproc; } > $O/machine.txt
for w in s18a s18b; do
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-$w --upgrade dist/$w/*.whl
done
TIDEWIRE_TEST_SHARED_GPU=1 PYTHONPATH=/tmp/site-s18b timeout 120 python3 -m pytest -v -p no:cacheprovider python/tests/test_ep.py > $O/tests.txt 2>&1
echo "s18b test_ep rc $? $SECONDS s" >> $O/machine.txt
TIDEWIRE_TEST_SHARED_GPU=1 PYTHONPATH=/tmp/site-s18b timeout 200 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k cuda >> $O/tests.txt 2>&1
echo "s18b test_distributed -k cuda rc $? $SECONDS s" >> $O/machine.txt
for w in s18a s18b; do
  echo "## $w" >> $O/ncu.txt
  PYTHONPATH=/tmp/site-$w timeout 60 ncu --clock-control none --target-processes all -k regex:"tw_ep_combine_send|tw_ep_dispatch_send" \
    --launch-skip 60 --launch-count 2 --section LaunchStats --section Occupancy --section SpeedOfLight --section MemoryWorkloadAnalysis \
    python3 bench/ep_bench.py --ranks 1 --tokens 128 --iters 40 2>&1 \
    | grep -E 'tw_ep_|Registers Per|Achieved Occupancy|Duration|Local Memory|Waves Per SM' >> $O/ncu.txt
  echo "$w ncu $SECONDS s" >> $O/machine.txt
done
for w in s18a s18b s18a s18b; do
  for r in 1 2; do
    echo "== $w ranks $r" >> $O/bench.txt
    PYTHONPATH=/tmp/site-$w timeout 45 python3 bench/ep_bench.py --ranks $r --tokens 128 --iters 300 >> $O/bench.txt 2>&1
    echo "$w ranks $r rc $? $SECONDS s" >> $O/machine.txt
  done
done
