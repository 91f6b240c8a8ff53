#!/usr/bin/env bash
# session 17, device call 5 (nvidia-h200: one H200, 16 CPUs). Why the combine's send kernel
# got ~1 us slower with the EP table (calls 2-4): ncu's launch statistics and occupancy of
# tw_ep_combine_send (1 rank, T=128) for s17b (peer addresses as arguments), s17e (the table)
# and s17f (s17e with __launch_bounds__(1024, 2) on that kernel: at most 32 registers, two
# blocks of 1024 threads per SM); then ep_bench e against f (1 and 2 ranks).
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
{ date -u; nproc; } > $O/machine.txt
for w in s17b s17e s17f; do
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-$w --upgrade dist/$w/*.whl
done
for w in s17b s17e s17f; do
  echo "## $w" >> $O/ncu.txt
  PYTHONPATH=/tmp/site-$w timeout 90 ncu --clock-control none --target-processes all -k regex:tw_ep_combine_send \
    --launch-skip 30 --launch-count 1 --section LaunchStats --section Occupancy --section SpeedOfLight \
    python3 bench/ep_bench.py --ranks 1 --tokens 128 --iters 40 2>&1 \
    | grep -E 'Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit Registers|Duration|Static Shared|Waves Per SM|Block Limit Shared' >> $O/ncu.txt
  echo "$w ncu $SECONDS s" >> $O/machine.txt
done
for w in s17e s17f; do
  for r in 1 2; do
    echo "== $w ranks $r" >> $O/bench.txt
    PYTHONPATH=/tmp/site-$w timeout 60 python3 bench/ep_bench.py --ranks $r --tokens 128 --iters 300 >> $O/bench.txt 2>&1
    echo "$w ranks $r rc $? $SECONDS s" >> $O/machine.txt
  done
done
