#!/usr/bin/env bash
# session 11, device call 1 (nvidia-h200, one GPU shared by every rank; the pair not lent):
# the EP suite at R = 8, E = 256, H = 7168 after session 10's checker fixes (one host copy per
# call, each rank an equal share of the CPUs); the EP tests over gloo; the CUDA collective
# tests; the Python GPU transfer tests (NVLink runs now check the peer by its liveness word).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TIDEWIRE_TEST_SHARED_GPU=1
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nproc; } > $O/machine.txt 2>&1
(cd python/tests && timeout 260 python3 - > $O/ep-r8.txt 2>&1 <<'PY'
import time, test_distributed as t
t0 = time.monotonic()
arg = "backend=gloo,experts=256,hidden=7168,graph=5"
try:
    res = t.run_group("suite", 8, arg, deadline=240, script=t.RANK.replace("pg_rank", "ep_rank"))
    print("ep 8 ranks", arg, f"{time.monotonic() - t0:.0f} s", "bad:", [r["bad"] for r in res], flush=True)
except BaseException as e:
    print("ep 8 ranks", arg, "FAILED", f"{time.monotonic() - t0:.0f} s", str(e)[:12000], flush=True)
PY
); echo "ep r8 rc $? $SECONDS s" >> $O/machine.txt
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_ep.py -k "not nccl" > $O/py-ep.txt 2>&1; echo "ep tests rc $? $SECONDS s" >> $O/machine.txt
timeout 170 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_distributed.py -k cuda > $O/py-coll.txt 2>&1; echo "coll rc $? $SECONDS s" >> $O/machine.txt
