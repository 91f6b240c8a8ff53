#!/usr/bin/env bash
# session 19, device call 2 (nvidia-h200: one H200, ranks sharing it): dist/s19b = the EP
# kernels' one read of a rank's active flag (tw_flag), the EP suite over Gloo with hidden 2560
# and 1152 (rows ending in part of a 2 KiB piece), the CUDA path's abandon-on-failure close:
# test_ep; the CUDA-collective tests that close paths (graph replay, stale graph, re-formed path).
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; nvidia-smi -L; } > $O/machine.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-s19b --upgrade dist/s19b/*.whl
export PYTHONPATH=/tmp/site-s19b
timeout 200 python3 -m pytest -v -p no:cacheprovider python/tests/test_ep.py > $O/tests-ep.txt 2>&1
echo "test_ep rc $? $SECONDS s" >> $O/machine.txt
timeout 200 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py \
  -k "replay_in_a_graph or re_formed or new_nvlink_path or gate_cannot" > $O/tests-coll.txt 2>&1
echo "test_distributed rc $? $SECONDS s" >> $O/machine.txt
