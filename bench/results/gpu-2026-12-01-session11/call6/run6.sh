#!/usr/bin/env bash
# session 11, device call 6 (nvidia-h200-x2's 32-CPU host; CPU only): the readers' pieces A/B.
# new (the default now): one piece below 1 MiB, pieces of at least 1 MiB (or half the bytes)
# above; old: TIDEWIRE_PG_SPLIT_MIN=524288 TIDEWIRE_PG_PIECE_MIN=131072 (the thresholds until
# now). All four collectives, 2 and 4 ranks, 512 KiB - 8 MiB, alternating, Gloo once per count.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
date -u > $O/machine.txt
b() { timeout 60 python3 bench/pg_bench.py --ranks $1 --device cpu --min-bytes 512K --max-bytes 8M --step 2 --backends $2 2>&1 | grep -v Warn; }
for n in 4 2; do
  echo "## gloo ranks $n"; b $n gloo
  for rep in 1 2; do
    echo "## new ranks $n rep $rep"; b $n tidewire
    echo "## old ranks $n rep $rep"; TIDEWIRE_PG_SPLIT_MIN=524288 TIDEWIRE_PG_PIECE_MIN=131072 b $n tidewire
  done
done > $O/ab.txt 2>&1; echo "rc $? $SECONDS s" >> $O/machine.txt
