#!/usr/bin/env bash
# session 6, device call 4: the whole GPU suite on the final commits (metrics in the batch path).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
SECONDS=0
scripts/gpu-test.sh dist /tmp/t > /tmp/gpu-test.log 2>&1; echo "gpu-test rc $? in ${SECONDS}s" >> $O/machine.txt
for f in /tmp/t/*; do echo "=== $f"; cat $f; done > $O/suite.txt 2>&1
