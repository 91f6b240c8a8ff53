#!/usr/bin/env bash
# session 16, device call 4 (nvidia-h200: one H200, 16 CPUs; CPU only). dist/s16c = HEAD: the
# reader pool woken during the round before each phase that uses it (H: threads spin up to
# 200 us for their work) against no warm-up (C: TIDEWIRE_PG_WARM_SPIN_US=0), H C H C at 4
# ranks and H C at 2 ranks, every run interleaved with Gloo, the four collectives 512 KiB-8 MiB.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-c --upgrade dist/s16c/*.whl
export PYTHONPATH=/tmp/site-c
{ date -u; nproc; } > $O/machine.txt
pg() { timeout 120 python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --min-bytes 512K --max-bytes 8M --step 2 --iters 30 "$@" 2>&1 | grep -v Warn; }
{
  for run in 1 2; do
    echo "## H4-$run"; pg --ranks 4; echo "H4-$run rc $? $SECONDS s" >> $O/machine.txt
    echo "## C4-$run"; TIDEWIRE_PG_WARM_SPIN_US=0 pg --ranks 4; echo "C4-$run rc $? $SECONDS s" >> $O/machine.txt
  done
  echo "## H2-1"; pg --ranks 2; echo "H2 rc $? $SECONDS s" >> $O/machine.txt
  echo "## C2-1"; TIDEWIRE_PG_WARM_SPIN_US=0 pg --ranks 2; echo "C2 rc $? $SECONDS s" >> $O/machine.txt
} > $O/ab.txt
