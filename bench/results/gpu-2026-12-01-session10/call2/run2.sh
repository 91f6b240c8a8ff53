#!/usr/bin/env bash
# session 10, device call 2 (nvidia-h200, one GPU shared by both ranks): the host cost of the EP
# buffer's eager calls and its cProfile (bench/ep_call_profile.py), plain and hook mode.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nproc; } > $O/machine.txt 2>&1
timeout 150 python3 bench/ep_call_profile.py --iters 300 > $O/ep-host.txt 2>&1; echo "plain rc $? $SECONDS s" >> $O/machine.txt
timeout 150 python3 bench/ep_call_profile.py --iters 300 --hook > $O/ep-host-hook.txt 2>&1; echo "hook rc $? $SECONDS s" >> $O/machine.txt
