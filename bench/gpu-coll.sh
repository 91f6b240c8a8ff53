#!/usr/bin/env bash
# The collective backend's speed rows on a 2-GPU host, NCCL measured in the same command
# (fits one 10-minute call): eager calls of 8 B - 256 KiB (every power of two from 128 B, so
# 256 KiB is timed), all_reduce of the same sizes replayed from a CUDA graph, the four
# collectives from 32 MiB to 1 GiB, and point-to-point. Expects the wheel in dist/ (see
# scripts/gpu-test.sh).   bench/gpu-coll.sh [out-dir]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
O=${1:-${OUT:-bench/results/gpu-coll-$(date -u +%Y-%m-%d)}}
. bench/device-env.sh
# pg SECONDS ARGS...: pg_bench against NCCL within SECONDS (`timeout` runs programs, not functions).
pg() { timeout "$1" python3 bench/pg_bench.py --backends tidewire,nccl --device cuda --dtype bf16 "${@:2}" 2>&1 | grep -v arn; }
pg 150 --min-bytes 128 --max-bytes 256K --step 2 --iters 30 > "$O/pg-eager.txt"; step pg-eager $?
pg 90 --ops all_reduce --min-bytes 128 --max-bytes 256K --step 2 --iters 30 --graph > "$O/pg-graph.txt"; step pg-graph $?
pg 200 --min-bytes 32M --max-bytes 1G --step 2 > "$O/pg-large.txt"; step pg-large $?
timeout 90 python3 bench/p2p_cuda_bench.py --max-bytes 256M --iters 10 > "$O/p2p.txt" 2>&1; step p2p $?
