#!/usr/bin/env bash
# session 8, device call 7 (one H200: the pair was not lent): what one GPU can check after the
# review fixes: the CUDA Work's stream, the Rust GPU tests that need one GPU, the Python GPU
# tests that need one (the two-GPU ones skip, saying so).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
timeout 200 dist/gpu-tests --skip zz_ --test-threads=1 > $O/rust-gpu.txt 2>&1; echo "rust rc $?" >> $O/machine.txt
timeout 300 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_gpu.py python/tests/test_native.py python/tests/test_ep.py python/tests/test_distributed.py -k "cuda or default_stream or gpu or ep or nvlink" > $O/py-gpu.txt 2>&1; echo "py rc $?" >> $O/machine.txt
echo "all done $SECONDS s" >> $O/machine.txt
