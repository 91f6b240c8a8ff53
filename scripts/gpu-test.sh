#!/usr/bin/env bash
# GPU host checks: `tidewire info`, the Rust GPU tests (dist/gpu-tests, both revocation
# channels) and the Python GPU tests with torch. Run on a machine with NVIDIA GPUs (two with
# NVLink for the transfer tests), a driver, python3 with torch, and what was built on a dev
# machine in dist/ (the wheel, dist/tidewire, dist/gpu-tests; pytest wheels in dist/wheels):
#   scripts/gpu-test.sh [wheel-or-dir] [out-dir]
# Writes the logs to out-dir (default bench/results/gpu-<date>).
# On a host with one GPU, TIDEWIRE_TEST_SHARED_GPU=1 puts both ranks of the Python collective,
# elastic and point-to-point tests on it (correctness only; NCCL-backed and Rust two-GPU tests
# still need two GPUs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Never use NVLink multicast on shared GPU hosts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
wheel=${1:-dist}
out=${2:-bench/results/gpu-$(date -u +%Y-%m-%d)}
mkdir -p "$out" /tmp/tidewire-site
if [ -d "$wheel" ]; then wheel=$(ls "$wheel"/tidewire-*.whl | head -1); fi
python3 -m pip install -q --no-index --no-deps --target /tmp/tidewire-site --upgrade "$wheel"
# GPU hosts without internet: pytest from wheels carried in dist/wheels when it is missing.
if ! python3 -c "import pytest" 2>/dev/null && [ -d dist/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/tidewire-site dist/wheels/*.whl
fi
export PYTHONPATH=/tmp/tidewire-site${PYTHONPATH:+:$PYTHONPATH}
if [ -x dist/tidewire ]; then dist/tidewire info > "$out/info.txt" 2>&1 || true; fi
# The Rust GPU tests (two processes, one GPU each), with the revocation pages of same-host
# peers and again with the RPC channel peers on other hosts (mnnvl) use. The tests that need
# two GPUs are #[ignore]d (a plain `cargo test` elsewhere lists them as ignored, not passed):
# --include-ignored runs them with the others, --skip zz_ leaves out the child-process helper
# (the children start it themselves). Without two GPUs they fail, saying what is missing.
status=0
if [ -x dist/gpu-tests ]; then
  for lease in page rpc; do
    echo "== rust gpu tests, revocation by $lease" | tee -a "$out/rust-gpu-tests.txt"
    TIDEWIRE_NVLINK_LEASE=$lease timeout 300 dist/gpu-tests --include-ignored --skip zz_ \
      --test-threads=1 --nocapture 2>&1 | tee -a "$out/rust-gpu-tests.txt" || status=1
  done
else
  echo "dist/gpu-tests is missing: the Rust GPU tests did not run" | tee -a "$out/rust-gpu-tests.txt"
  status=1
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" > "$out/torch.txt" 2>&1 || true
timeout 900 python3 -m pytest -v -p no:cacheprovider python/tests/test_gpu.py python/tests/test_native.py python/tests/test_ep.py 2>&1 | tee "$out/gpu-tests.txt" || status=1
# The collectives' CUDA tests (NVLink path, staged path, a killed and a stopped rank, the
# survivors' new path, point-to-point, the elastic scenario with the EP buffer).
timeout 420 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k cuda 2>&1 | tee "$out/gpu-tests-collectives.txt" || status=1
# The GPU transports with a cluster secret in force (every engine these tests start reads it):
# the shm socket's and the RPC port's handshakes in front of CUDA IPC / VMM imports.
TIDEWIRE_CLUSTER_SECRET=gpu-test-secret timeout 300 python3 -m pytest -v -p no:cacheprovider python/tests/test_gpu.py \
  -k "nvlink_both_ways or kv_pages or killed_peers" 2>&1 | tee "$out/gpu-tests-secret.txt" || status=1
exit $status
