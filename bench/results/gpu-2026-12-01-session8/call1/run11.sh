#!/usr/bin/env bash
# session 8, device call 1: where the eager small CUDA calls' time goes (tidewire and NCCL,
# host enqueue vs whole call, sizes in order and 8 B again at the end, cProfile), and the EP
# dispatch send at T=128 with 2, 4, 8 and 14 warps a token.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; which nsys ncu; nproc; } > $O/machine.txt 2>&1
{ for b in tidewire nccl; do timeout 90 python3 bench/pg_call_profile.py --device cuda --backend $b --sizes 8,64,128,512,8192,8; done; } > $O/eager.txt 2>&1
echo "eager done $SECONDS s" >> $O/machine.txt
{ for tasks in 256 512 1024 default; do echo "## TIDEWIRE_EP_SEND_TASKS=$tasks"
  if [ $tasks = default ]; then unset TIDEWIRE_EP_SEND_TASKS; else export TIDEWIRE_EP_SEND_TASKS=$tasks; fi
  timeout 120 python3 bench/ep_bench.py --tokens 128 2>&1 | grep -v Warn; done; } > $O/ep.txt 2>&1
echo "all done $SECONDS s" >> $O/machine.txt
