#!/usr/bin/env bash
# session 14, device call 2 (nvidia-h200: 16 CPUs; CPU only). dist/s14a: all_reduce, all_gather
# and reduce_scatter of 256 KiB - 16 MiB staged through shared memory (call 1: process_vm_readv
# of heap memory pins every 4 KiB page). A = staged (default), B = staging off
# (TIDEWIRE_PG_STAGE_BYTES=0: the algorithms of session 13), C = staged up to 64 MiB;
# 2 and 4 ranks, 64 KiB - 64 MiB, Gloo up to 32 MiB in the same command.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site-a --upgrade dist/s14a/*.whl
{ date -u; nproc; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-a timeout "$1" python3 bench/pg_bench.py --device cpu "${@:2}" 2>&1 | grep -v Warn; }
for n in 2 4; do
  pg 120 --backends tidewire,gloo --ranks $n --min-bytes 64K --max-bytes 32M --step 2 > $O/r$n-A.txt; echo "r$n-A rc $? $SECONDS s" >> $O/machine.txt
  TIDEWIRE_PG_STAGE_BYTES=0 pg 60 --backends tidewire --ranks $n --min-bytes 64K --max-bytes 64M --step 2 > $O/r$n-B.txt; echo "r$n-B rc $? $SECONDS s" >> $O/machine.txt
  TIDEWIRE_PG_STAGED_MAX=67108864 pg 60 --backends tidewire --ranks $n --min-bytes 64K --max-bytes 64M --step 2 > $O/r$n-C.txt; echo "r$n-C rc $? $SECONDS s" >> $O/machine.txt
  TIDEWIRE_PG_STAGE_BYTES=0 pg 60 --backends tidewire --ranks $n --min-bytes 64K --max-bytes 64M --step 2 > $O/r$n-B2.txt; echo "r$n-B2 rc $? $SECONDS s" >> $O/machine.txt
  TIDEWIRE_PG_STAGED_MAX=67108864 pg 60 --backends tidewire --ranks $n --min-bytes 64K --max-bytes 64M --step 2 > $O/r$n-C2.txt; echo "r$n-C2 rc $? $SECONDS s" >> $O/machine.txt
done
