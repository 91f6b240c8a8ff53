#!/usr/bin/env bash
# session 13, device call 3 (nvidia-h200: one H200, 16 CPUs; CPU only). Calls 1-2: 2 ranks'
# all_reduce takes as long at 4 MiB as at 8 MiB (625-720 vs 634-787 us), and no thread or
# piece setting moves it. Does where the tensors live matter (glibc's dynamic mmap threshold
# puts tensors under 32 MiB on the heap after frees; mmapped ones may get huge pages)?
# MALLOC_MMAP_THRESHOLD_=65536 (every tensor mmapped) against the default, alternated three
# times, Gloo under both. dist/e = ece62ac.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site-e --upgrade dist/e/*.whl
{ date -u; nproc; cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag; } > $O/machine.txt 2>&1
pg() { PYTHONPATH=/tmp/site-e timeout "$1" python3 bench/pg_bench.py --device cpu --ranks 2 --ops all_reduce,all_gather --min-bytes 1M --max-bytes 16M --step 2 --iters 50 "${@:2}" 2>&1 | grep -v Warn; }
{
  echo "## gloo default"; pg 90 --backends gloo
  echo "## gloo mmap"; MALLOC_MMAP_THRESHOLD_=65536 pg 90 --backends gloo
  for rep in 1 2 3; do
    echo "## default rep $rep"; pg 40 --backends tidewire
    echo "## mmap rep $rep"; MALLOC_MMAP_THRESHOLD_=65536 pg 40 --backends tidewire
  done
} > $O/mmap.txt 2>&1; echo "mmap rc $? $SECONDS s" >> $O/machine.txt
