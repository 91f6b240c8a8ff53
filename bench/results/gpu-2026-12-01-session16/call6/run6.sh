#!/usr/bin/env bash
# session 16, device call 6 (nvidia-h200: one H200, 16 CPUs; CPU only). dist/s16e = HEAD, the
# session's final code (all_to_all reads only again; receives from any source). Interleaved
# with Gloo: 512 KiB - 8 MiB at 4 and 2 ranks, the four collectives, once each.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-e --upgrade dist/s16e/*.whl
export PYTHONPATH=/tmp/site-e
{ date -u; nproc; } > $O/machine.txt
pg() { timeout 100 python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --iters 30 "$@" 2>&1 | grep -v Warn; }
{
  for n in 4 2; do
    echo "## F$n"; pg --ranks $n --min-bytes 512K --max-bytes 8M --step 2; echo "F$n rc $? $SECONDS s" >> $O/machine.txt
  done
} > $O/large.txt
