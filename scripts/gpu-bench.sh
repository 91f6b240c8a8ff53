#!/usr/bin/env bash
# GPU transports on a host with two NVLink-connected GPUs: the Rust GPU tests (two processes,
# one GPU each), then `tidewire bench` for the issue's shapes next to the reference programs
# run in the same command. Expects prebuilt binaries in dist/ (see README, "GPU hosts"):
#   dist/tidewire, dist/gpu-tests (the `gpu` test binary of crates/engine)
#   scripts/gpu-bench.sh [out-dir]
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
echo "== gpu tests" | tee "$out/gpu-tests.txt"
timeout 300 dist/gpu-tests --test-threads=1 --nocapture 2>&1 | tee -a "$out/gpu-tests.txt"
echo "== references" | tee "$out/reference.txt"
nvcc -O2 -o /tmp/peer_copy bench/ref/peer_copy.cu && /tmp/peer_copy 256 | tee -a "$out/reference.txt"
ref=${TIDEWIRE_REFERENCE:-../shared/reference}
if [ -f "$ref/small_blocks.cu" ]; then
  nvcc -O2 -o /tmp/small_blocks "$ref/small_blocks.cu" && /tmp/small_blocks | tee -a "$out/reference.txt"
elif [ -f dist/small_blocks.cu ]; then
  nvcc -O2 -o /tmp/small_blocks dist/small_blocks.cu && /tmp/small_blocks | tee -a "$out/reference.txt"
fi
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
