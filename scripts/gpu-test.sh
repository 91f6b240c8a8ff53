#!/usr/bin/env bash
# GPU host checks: what the engine discovers and how it treats GPU memory. Run on a machine
# with NVIDIA GPUs, a driver, python3 with torch and pytest, and a tidewire wheel:
#   scripts/gpu-test.sh [wheel-or-dir] [out-dir]
# Writes `tidewire info` and the test log to out-dir (default bench/results/gpu-<date>).
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
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" > "$out/torch.txt" 2>&1 || true
timeout 600 python3 -m pytest -v -p no:cacheprovider python/tests/test_gpu.py python/tests/test_native.py 2>&1 | tee "$out/gpu-tests.txt"
