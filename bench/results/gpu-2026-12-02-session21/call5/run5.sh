#!/usr/bin/env bash
# session 21, device call 5 (nvidia-h200: one H200, 16 CPUs; CPU only). The final wheel
# (dist/final: the all_to_all through pipes from three ranks on, pipes grown at first use).
# Interleaved with Gloo, the four collectives 8 B - 16 MiB: 4 ranks twice, 2 ranks once,
# 3 ranks once (all_to_all).
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-f --upgrade dist/final/*.whl
{ date -u; nproc; uname -r; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-f timeout 150 python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --iters 30 --max-bytes 16M --step 4 "$@" 2>&1 | grep -v Warn; }
{
  echo "## 4r-1"; pg --ranks 4; echo "4r-1 rc $? $SECONDS s" >> $O/machine.txt
  echo "## 2r-1"; pg --ranks 2; echo "2r-1 rc $? $SECONDS s" >> $O/machine.txt
  echo "## 4r-2"; pg --ranks 4; echo "4r-2 rc $? $SECONDS s" >> $O/machine.txt
} > $O/all.txt
{ echo "## 3r"; pg --ranks 3 --ops all_to_all --min-bytes 256K; echo "3r rc $? $SECONDS s" >> $O/machine.txt; } > $O/a2a3.txt
python3 bench/results/gpu-2026-12-01-session16/abtable.py $O/all.txt > $O/table.txt
python3 bench/results/gpu-2026-12-01-session16/abtable.py $O/a2a3.txt > $O/table3.txt
cat $O/table.txt $O/table3.txt $O/machine.txt
