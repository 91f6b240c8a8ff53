#!/usr/bin/env bash
# session 20, device call 6 (nvidia-h200: one H200, ranks sharing it): dist/el1 = the elastic
# membership's review fixes (values announced for a view refused once it moved on, withdrawn
# when their use fails: the CUDA path's and the EP buffer's exchanges through the membership
# included; a replaced process fenced; refusals) on the GPU paths that exchange through the
# membership: the SGLang elastic flow on CUDA (an EP dispatch a rank dies in, its
# replacement), the CUDA collectives over the survivors on a new NVLink path, the stale graph;
# then test_ep.
cd "$(dirname "$0")/../../../.."
O=${OUT:-/tmp/out}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TIDEWIRE_TEST_SHARED_GPU=1
{ date -u; nproc; } > $O/machine.txt 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site-el1 --upgrade dist/el1/*.whl
export PYTHONPATH=/tmp/site-el1
timeout 300 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py \
  -k "sglangs_elastic_flow_on_cuda or survivors_on_a_new_nvlink or re_formed or killed_or_stopped_rank_ends_the_cuda" > $O/tests-coll.txt 2>&1
echo "test_distributed rc $? $SECONDS s" >> $O/machine.txt
timeout 200 python3 -m pytest -v -p no:cacheprovider python/tests/test_ep.py > $O/tests-ep.txt 2>&1
echo "test_ep rc $? $SECONDS s" >> $O/machine.txt
