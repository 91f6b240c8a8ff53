#!/usr/bin/env bash
# session 20, device call 2 (nvidia-h200: one H200, 16 CPUs; CPU only). A = dist/base (the
# readers on one rayon pool of n - 1 threads), B = dist/pool1 (each helper a pool of one
# thread, handed its piece by name: no cascade of wake-ups). Interleaved with Gloo, the four
# collectives 512 KiB - 8 MiB: 4 ranks A B A B A B, 2 ranks A B.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-a --upgrade dist/base/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/site-b --upgrade dist/pool1/*.whl
{ date -u; nproc; } > $O/machine.txt
pg() { PYTHONPATH=$1 timeout 90 python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --iters 30 --min-bytes 512K --max-bytes 8M --step 2 --ranks $2 2>&1 | grep -v Warn; }
{
  for i in 1 2 3; do
    [ $SECONDS -lt 400 ] || break
    echo "## A$i"; pg /tmp/site-a 4; echo "A$i rc $? $SECONDS s" >> $O/machine.txt
    echo "## B$i"; pg /tmp/site-b 4; echo "B$i rc $? $SECONDS s" >> $O/machine.txt
  done
  if [ $SECONDS -lt 470 ]; then
    echo "## A-2r"; pg /tmp/site-a 2; echo "A-2r rc $? $SECONDS s" >> $O/machine.txt
    echo "## B-2r"; pg /tmp/site-b 2; echo "B-2r rc $? $SECONDS s" >> $O/machine.txt
  fi
} > $O/large.txt
python3 bench/results/gpu-2026-12-01-session16/abtable.py $O/large.txt > $O/table.txt
