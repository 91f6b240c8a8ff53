#!/usr/bin/env bash
# session 8, device call 4: the dispatch send numbering the call itself (no tw_ep_begin) and
# holding its destinations in registers: the EP GPU tests, then ep_bench at T=128, 512, 1024.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
timeout 300 python3 -m pytest -q -x -p no:cacheprovider python/tests/test_ep.py 2>&1 | tail -15 > $O/test-ep.txt
echo "tests done $SECONDS s" >> $O/machine.txt
timeout 200 python3 bench/ep_bench.py --tokens 128,512,1024 2>&1 | grep -v arn > $O/ep.txt
echo "all done $SECONDS s" >> $O/machine.txt
