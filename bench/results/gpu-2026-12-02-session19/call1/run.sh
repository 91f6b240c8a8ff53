#!/usr/bin/env bash
# session 19, device call 1 (nvidia-h200: one H200, ranks sharing it).
# 1. dist/s19a = main aa27c89 (the release / keep-for-process refactor, never run on a GPU):
#    test_ep, test_distributed -k cuda, test_gpu + test_native.
# 2. The CUDA path gate's cost: pg_bench --device cuda --one-gpu --graph all_reduce ≤ 256 KiB,
#    2 ranks on the GPU under MPS (if the host has it), s19a against dist/s19n (the same code
#    with tw_gate_open returning at once), a n a n.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; nvidia-smi -L; command -v nvidia-cuda-mps-control; } > $O/machine.txt 2>&1
for w in s19a s19n; do
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-$w --upgrade dist/$w/*.whl
done
export PYTHONPATH=/tmp/site-s19a
timeout 170 python3 -m pytest -v -p no:cacheprovider python/tests/test_ep.py > $O/tests-ep.txt 2>&1
echo "test_ep rc $? $SECONDS s" >> $O/machine.txt
timeout 220 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k cuda > $O/tests-coll.txt 2>&1
echo "test_distributed -k cuda rc $? $SECONDS s" >> $O/machine.txt
timeout 100 python3 -m pytest -v -p no:cacheprovider python/tests/test_gpu.py python/tests/test_native.py > $O/tests-gpu.txt 2>&1
echo "test_gpu test_native rc $? $SECONDS s" >> $O/machine.txt
if command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d >> $O/machine.txt 2>&1
  echo "mps started rc $?" >> $O/machine.txt
  for w in s19a s19n s19a s19n; do
    echo "== $w" >> $O/gate.txt
    PYTHONPATH=/tmp/site-$w timeout 60 python3 bench/pg_bench.py --backends tidewire --device cuda --one-gpu --graph \
      --ops all_reduce --max-bytes 256K >> $O/gate.txt 2>&1
    echo "rc $? $SECONDS s" >> $O/gate.txt
  done
  echo "== eager s19a" >> $O/gate.txt
  PYTHONPATH=/tmp/site-s19a timeout 60 python3 bench/pg_bench.py --backends tidewire --device cuda --one-gpu \
    --ops all_reduce --max-bytes 256K >> $O/gate.txt 2>&1
  echo "rc $? $SECONDS s" >> $O/gate.txt
  echo quit | nvidia-cuda-mps-control
  cp -r /tmp/mps-log $O/ 2>/dev/null
fi
echo "done $SECONDS s" >> $O/machine.txt
