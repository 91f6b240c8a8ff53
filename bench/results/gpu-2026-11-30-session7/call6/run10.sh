#!/usr/bin/env bash
# session 7, device call 6 (after the review): HostFlag now built on HostWords — the Rust GPU
# tests (page lease) and the Python EP suite with a rank leaving (EP metrics checked) and the
# CUDA collectives (metrics counted once per call).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
TIDEWIRE_NVLINK_LEASE=page timeout 90 dist/gpu-tests --include-ignored --skip zz_ --test-threads=1 > $O/rust-gpu-tests.txt 2>&1; echo "rc $?" >> $O/rust-gpu-tests.txt
timeout 200 python3 -m pytest -v -p no:cacheprovider python/tests/test_ep.py python/tests/test_distributed.py -k "nccl-p2p or (over_nvlink and not two_shot)" > $O/py.txt 2>&1; echo "rc $?" >> $O/py.txt
tail -3 $O/rust-gpu-tests.txt; tail -6 $O/py.txt
