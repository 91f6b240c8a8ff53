#!/usr/bin/env bash
# session 21, device call 9 (nvidia-h200: one H200, 16 CPUs; CPU only). The session's last
# wheel (dist/final3: pipes set up at a pair's first all_to_all that uses them, the review's
# mends) against call 8's rows: all_to_all 1 - 8 MiB interleaved with Gloo, 4 ranks and
# 2 ranks once each (the device budget's last minutes).
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-h --upgrade dist/final3/*.whl
{ date -u; nproc; uname -r; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-h timeout 60 python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --iters 30 --min-bytes 1M --max-bytes 8M --step 2 --ops all_to_all "$@" 2>&1 | grep -v Warn; }
{
  echo "## 4r"; pg --ranks 4; echo "4r rc $? $SECONDS s" >> $O/machine.txt
  echo "## 2r"; pg --ranks 2; echo "2r rc $? $SECONDS s" >> $O/machine.txt
} > $O/a2a.txt
python3 bench/results/gpu-2026-12-01-session16/abtable.py $O/a2a.txt > $O/table.txt
cat $O/table.txt $O/machine.txt
