#!/usr/bin/env bash
# session 16, device call 5 (nvidia-h200: one H200, 16 CPUs; CPU only). dist/s16d = HEAD (the
# session's final code: all_to_all's blocks half written by their sender where a rank reads two
# or more peers, no pool warm-up). Interleaved with Gloo: 8 B - 4 KiB at 4 and 2 ranks, then
# 512 KiB - 8 MiB at 4 ranks twice and 2 ranks twice, the four collectives.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-d --upgrade dist/s16d/*.whl
export PYTHONPATH=/tmp/site-d
{ date -u; nproc; } > $O/machine.txt
pg() { timeout 120 python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --iters 30 "$@" 2>&1 | grep -v Warn; }
{
  for n in 4 2; do echo "## small$n"; pg --ranks $n --max-bytes 4K --step 4; echo "small$n rc $? $SECONDS s" >> $O/machine.txt; done
} > $O/small.txt
{
  for run in 1 2; do for n in 4 2; do
    echo "## N$n-$run"; pg --ranks $n --min-bytes 512K --max-bytes 8M --step 2; echo "N$n-$run rc $? $SECONDS s" >> $O/machine.txt
  done; done
} > $O/large.txt
