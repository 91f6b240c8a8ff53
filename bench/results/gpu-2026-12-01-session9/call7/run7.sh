#!/usr/bin/env bash
# session 9, device call 7 (nvidia-h200, one GPU, TIDEWIRE_TEST_SHARED_GPU=1; the pair not lent):
# after the review fixes — p2p launch i holds the i-th message of each direction (receives queued
# first now tested), stream switches ordered, failed launches fail their works, p2p never forms
# the path; the EP buffer's keep mask one tensor for life, exchanges retried on a view change,
# counters exchanged. The p2p, elastic and survivors tests, then the EP suite over gloo.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TIDEWIRE_TEST_SHARED_GPU=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
timeout 250 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_distributed.py -k "send_and_recv or cuda_an_ep_dispatch or new_nvlink_path" > $O/py-gpu.txt 2>&1; echo "gpu rc $? $SECONDS s" >> $O/machine.txt
cd python/tests
timeout 200 python3 - > $O/py-ep-shared.txt 2>&1 <<'PY'
import json, test_distributed as t
arg = "backend=gloo,experts=256,hidden=7168,graph=10"
try:
    res = t.run_group("suite", 2, arg, deadline=180, script=t.RANK.replace("pg_rank", "ep_rank"))
    for r, out in enumerate(res):
        print(arg, r, json.dumps(out)[:1500])
except BaseException as e:
    print(arg, "FAILED", str(e)[:3000])
PY
echo "ep rc $? $SECONDS s" >> $O/machine.txt
