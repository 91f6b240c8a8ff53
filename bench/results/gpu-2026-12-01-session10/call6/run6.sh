#!/usr/bin/env bash
# session 10, device call 6 (nvidia-h200, one GPU shared by every rank): after the checker reads back once per call; as
# call 4 — the CUDA collectives' suite at 4 ranks, the EP suite at R = 8 with E = 256, H = 7168.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TIDEWIRE_TEST_SHARED_GPU=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nproc; } > $O/machine.txt 2>&1
(cd python/tests && timeout 170 python3 - > $O/r4-r8.txt 2>&1 <<'PY'
import json, time, test_distributed as t
t0 = time.monotonic()
arg = "backend=gloo,experts=256,hidden=7168,graph=5"
try:
    res = t.run_group("suite", 8, arg, deadline=150, script=t.RANK.replace("pg_rank", "ep_rank"))
    print("ep 8 ranks", arg, f"{time.monotonic() - t0:.0f} s", "bad:", [r["bad"] for r in res], flush=True)
except BaseException as e:
    print("ep 8 ranks", arg, "FAILED", f"{time.monotonic() - t0:.0f} s", str(e)[:12000], flush=True)
PY
); echo "rc $? $SECONDS s" >> $O/machine.txt
