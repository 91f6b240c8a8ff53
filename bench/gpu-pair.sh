#!/usr/bin/env bash
# One pass over what the 2-GPU host measures for the EP buffer and the collectives, in order
# of priority (fits one 10-minute call): the EP bench at T = 128, 512, 1024 with the
# all_to_all_single exchange beside it; the EP tests over NCCL and Gloo; the collectives' CUDA
# tests; point-to-point on CUDA tensors against NCCL; the eager small collectives against NCCL;
# metrics off / on over nvlink at 4 KiB x 1. Expects the wheel and dist/tidewire in dist/
# (see scripts/gpu-test.sh).   bench/gpu-pair.sh [out-dir]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
O=${1:-${OUT:-bench/results/gpu-pair-$(date -u +%Y-%m-%d)}}
. bench/device-env.sh
timeout 120 python3 bench/ep_bench.py --tokens 128,512,1024 2>&1 | grep -v arn > "$O/ep.txt"; step ep $?
timeout 45 python3 bench/ref/collectives_reference.py ep > "$O/ep-ref.txt" 2>&1; step ep-ref $?
timeout 130 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_ep.py -k "deepeps_checks and p2p and not disable" > "$O/py-ep.txt" 2>&1; step ep-tests $?
timeout 180 python3 -m pytest -q -rs -p no:cacheprovider python/tests/test_distributed.py -k cuda > "$O/py-coll.txt" 2>&1; step coll-tests $?
timeout 60 python3 bench/p2p_cuda_bench.py --max-bytes 256M --iters 10 > "$O/p2p.txt" 2>&1; step p2p $?
timeout 70 python3 bench/pg_bench.py --backends tidewire,nccl --device cuda --dtype bf16 --max-bytes 256K --iters 20 > "$O/pg-eager.txt" 2>&1; step pg-eager $?
for rep in 1 2 3 4 5 6; do for mode in off on; do flag=""; [ $mode = on ] && flag="--metrics"
  printf "rep %s metrics %s: " $rep $mode
  timeout 20 dist/tidewire bench --pair --gpu 0 --target-gpu 1 --block-size 4KiB --batch-size 1 --duration 2s --baseline none $flag 2>&1 | grep '^nvlink' | tail -1
done; done > "$O/metrics-cost-nvlink.txt" 2>&1; step metrics $?
