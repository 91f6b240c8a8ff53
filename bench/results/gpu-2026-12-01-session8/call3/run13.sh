#!/usr/bin/env bash
# session 8, device call 3: eager small CUDA calls after the raw-stream change (pg_bench,
# tidewire and NCCL), EP at T=128 (raw streams), and ncu of the dispatch kernels
# (warp stalls by source line).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
timeout 90 python3 bench/pg_bench.py --backends tidewire,nccl --device cuda --dtype bf16 --max-bytes 256K --iters 20 > $O/pg-eager.txt 2>&1
echo "pg done $SECONDS s" >> $O/machine.txt
timeout 120 python3 bench/ep_bench.py --tokens 128 2>&1 | grep -v arn > $O/ep.txt
echo "ep done $SECONDS s" >> $O/machine.txt
timeout 240 ncu --target-processes all -k regex:tw_ep_dispatch --launch-skip 40 --launch-count 2 \
  --section SpeedOfLight --section WarpStateStats --section SourceCounters --section LaunchStats --section Occupancy \
  -o /tmp/ep_%p -f python3 bench/ep_bench.py --tokens 128 --iters 60 > /tmp/ncu-run.txt 2>&1; echo "rc $?" >> /tmp/ncu-run.txt
tail -5 /tmp/ncu-run.txt > $O/ncu.txt
for r in /tmp/ep_*.ncu-rep; do echo "## $r" >> $O/ncu.txt; ncu --import $r --page details >> $O/ncu.txt 2>&1
  ncu --import $r --page source --csv --print-source cuda,sass -k regex:send > $r.src.csv 2>&1; done
ls -la /tmp/ep_* >> $O/ncu.txt
f=$(ls /tmp/ep_*.src.csv | head -1); gzip -c $f > $O/send-src.csv.gz
echo "all done $SECONDS s" >> $O/machine.txt
