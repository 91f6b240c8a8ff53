#!/usr/bin/env bash
# GPU transports on a host with two NVLink-connected GPUs: the Rust GPU tests (two processes,
# one GPU each), then `tidewire bench` for the issue's shapes next to the reference programs
# of bench/ref/ (compiled here with nvcc: the host needs a CUDA toolkit) run in the same
# command. Expects prebuilt binaries in dist/ (see README, "GPU hosts"):
#   dist/tidewire, dist/gpu-tests (the `gpu` test binary of crates/engine)
#   scripts/gpu-bench.sh [out-dir]      (NVCC=path/to/nvcc, NVCC_ARCH=-arch=sm_90 to override)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:-bench/results/gpu-$(date -u +%Y-%m-%d)}
mkdir -p "$out"
tw=dist/tidewire
{
  date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nvidia-smi topo -m
} > "$out/machine.txt" 2>&1
$tw info > "$out/info.txt" 2>&1
# The two-GPU tests are #[ignore]d in plain runs; --skip zz_ leaves out the child helper.
# SKIP_TESTS=1 leaves them to scripts/gpu-test.sh when both run in one command.
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== gpu tests" | tee "$out/gpu-tests.txt"
  timeout 300 dist/gpu-tests --include-ignored --skip zz_ --test-threads=1 --nocapture 2>&1 \
    | tee -a "$out/gpu-tests.txt"
fi
# The reference programs (bench/ref/README.md), built here with the host's nvcc and run in the
# same command as the benchmarks below, so every ratio is taken in one run.
echo "== references" | tee "$out/reference.txt"
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
bin=$(mktemp -d)
ref() {  # ref NAME [link flags]: compile bench/ref/NAME.cu into $bin/NAME, errors to reference.txt
  local name=$1; shift
  "$nvcc" -O3 -std=c++17 ${NVCC_ARCH:--arch=native} -o "$bin/$name" "bench/ref/$name.cu" "$@" 2>&1 \
    | tee -a "$out/reference.txt"
}
if ref peer_copy; then timeout 300 "$bin/peer_copy" 256 2>&1 | tee -a "$out/reference.txt"; fi
if ref scattered_blocks; then
  timeout 300 "$bin/scattered_blocks" 4096 16384 2>&1 | tee -a "$out/reference.txt"
fi
if ref fabric_probe -lcuda -lnvidia-ml; then timeout 60 "$bin/fabric_probe" > "$out/fabric.txt" 2>&1; fi
rm -rf "$bin"
b() { echo "## tidewire bench $*" | tee -a "$out/bench.txt"; timeout 120 $tw bench --pair --gpu 0 --target-gpu 1 --duration ${DUR:-2s} "$@" 2>&1 | tee -a "$out/bench.txt"; }
for op in write read; do
  b --op $op --block-size 256MiB --batch-size 1
  b --op $op --block-size 4KiB --batch-size 16384 --scatter
  b --op $op --block-size 16KiB --batch-size 16384 --scatter
  b --op $op --block-size 4KiB --batch-size 1
done
b --op write --block-size 4KiB --batch-size 16384 --scatter --threads 4
b --op write --block-size 4KiB --batch-size 16384 --scatter --gpu-mem malloc
b --op write --block-size 1MiB --batch-size 64 --gpu-mem pinned
