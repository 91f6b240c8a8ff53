#!/usr/bin/env bash
# session 21, device call 3 (nvidia-h200: one H200, 16 CPUs; CPU only). One wheel (dist/pipes):
# A = the all_to_all's pairs through pipes (the default), B = TIDEWIRE_PG_PIPES=0 (their
# blocks by process_vm_readv, as before). Interleaved with Gloo, all_to_all 256 KiB - 8 MiB:
# 4 ranks A B A B A B, 2 ranks A B; then the four collectives once at 4 ranks with A.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-a --upgrade dist/pipes/*.whl
{ date -u; nproc; uname -r; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-a timeout 90 python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --iters 40 --min-bytes 256K --max-bytes 8M --step 2 "$@" 2>&1 | grep -v Warn; }
{
  for i in 1 2 3; do
    [ $SECONDS -lt 330 ] || break
    echo "## A$i"; pg --ranks 4 --ops all_to_all; echo "A$i rc $? $SECONDS s" >> $O/machine.txt
    echo "## B$i"; TIDEWIRE_PG_PIPES=0 pg --ranks 4 --ops all_to_all; echo "B$i rc $? $SECONDS s" >> $O/machine.txt
  done
  if [ $SECONDS -lt 400 ]; then
    echo "## A-2r"; pg --ranks 2 --ops all_to_all; echo "A-2r rc $? $SECONDS s" >> $O/machine.txt
    echo "## B-2r"; TIDEWIRE_PG_PIPES=0 pg --ranks 2 --ops all_to_all; echo "B-2r rc $? $SECONDS s" >> $O/machine.txt
  fi
} > $O/a2a.txt
python3 bench/results/gpu-2026-12-01-session16/abtable.py $O/a2a.txt > $O/table.txt
[ $SECONDS -lt 470 ] && { echo "## all4"; pg --ranks 4 --min-bytes 1M; } > $O/all4.txt
cat $O/table.txt; echo; cat $O/all4.txt | grep -v "^#" | head -40; cat $O/machine.txt
