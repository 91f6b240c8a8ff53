#!/usr/bin/env bash
# session 13, device call 8 (nvidia-h200: one H200, 16 CPUs; CPU only). Call 7: at 2-4 MiB
# four reader threads were no faster than one (2 ranks' all_reduce, 4 MiB: reduction 286-314 us
# with four, 318 with one). Rayon woke sleeping threads only as far as it judged idle ones
# missing. B = the readers' jobs shared by the caller and every pool thread, each woken by a
# broadcast (dist/h) against A (dist/g); 2 and 4 ranks, the four collectives 1-16 MiB, A B A B;
# Gloo once per rank count (all_reduce, all_to_all).
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
for w in g h; do python3 -m pip install -q --no-index --no-deps --target /tmp/site-$w --upgrade dist/$w/*.whl; done
{ date -u; nproc; } > $O/machine.txt
pg() { PYTHONPATH=/tmp/site-$1 timeout 60 python3 bench/pg_bench.py --device cpu --min-bytes 1M --max-bytes 16M --step 2 --iters 30 "${@:2}" 2>&1 | grep -v Warn; }
{
  for n in 2 4; do
    echo "## gloo ranks $n"; pg g --ranks $n --backends gloo --ops all_reduce,all_to_all
    for rep in 1 2; do
      echo "## A ranks $n rep $rep"; pg g --ranks $n --backends tidewire
      echo "## B ranks $n rep $rep"; pg h --ranks $n --backends tidewire
    done
  done
} > $O/ab.txt 2>&1; echo "rc $? $SECONDS s" >> $O/machine.txt
