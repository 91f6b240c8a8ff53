#!/usr/bin/env bash
# The EP buffer and the collectives at R ranks, one GPU each, on a host with 4 or 8 GPUs
# (R defaults to the GPU count): in two parts that each fit one 10-minute call.
#   PART=ep   the EP bench at T = 128, H = 7168, k = 8 with E = 256 and 288, the
#             all_to_all_single exchange over NCCL beside it, and the EP suite over NCCL
#             (every mode and dtype, a graph replayed, two dispatchers) at E = 256 and 288;
#   PART=coll the CUDA collectives' suite, the bench against NCCL (eager and in a graph), NCCL's
#             own rows, and the last rank killed during collectives (the elastic membership; a CUDA group).
# Expects the wheel in dist/ (see scripts/gpu-test.sh). One part per device call: each writes
# seven files, and a call brings back at most eight.   PART=ep|coll bench/gpu-multi.sh [out-dir]
# MAXB caps the bench's sizes (default 1G). With one GPU and TIDEWIRE_TEST_SHARED_GPU=1 it
# runs as a check of itself (every rank on the GPU, the EP suite over Gloo: NCCL refuses two
# ranks on one GPU); its times then mean nothing.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
R=${R:-$(nvidia-smi -L | wc -l)}
PART=${PART:-ep}
O=${1:-${OUT:-bench/results/gpu-multi-$(date -u +%Y-%m-%d)}}
. bench/device-env.sh
echo "R=$R PART=$PART" >> "$O/machine.txt"
backend=nccl
[ "${TIDEWIRE_TEST_SHARED_GPU:-0}" = 1 ] && backend=gloo

# A group of R ranks from python/tests (the suites' own checks), printed per rank; the group's
# DEADLINE kills every rank still running.
group() { python3 bench/rank_group.py "$@"; }  # group BODY ARG DEADLINE SCRIPT EXPECT_DEAD
export R
if [ "$PART" = ep ]; then
  for E in 256 288; do
    timeout 150 python3 bench/ep_bench.py --ranks "$R" --tokens 128 --experts $E 2>&1 | grep -v arn > "$O/ep-$E.txt"; step "ep E=$E" $?
    timeout 60 python3 bench/ref/collectives_reference.py ep --ranks "$R" --experts $E > "$O/ep-ref-$E.txt" 2>&1; step "ep-ref E=$E" $?
  done
  for E in 256 288; do
    group suite "backend=$backend,experts=$E,hidden=7168/2560,graph=10" 180 ep_rank -1 > "$O/ep-suite-$E.txt" 2>&1; step "ep-suite E=$E" $?
  done
else
  group cuda "" 150 pg_rank -1 > "$O/coll-suite.txt" 2>&1; step coll-suite $?
  timeout 150 python3 bench/pg_bench.py --backends tidewire,nccl --ranks "$R" --device cuda --dtype bf16 --max-bytes "${MAXB:-1G}" > "$O/pg-bench.txt" 2>&1; step pg-bench $?
  timeout 60 python3 bench/pg_bench.py --backends tidewire --ranks "$R" --device cuda --dtype bf16 --max-bytes 256K --graph > "$O/pg-bench-graph.txt" 2>&1; step pg-bench-graph $?
  timeout 90 python3 bench/ref/collectives_reference.py coll --backend nccl --ranks "$R" > "$O/nccl-ref.txt" 2>&1; step nccl-ref $?
  group elastic "kill-$((R - 1))" 90 pg_rank $((R - 1)) > "$O/elastic-kill.txt" 2>&1; step elastic-kill $?
  group cuda_failure kill 50 pg_rank $((R - 1)) > "$O/cuda-kill.txt" 2>&1; step cuda-kill $?
fi
