#!/usr/bin/env bash
# Prepared plans and the paged API against plain submission, on a host with two NVLink GPUs,
# with the scattered-block reference (bench/ref/scattered_blocks.cu) compiled and run in the
# same command. Expects dist/tidewire (see README, "GPU hosts").
#   bench/gpu-plans.sh [out-dir]      (DUR=2s, ROUNDS=2 to override)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:-bench/results/gpu-plans-$(date -u +%Y-%m-%d)}
mkdir -p "$out"
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
bin=$(mktemp -d)
if "$nvcc" -O3 -std=c++17 ${NVCC_ARCH:--arch=native} -o "$bin/scattered_blocks" \
  bench/ref/scattered_blocks.cu > "$out/reference.txt" 2>&1; then
  timeout 120 "$bin/scattered_blocks" 4096 16384 >> "$out/reference.txt" 2>&1
fi
rm -rf "$bin"
for round in $(seq "${ROUNDS:-2}"); do
  for block in 4KiB 16KiB; do
    for api in submit prepared paged; do
      echo "## round $round --block-size $block --api $api" | tee -a "$out/bench.txt"
      timeout 120 dist/tidewire bench --pair --gpu 0 --target-gpu 1 --op write --scatter \
        --block-size "$block" --batch-size 16384 --duration "${DUR:-2s}" --api "$api" 2>&1 \
        | tee -a "$out/bench.txt"
    done
  done
done
