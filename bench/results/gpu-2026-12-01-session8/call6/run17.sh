#!/usr/bin/env bash
# session 8, device call 6 (one H200: the pair was not lent): the CPU collectives on 4 ranks
# against Gloo after the pooled, rotated reads (1-8 MiB, and small calls up to 4 KiB).
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nproc; lscpu | grep -i "model name"; } > $O/machine.txt 2>&1
{ for R in 4 2; do echo "## ranks $R, 1-8 MiB"; timeout 70 python3 bench/pg_bench.py --backends tidewire,gloo --ranks $R --min-bytes 1M --max-bytes 8M --iters 10; done
  echo "## ranks 4, small"; timeout 40 python3 bench/pg_bench.py --backends tidewire,gloo --ranks 4 --max-bytes 4K --iters 10; } > $O/pg-cpu.txt 2>&1
echo "all done $SECONDS s" >> $O/machine.txt
