#!/usr/bin/env bash
# session 7, device call 1: the whole GPU suite (EP metrics and CUDA collective metrics checks
# new), on the commit carried in dist/.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
{ date -u; nvidia-smi -L; } > $O/machine.txt 2>&1
timeout 570 scripts/gpu-test.sh dist $O/suite > $O/suite.txt 2>&1; echo "rc $?" >> $O/suite.txt
echo "done $SECONDS s" >> $O/machine.txt
grep -E "passed|failed|PASSED|FAILED|test result" $O/suite.txt | tail -30
