#!/usr/bin/env bash
# session 19, device call 4 (nvidia-h200: one H200; no 4/8-GPU machine lent): the multi-rank
# paths at R = 4 and 8 with every rank on the one GPU under MPS (so the ranks' kernels run side
# by side instead of by time slices) — a check of correctness since session 11's last R = 8 run
# (the EP table, the combine's hoisted loads, the gate, the release threads came since), not
# of speed. dist/s19b = HEAD's native code. The EP suite over Gloo (NCCL refuses two ranks on
# one GPU) at R = 8, E = 256 (H 7168 / 2560) and E = 288 (H 2048); the CUDA collectives' suite
# at R = 4 and 8; the elastic kill of the last rank at R = 8; the CUDA kill at R = 4.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; nvidia-smi -L; } > $O/machine.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-s19b --upgrade dist/s19b/*.whl
export PYTHONPATH=/tmp/site-s19b
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d; echo "mps rc $?" >> $O/machine.txt
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
group 8 suite "backend=gloo,experts=256,hidden=7168/2560,graph=10" 150 ep_rank -1 > $O/ep-r8-256.txt 2>&1
group 8 suite "backend=gloo,experts=288,hidden=2048,graph=10" 90 ep_rank -1 > $O/ep-r8-288.txt 2>&1
group 4 cuda "" 90 pg_rank -1 > $O/coll-r4.txt 2>&1
group 8 cuda "" 120 pg_rank -1 > $O/coll-r8.txt 2>&1
group 8 elastic "kill-7" 60 pg_rank 7 > $O/elastic-r8.txt 2>&1
group 4 cuda_failure kill 45 pg_rank 3 > $O/cuda-kill-r4.txt 2>&1
echo quit | nvidia-cuda-mps-control
echo "done $SECONDS s" >> $O/machine.txt
