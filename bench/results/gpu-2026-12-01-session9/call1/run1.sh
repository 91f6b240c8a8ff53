#!/usr/bin/env bash
# session 9, device call 1 (nvidia-h200, one GPU: the pair was not lent): correctness only, every
# rank on the one GPU (TIDEWIRE_TEST_SHARED_GPU=1): the CUDA elastic scenario (EP buffer following
# the group), the survivors' new NVLink path, and the EP suite over gloo with the kernels (NCCL
# refuses two ranks on one GPU), also with a rank dying.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TIDEWIRE_TEST_SHARED_GPU=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_distributed.py -k "cuda_an_ep_dispatch or survivors" > $O/py-elastic.txt 2>&1; echo "elastic rc $? $SECONDS s" >> $O/machine.txt
cd python/tests
timeout 300 python3 - > $O/py-ep-shared.txt 2>&1 <<'PY'
import json, test_distributed as t
for arg, dead in (("backend=gloo,experts=256,hidden=7168/2048,graph=10", -1), ("backend=gloo,experts=256,hidden=2048,graph=5,leave=die", 1)):
    try:
        res = t.run_group("suite", 2, arg, deadline=140, expect_dead=dead, script=t.RANK.replace("pg_rank", "ep_rank"))
        for r, out in enumerate(res):
            print(arg, r, json.dumps(out)[:1500])
    except BaseException as e:
        print(arg, "FAILED", str(e)[:3000])
PY
echo "ep rc $? $SECONDS s" >> $O/machine.txt
