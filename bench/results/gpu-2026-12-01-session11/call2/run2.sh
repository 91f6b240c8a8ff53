#!/usr/bin/env bash
# session 11, device call 2 (nvidia-h200, one GPU; no 4/8-GPU machine and no pair lent): a check
# of bench/gpu-multi.sh (the issue-16 run at R ranks) at R = 2 with both ranks on the one GPU —
# both parts, the bench sizes capped. Its times mean nothing; NCCL refuses two ranks on one GPU,
# so the NCCL rows and the NCCL reference fail here by design.
export TIDEWIRE_TEST_SHARED_GPU=1 R=2 MAXB=4M
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
PART=ep bench/gpu-multi.sh "$O"
PART=coll bench/gpu-multi.sh "$O"
