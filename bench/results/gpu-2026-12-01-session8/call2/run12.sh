#!/usr/bin/env bash
# session 8, device call 2: eager small CUDA all_reduce after the raw-stream change: both
# ranks' host time, the GPU kernels' durations and gaps (torch profiler), default stream and a
# side stream; NCCL the same.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nvidia-smi topo -m; } > $O/machine.txt 2>&1
{ for b in tidewire nccl; do for side in "" --side-stream; do echo "## $b $side"
  timeout 90 python3 bench/pg_call_profile.py --device cuda --backend $b --sizes 8,8192 --trace 200 $side 2>&1 | grep -v Warn | head -60; done; done; } > $O/eager.txt 2>&1
echo "all done $SECONDS s" >> $O/machine.txt
