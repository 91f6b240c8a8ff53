#!/usr/bin/env bash
# session 9, device call 1 (nvidia-h200-x2): the EP buffer following an elastic group (absent
# ranks in the kernels, exchange through the membership, marks reported to the group): the new
# CUDA elastic scenario first, then the whole EP suite (every kernel changed by the absent-rank
# guard) and the other CUDA collective tests.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
timeout 150 python3 -m pytest -q -rs -x -p no:cacheprovider python/tests/test_distributed.py -k "cuda_an_ep_dispatch" > $O/py-elastic.txt 2>&1; echo "elastic rc $? $SECONDS s" >> $O/machine.txt
timeout 260 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_ep.py > $O/py-ep.txt 2>&1; echo "ep rc $? $SECONDS s" >> $O/machine.txt
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_distributed.py -k "(cuda or default_stream) and not cuda_an_ep_dispatch" > $O/py-coll.txt 2>&1; echo "coll rc $? $SECONDS s" >> $O/machine.txt
