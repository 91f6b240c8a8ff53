#!/usr/bin/env bash
# session 12, device call 4 (nvidia-h200: one H200, 16 CPUs; CPU only).
# 1. The elastic kill/stop/shrink tests (4 CPU ranks) three times on this host with dist/c
#    (the re-forming rule and the collectives' headers): other timing than the dev VM's.
# 2. The small calls' cost of the collectives' headers: B+C = dist/b with the thresholds
#    dist/c has by default (env), against dist/c (the same plus the headers); 2 and 4 ranks,
#    8 B - 4 KiB, three alternations; then dist/c's 4-rank all_reduce 1-8 MiB against Gloo.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
for w in b c; do python3 -m pip install -q --no-index --no-deps --target /tmp/site-$w --upgrade dist/$w/*.whl; done
{ date -u; nproc; } > $O/machine.txt
for i in 1 2 3; do
  PYTHONPATH=/tmp/site-c timeout 200 python3 -m pytest -q -p no:cacheprovider python/tests/test_distributed.py -k "every_survivor_agrees" > $O/elastic-$i.txt 2>&1
  echo "elastic run $i rc $? $SECONDS s" >> $O/machine.txt
done
small() { PYTHONPATH=/tmp/site-$2 timeout 60 python3 bench/pg_bench.py --ranks $1 --device cpu --max-bytes 4K --iters 30 --backends tidewire 2>&1 | grep -v Warn; }
{
  for n in 2 4; do for rep in 1 2 3; do
    echo "## B+C ranks $n rep $rep"; TIDEWIRE_PG_REDUCE_SPLIT_MIN=262144 TIDEWIRE_PG_REDUCE_PIECE_MIN=65536 small $n b
    echo "## C+headers ranks $n rep $rep"; small $n c
  done; done
  echo "## C+headers all_reduce 4 ranks, Gloo"
  PYTHONPATH=/tmp/site-c timeout 90 python3 bench/pg_bench.py --ranks 4 --device cpu --ops all_reduce --min-bytes 1M --max-bytes 8M --step 2 --iters 50 --backends tidewire,gloo 2>&1 | grep -v Warn
} > $O/small.txt 2>&1; echo "bench rc $? $SECONDS s" >> $O/machine.txt
