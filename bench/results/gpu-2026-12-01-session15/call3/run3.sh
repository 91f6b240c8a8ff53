#!/usr/bin/env bash
# session 15, device call 3 (nvidia-h200, 16 CPUs, CPU only). The 4-rank all_to_all at 1-2 MiB
# sat at 2.1-2.7x Gloo on this session's host with either code (call 2). Measure before
# changing anything: the read knobs on HEAD (dist/s15a), twice in alternation, Gloo once.
# D = default (one thread below 1 MiB of reads, pieces >= 1 MiB); T1 = one thread always;
# S512 = split from 512 KiB in pieces >= 256 KiB; S256 = from 256 KiB in >= 128 KiB;
# S256T2 = S256 with at most two threads.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site-n --upgrade dist/s15a/*.whl
{ date -u; nproc; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-n timeout "$1" python3 bench/pg_bench.py --device cpu --ranks 4 --ops all_to_all --min-bytes 512K --max-bytes 8M --step 2 --iters 50 "${@:2}" 2>&1 | grep -v Warn; }
{
  echo "## G"; pg 120 --backends gloo
  for run in 1 2; do
    echo "## D$run"; pg 60 --backends tidewire
    echo "## T1$run"; TIDEWIRE_PG_COPY_THREADS=1 pg 60 --backends tidewire
    echo "## S512$run"; TIDEWIRE_PG_READ_SPLIT_MIN=524288 TIDEWIRE_PG_READ_PIECE_MIN=262144 pg 60 --backends tidewire
    echo "## S256$run"; TIDEWIRE_PG_READ_SPLIT_MIN=262144 TIDEWIRE_PG_READ_PIECE_MIN=131072 pg 60 --backends tidewire
    echo "## S256T2$run"; TIDEWIRE_PG_COPY_THREADS=2 TIDEWIRE_PG_READ_SPLIT_MIN=262144 TIDEWIRE_PG_READ_PIECE_MIN=131072 pg 60 --backends tidewire
  done
} > $O/r4.txt; echo "r4 rc $? $SECONDS s" >> $O/machine.txt
