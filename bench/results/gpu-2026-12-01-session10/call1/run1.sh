#!/usr/bin/env bash
# session 10, device call 1 (nvidia-h200, one GPU, TIDEWIRE_TEST_SHARED_GPU=1; the pair not lent):
# the EP dispatch sending a token once per destination rank (rows per source, expert lists of
# tokens): the EP tests that run over gloo, the EP suite over gloo with every H, a rank dying and
# a graph replayed 100 times; the CUDA collective tests (a new one: calls on two streams); the
# EP bench as a smoke run (one shared GPU: its times mean nothing).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TIDEWIRE_TEST_SHARED_GPU=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nproc; } > $O/machine.txt 2>&1
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_ep.py -k "not nccl" > $O/py-ep.txt 2>&1; echo "ep tests rc $? $SECONDS s" >> $O/machine.txt
(cd python/tests && timeout 200 python3 - > $O/py-ep-suite.txt 2>&1 <<'PY'
import json, test_distributed as t
for arg in ["backend=gloo,experts=256,hidden=7168/2048/4096/5120,leave=die,graph=100", "backend=gloo,experts=288,hidden=7168,graph=10"]:
    try:
        res = t.run_group("suite", 2, arg, deadline=180, expect_dead=1 if "leave" in arg else -1, script=t.RANK.replace("pg_rank", "ep_rank"))
        for r, out in enumerate(res):
            print(arg, r, json.dumps(out)[:1500])
    except BaseException as e:
        print(arg, "FAILED", str(e)[:3000])
PY
); echo "ep suite rc $? $SECONDS s" >> $O/machine.txt
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_distributed.py -k "cuda and not elastic and not survivors and not send_and_recv" > $O/py-coll.txt 2>&1; echo "coll rc $? $SECONDS s" >> $O/machine.txt
timeout 90 python3 bench/ep_bench.py --ranks 2 --tokens 128 --iters 100 > $O/ep-bench-smoke.txt 2>&1; echo "bench rc $? $SECONDS s" >> $O/machine.txt
