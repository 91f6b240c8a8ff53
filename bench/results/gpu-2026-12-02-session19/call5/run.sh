#!/usr/bin/env bash
# session 19, device call 5 (nvidia-h200: one H200): call 4's EP suite at R = 8 and CUDA
# collectives' suite at R = 4 again, without MPS (the ranks' contexts take the GPU by time
# slices, as in sessions 10-11): whether call 4's runs past the deadline came from MPS
# (every rank's 128-block kernels spinning side by side on 132 SMs) or from the code.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; nvidia-smi -L; } > $O/machine.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-s19b --upgrade dist/s19b/*.whl
export PYTHONPATH=/tmp/site-s19b
# group R BODY ARG DEADLINE SCRIPT EXPECT_DEAD (as bench/gpu-multi.sh's, R first)
group() {
  (cd python/tests && R=$1 python3 - "${@:2}" <<'PY'
import json, os, sys, time, test_distributed as t
body, arg, deadline, script, dead = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
size = int(os.environ["R"])
t0 = time.monotonic()
try:
    res = t.run_group(body, size, arg, deadline=deadline, expect_dead=dead, script=t.RANK.replace("pg_rank", script))
    for r, out in enumerate(res):
        print(body, arg, "rank", r, json.dumps(out)[:3000], flush=True)
    print(body, arg, f"{time.monotonic() - t0:.0f} s", flush=True)
except BaseException as e:
    print(body, arg, "FAILED", f"{time.monotonic() - t0:.0f} s", str(e)[:12000], flush=True)
PY
  )
  echo "R=$1 $2 $3: rc $? $SECONDS s" >> $O/machine.txt
}
group 8 suite "backend=gloo,experts=256,hidden=7168/2560,graph=10" 90 ep_rank -1 > $O/ep-r8-256.txt 2>&1
group 4 cuda "" 80 pg_rank -1 > $O/coll-r4.txt 2>&1
echo "done $SECONDS s" >> $O/machine.txt
