#!/usr/bin/env bash
# session 9, device call 3 (nvidia-h200's 16-CPU host; CPU only): where the 4-rank all_to_all at
# 2 MiB spends its time. tidewire with the readers' threads at 1/2/4(default)/8, and with direct
# reads off (the rings), against Gloo in the same run; the default twice.
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nproc; } > $O/machine.txt 2>&1
A="--ranks 4 --ops all_to_all --min-bytes 512K --max-bytes 8M --step 2 --iters 30"
for v in "X=default" "TIDEWIRE_PG_COPY_THREADS=1" "TIDEWIRE_PG_COPY_THREADS=2" "TIDEWIRE_PG_COPY_THREADS=8" "TIDEWIRE_PG_DIRECT=0" "X=default-again"; do
  echo "== $v" >> $O/a2a.txt
  env $v timeout 100 python3 bench/pg_bench.py --backends tidewire $A >> $O/a2a.txt 2>&1
done
echo "== gloo" >> $O/a2a.txt
timeout 100 python3 bench/pg_bench.py --backends gloo $A >> $O/a2a.txt 2>&1
echo "done $SECONDS s" >> $O/machine.txt
