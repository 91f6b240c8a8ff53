#!/usr/bin/env bash
# session 21, device call 7 (nvidia-h200: one H200, 16 CPUs; CPU only). Two ranks: should
# their pair use pipes too? A = dist/two (pipes from two ranks on, our own block copied on a
# pool thread beside the pipe), B = dist/final (two ranks by process_vm_readv, as before).
# Interleaved with Gloo, all_to_all 256 KiB - 16 MiB, A B A B A B.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-a --upgrade dist/two/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/site-b --upgrade dist/final/*.whl
{ date -u; nproc; uname -r; } > $O/machine.txt
pg() { PYTHONPATH=$1 timeout 90 python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --iters 40 --min-bytes 256K --max-bytes 16M --step 2 --ranks 2 --ops all_to_all 2>&1 | grep -v Warn; }
{
  for i in 1 2 3; do
    echo "## A$i"; pg /tmp/site-a; echo "A$i rc $? $SECONDS s" >> $O/machine.txt
    echo "## B$i"; pg /tmp/site-b; echo "B$i rc $? $SECONDS s" >> $O/machine.txt
  done
} > $O/a2a2.txt
python3 bench/results/gpu-2026-12-01-session16/abtable.py $O/a2a2.txt > $O/table.txt
cat $O/table.txt $O/machine.txt
