#!/usr/bin/env bash
# session 6, device call 1: whole GPU suite on the 4 ms host-poll kernels, then small calls
# (graph and eager) vs NCCL, EP at T=128, CPU collectives vs Gloo at 2 and 4 ranks, elastic tests.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
{ date -u; nvidia-smi -L; nproc; } > $O/machine.txt 2>&1
SECONDS=0
scripts/gpu-test.sh dist /tmp/t > /tmp/gpu-test.log 2>&1; echo "gpu-test rc $? in ${SECONDS}s" >> $O/machine.txt
for f in /tmp/t/*; do echo "=== $f"; cat $f; done > $O/suite.txt 2>&1
export PYTHONPATH=/tmp/tidewire-site
{ echo "## graph small"; timeout 60 python3 bench/pg_bench.py --backends tidewire,nccl --device cuda --dtype bf16 --graph --max-bytes 256K --iters 20
  echo "## eager small"; timeout 60 python3 bench/pg_bench.py --backends tidewire,nccl --device cuda --dtype bf16 --max-bytes 256K --iters 20
  echo "## large"; timeout 60 python3 bench/pg_bench.py --backends tidewire,nccl --device cuda --dtype bf16 --min-bytes 32M --max-bytes 128M; } > $O/pg-cuda.txt 2>&1
echo "pg-cuda done ${SECONDS}s" >> $O/machine.txt
timeout 60 python3 bench/ep_bench.py --tokens 128 --iters 300 > $O/ep.txt 2>&1
echo "ep done ${SECONDS}s" >> $O/machine.txt
{ for R in 2 4; do echo "## ranks $R"; timeout 100 python3 bench/pg_bench.py --backends tidewire,gloo --ranks $R --min-bytes 1M --max-bytes 64M --iters 10; done; } > $O/pg-cpu.txt 2>&1
echo "pg-cpu done ${SECONDS}s" >> $O/machine.txt
timeout 120 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k "elastic or joining or sglang" > $O/elastic.txt 2>&1
echo "all done ${SECONDS}s" >> $O/machine.txt
