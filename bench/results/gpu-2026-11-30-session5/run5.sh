#!/usr/bin/env bash
# session 5, device call 5: host memory polled once per 4 ms in kernel waits: small calls at 128
# blocks, the failure paths that now poll less, EP's whole-call numbers.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
{ timeout 30 python3 bench/pg_bench.py --backends tidewire --device cuda --dtype bf16 --ops all_reduce,all_gather --max-bytes 128K --step 16 --graph --iters 10
  timeout 60 python3 bench/pg_bench.py --backends tidewire,nccl --device cuda --dtype bf16 --ops all_reduce --min-bytes 32M --max-bytes 128M; } > $O/pg.txt 2>&1
timeout 60 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k killed_or_stopped > $O/tests.txt 2>&1
timeout 150 python3 -m pytest -v -p no:cacheprovider python/tests/test_ep.py -k "nccl-p2p or gloo-p2p-288" >> $O/tests.txt 2>&1
timeout 40 python3 bench/ep_bench.py --tokens 128 --iters 300 > $O/ep.txt 2>&1
