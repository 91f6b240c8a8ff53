#!/usr/bin/env bash
# session 13, device call 1 (nvidia-h200: one H200, 16 CPUs; CPU only).
# The CPU collectives from 1 MiB to 1 GiB (every power of two), 4 and 2 ranks, Gloo in the same
# command: rows above 64 MiB were never measured. dist/e = ece62ac.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site-e --upgrade dist/e/*.whl
{ date -u; nproc; free -g; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-e timeout "$1" python3 bench/pg_bench.py --device cpu --backends tidewire,gloo "${@:2}" 2>&1 | grep -v Warn; }
pg 100 --ranks 4 --min-bytes 1M --max-bytes 64M --step 2 > $O/r4-small.txt; echo "r4-small rc $? $SECONDS s" >> $O/machine.txt
pg 200 --ranks 4 --min-bytes 128M --max-bytes 1G --step 2 > $O/r4-large.txt; echo "r4-large rc $? $SECONDS s" >> $O/machine.txt
pg 80 --ranks 2 --min-bytes 1M --max-bytes 64M --step 2 > $O/r2-small.txt; echo "r2-small rc $? $SECONDS s" >> $O/machine.txt
pg 180 --ranks 2 --min-bytes 128M --max-bytes 1G --step 2 > $O/r2-large.txt; echo "r2-large rc $? $SECONDS s" >> $O/machine.txt
