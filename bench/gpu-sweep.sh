#!/usr/bin/env bash
# Tuning sweep for the nvlink path on a two-GPU host: the scattered-page shapes under the
# engine's tuning knobs (first launch size, descriptor placement, gather-kernel shape, waiter
# spin). Expects dist/tidewire (see scripts/gpu-bench.sh).   bench/gpu-sweep.sh [out-dir]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${1:-bench/results/gpu-sweep-$(date -u +%Y-%m-%d)}
mkdir -p "$out"
b() {
  local env=$1; shift
  echo "## $env tidewire bench $*" | tee -a "$out/sweep.txt"
  env $env timeout 120 dist/tidewire bench --pair --gpu 0 --target-gpu 1 --duration ${DUR:-2s} "$@" 2>&1 \
    | grep -v '^trans' | tee -a "$out/sweep.txt"
}
# SWEEP="ENV=a ENV=b|ENV=c" (combinations separated by |) replaces the default list.
IFS='|' read -r -a combos <<< "${SWEEP:-X=default|TIDEWIRE_DESCRIPTORS_IN_HOST=0|TIDEWIRE_FIRST_LAUNCH=0|TIDEWIRE_FIRST_LAUNCH=4096|TIDEWIRE_JOB_STREAMS=1|TIDEWIRE_WAIT_SPIN_US=20}"
for env in "${combos[@]}"; do
  b "$env" --op write --block-size 4KiB --batch-size 16384 --scatter
  b "$env" --op write --block-size 16KiB --batch-size 16384 --scatter
done
