#!/usr/bin/env bash
# session 21, device call 6 (nvidia-h200: one H200, 16 CPUs; CPU only). The final wheel
# (dist/final, as call 5). Interleaved with Gloo, the four collectives 1 MiB - 16 MiB by
# factors of 2 (call 5 stepped by 4 and skipped 1 and 4 MiB): 4 ranks, 2 ranks, twice each.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-f --upgrade dist/final/*.whl
{ date -u; nproc; uname -r; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-f timeout 150 python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --iters 30 --min-bytes 1M --max-bytes 16M --step 2 "$@" 2>&1 | grep -v Warn; }
{
  for i in 1 2; do
    echo "## 4r-$i"; pg --ranks 4; echo "4r-$i rc $? $SECONDS s" >> $O/machine.txt
    echo "## 2r-$i"; pg --ranks 2; echo "2r-$i rc $? $SECONDS s" >> $O/machine.txt
  done
} > $O/large.txt
python3 bench/results/gpu-2026-12-01-session16/abtable.py $O/large.txt > $O/table.txt
cat $O/table.txt $O/machine.txt
