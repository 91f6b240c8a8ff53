#!/usr/bin/env bash
# session 11, device call 3 (nvidia-h200-x2, the pair: lent again): bench/gpu-pair.sh as committed
# (EP bench T = 128/512/1024 with the all_to_all_single exchange; EP tests over NCCL; the CUDA
# collective tests incl. the elastic scenario and the survivors' path; p2p and eager small
# collectives against NCCL; metrics off/on over nvlink).
cd "$(dirname "$0")/../../../.."
bench/gpu-pair.sh "${OUT:-/tmp/out}"
