#!/usr/bin/env bash
# session 10, device call 3 (nvidia-h200, one GPU shared by every rank; no 4- or 8-GPU machine
# lent): the EP suite over gloo at 4 and 8 ranks — the kernels' paths for R > 2 (several
# sources per expert, rows packed from ours on with wrap, a token's row crossing to several
# ranks once each), E = 256 and 288; graphs, two dispatchers, update_ep_member.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TIDEWIRE_TEST_SHARED_GPU=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nproc; } > $O/machine.txt 2>&1
(cd python/tests && timeout 520 python3 - > $O/py-ep-suite-r48.txt 2>&1 <<'PY'
import json, time, test_distributed as t
for n, arg in [(4, "backend=gloo,experts=256,hidden=7168/2048,graph=10"), (4, "backend=gloo,experts=288,hidden=4096,graph=5"),
               (8, "backend=gloo,experts=256,hidden=7168,graph=5"), (8, "backend=gloo,experts=288,hidden=2048,graph=5")]:
    t0 = time.monotonic()
    try:
        res = t.run_group("suite", n, arg, deadline=240, script=t.RANK.replace("pg_rank", "ep_rank"))
        print(n, arg, f"{time.monotonic() - t0:.0f} s", "bad:", [r["bad"] for r in res], "paths0:", res[0]["paths"], flush=True)
    except BaseException as e:
        print(n, arg, "FAILED", f"{time.monotonic() - t0:.0f} s", str(e)[:3000], flush=True)
PY
); echo "suite rc $? $SECONDS s" >> $O/machine.txt
