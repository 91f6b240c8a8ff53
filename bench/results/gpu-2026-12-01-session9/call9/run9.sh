#!/usr/bin/env bash
# session 9, device call 9 (nvidia-h200's 16-CPU host; the pair not lent): the metrics' cost on
# the main benchmark's host path (shm between two engines: 4 KiB x 1, 4 KiB x 128, 16,384 x
# 4 KiB paged; off / on alternating, 7 reps), and on device memory of the one GPU (both engines
# on cuda:0, 4 KiB x 1; 5 reps).
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
{ date -u; nvidia-smi -L; nproc; } > $O/machine.txt 2>&1
{ for rep in 1 2 3 4 5 6 7; do for mode in off on; do flag=""; [ $mode = on ] && flag="--metrics"
  for cfg in "--block-size 4KiB --batch-size 1" "--block-size 4KiB --batch-size 128" "--block-size 4KiB --batch-size 16384 --api paged"; do
    echo "## rep $rep metrics $mode [$cfg]"
    timeout 60 dist/tidewire bench --pair $cfg --duration 2s --baseline none $flag 2>&1 | grep -v "^#\|^tidewire_" | tail -1
  done; done; done
} > $O/metrics-cost-shm.txt 2>&1
echo "shm done $SECONDS s" >> $O/machine.txt
{ for rep in 1 2 3 4 5; do for mode in off on; do flag=""; [ $mode = on ] && flag="--metrics"
  echo "## rep $rep metrics $mode [gpu 0 -> 0, 4KiB x 1]"
  timeout 60 dist/tidewire bench --pair --gpu 0 --target-gpu 0 --block-size 4KiB --batch-size 1 --duration 2s --baseline none $flag 2>&1 | grep -v "^#\|^tidewire_" | tail -1
done; done
} > $O/metrics-cost-gpu.txt 2>&1
echo "all done $SECONDS s" >> $O/machine.txt
