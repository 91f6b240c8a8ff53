#!/usr/bin/env bash
# session 8, device call 9 (the pair lent again, 449 s left): the checks the session's last
# changes need on two GPUs — the Rust GPU tests (batch counting after the lock), the CUDA
# collectives (raw stream, the Work's stream), the EP suite with a rank dying (the send kernel
# numbering calls, the stream check, the counter reset by update_ep_member).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
TIDEWIRE_NVLINK_LEASE=page timeout 110 dist/gpu-tests --include-ignored --skip zz_ --test-threads=1 > $O/rust-gpu.txt 2>&1; echo "rust rc $? $SECONDS s" >> $O/machine.txt
timeout 130 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_distributed.py -k "cuda or default_stream" > $O/py-coll.txt 2>&1; echo "coll rc $? $SECONDS s" >> $O/machine.txt
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_ep.py -k "nccl-p2p" > $O/py-ep.txt 2>&1; echo "ep rc $? $SECONDS s" >> $O/machine.txt
