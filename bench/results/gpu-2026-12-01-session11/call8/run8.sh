#!/usr/bin/env bash
# session 11, device call 8 (nvidia-h200-x2): point-to-point with lanes by group size (64 for two
# ranks, was 16): the CUDA send/recv test on two GPUs, then bench/p2p_cuda_bench.py (tidewire
# only: NCCL's rows of call 3 are this machine's reference; the budget left no room for both).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
date -u > $O/machine.txt
timeout 80 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_distributed.py -k "send_and_recv" > $O/py-p2p.txt 2>&1; echo "p2p tests rc $? $SECONDS s" >> $O/machine.txt
timeout 45 python3 bench/p2p_cuda_bench.py --backends tidewire --max-bytes 256M --iters 10 2>&1 | grep -v Warn > $O/p2p.txt; echo "p2p bench rc $? $SECONDS s" >> $O/machine.txt
