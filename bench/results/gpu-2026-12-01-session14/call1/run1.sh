#!/usr/bin/env bash
# session 14, device call 1 (nvidia-h200: 16 CPUs; CPU only). Why do four reader threads read
# 2 MiB no faster than one (NOTES §52)? bench/pvr_bench.c apart from tidewire: two processes
# read each other's buffers by process_vm_readv with 1-8 threads (spinning or futex-woken),
# heap / no-THP / THP buffers, whole pieces or 256 KiB calls; memcpy from shared memory beside.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
{ date -u; nproc; uname -r; cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag; lscpu | head -20; } > $O/machine.txt 2>&1
timeout 500 dist/pvr/pvr_bench 200 > $O/pvr.txt 2>&1; echo "rc $? $SECONDS s" >> $O/machine.txt
