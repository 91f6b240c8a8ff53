#!/usr/bin/env bash
# session 9, device call 4 (nvidia-h200's 16-CPU host; CPU only): the plain reads of all_gather
# and all_to_all on the caller's thread up to 2 MiB, 1 MiB a thread above (wheel B, this tree)
# against the thresholds before (wheel A, dist/A): 2 and 4 ranks, alternating A B A B.
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/siteA --upgrade dist/A/*.whl
python3 -m pip install -q --no-index --no-deps --target /tmp/siteB --upgrade dist/tidewire-*.whl
{ date -u; nproc; } > $O/machine.txt 2>&1
for rep in 1 2; do for n in 4 2; do for w in A B; do
  echo "== rep $rep ranks $n wheel $w" >> $O/reads.txt
  PYTHONPATH=/tmp/site$w timeout 100 python3 bench/pg_bench.py --backends tidewire --ranks $n --ops all_gather,all_to_all --min-bytes 256K --max-bytes 8M --step 2 --iters 30 >> $O/reads.txt 2>&1
done; done; done
echo "done $SECONDS s" >> $O/machine.txt
