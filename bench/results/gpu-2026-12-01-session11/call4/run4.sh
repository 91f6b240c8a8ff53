#!/usr/bin/env bash
# session 11, device call 4 (nvidia-h200-x2): the Rust GPU tests on two GPUs (both revocation
# channels; the NVLink runs now check a same-host peer by its liveness word, a killed peer
# included), the Python GPU transfer tests, and the 4-rank CPU collectives against Gloo on this
# 32-CPU host (all_to_all 2 MiB was 2.48x Gloo here in session 8; target >= 3x at >= 1 MiB).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nproc; } > $O/machine.txt 2>&1
for lease in page rpc; do
  echo "== rust gpu tests, revocation by $lease"
  TIDEWIRE_NVLINK_LEASE=$lease timeout 140 dist/gpu-tests --include-ignored --skip zz_ --test-threads=1 2>&1 | grep -E "^test |test result|panicked|FAILED"
done > $O/rust-gpu.txt 2>&1; echo "rust rc $? $SECONDS s" >> $O/machine.txt
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_gpu.py > $O/py-gpu.txt 2>&1; echo "py-gpu rc $? $SECONDS s" >> $O/machine.txt
for rep in 1 2; do
  timeout 100 python3 bench/pg_bench.py --backends tidewire,gloo --ranks 4 --device cpu --ops all_to_all,all_reduce --min-bytes 512K --max-bytes 8M --step 2 2>&1 | grep -v Warn
done > $O/pg-cpu4.txt 2>&1; echo "pg-cpu rc $? $SECONDS s" >> $O/machine.txt
