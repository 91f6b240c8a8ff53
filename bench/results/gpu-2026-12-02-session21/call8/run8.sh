#!/usr/bin/env bash
# session 21, device call 8 (nvidia-h200: one H200, 16 CPUs; CPU only). The final wheel
# (dist/final2: call 6's, and a group of two's pair through its pipes from 1 MiB to under
# 8 MiB). As call 6: interleaved with Gloo, the four collectives 1 MiB - 16 MiB by factors
# of 2, 2 ranks twice, 4 ranks once.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-g --upgrade dist/final2/*.whl
{ date -u; nproc; uname -r; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-g timeout 150 python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --iters 30 --min-bytes 1M --max-bytes 16M --step 2 "$@" 2>&1 | grep -v Warn; }
{
  echo "## 2r-1"; pg --ranks 2; echo "2r-1 rc $? $SECONDS s" >> $O/machine.txt
  echo "## 4r-1"; pg --ranks 4; echo "4r-1 rc $? $SECONDS s" >> $O/machine.txt
  echo "## 2r-2"; pg --ranks 2; echo "2r-2 rc $? $SECONDS s" >> $O/machine.txt
} > $O/large.txt
python3 bench/results/gpu-2026-12-01-session16/abtable.py $O/large.txt > $O/table.txt
cat $O/table.txt $O/machine.txt
