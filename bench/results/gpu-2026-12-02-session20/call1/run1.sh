#!/usr/bin/env bash
# session 20, device call 1 (nvidia-h200: one H200, 16 CPUs; CPU only). dist/base = HEAD
# (7e05cb4) with the session's first error fixes (no effect on the reads). The 4-rank
# all_to_all's reads cut three ways, each launched three times in turn, interleaved with Gloo:
# D = default; S512 = split from 512 KiB in >= 256 KiB pieces; S256T2 = split from 256 KiB in
# >= 128 KiB pieces on two threads. all_gather shares the cut: measured alongside.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-b --upgrade dist/base/*.whl
export PYTHONPATH=/tmp/site-b
{ date -u; nproc; uname -r; cat /sys/kernel/mm/transparent_hugepage/enabled; } > $O/machine.txt
pg() { timeout 70 python3 bench/pg_bench.py --device cpu --backends tidewire,gloo --interleave --iters 30 --ops all_to_all,all_gather --min-bytes 512K --max-bytes 4M --step 2 "$@" 2>&1 | grep -v Warn; }
run() {
  local name=$1; shift
  echo "## $name"; env "$@" bash -c "$(declare -f pg); pg --ranks $RANKS"; echo "$name rc $? $SECONDS s" >> $O/machine.txt
}
{
  for i in 1 2 3; do
    [ $SECONDS -lt 430 ] || break
    RANKS=4 run D$i X=1
    RANKS=4 run S512-$i TIDEWIRE_PG_READ_SPLIT_MIN=524288 TIDEWIRE_PG_READ_PIECE_MIN=262144
    RANKS=4 run S256T2-$i TIDEWIRE_PG_READ_SPLIT_MIN=262144 TIDEWIRE_PG_READ_PIECE_MIN=131072 TIDEWIRE_PG_COPY_THREADS=2
  done
  if [ $SECONDS -lt 480 ]; then
    RANKS=2 run D-2r X=1
    RANKS=2 run S512-2r TIDEWIRE_PG_READ_SPLIT_MIN=524288 TIDEWIRE_PG_READ_PIECE_MIN=262144
  fi
} > $O/large.txt
python3 bench/results/gpu-2026-12-01-session16/abtable.py $O/large.txt > $O/table.txt
