#!/usr/bin/env bash
# session 6, device call 2: the elastic tests call 1 did not reach, this host's sysfs recorded
# for the NIC-affinity tests, `tidewire info` with libfabric carried in (Debian's 1.17).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
{ date -u; nvidia-smi -L; nproc; } > $O/machine.txt 2>&1
{
for g in $(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader); do
  b=$(echo ${g:4} | tr A-Z a-z); p=$(realpath /sys/bus/pci/devices/$b); echo "gpu $b ${p#/sys/devices/} $(cat $p/numa_node)"; done
for c in net infiniband; do for d in /sys/class/$c/*; do
  [ -e $d/device ] || { echo "# $c $(basename $d): virtual"; continue; }
  p=$(realpath $d/device); echo "$([ $c = net ] && echo net || echo ib) $(basename $d) ${p#/sys/devices/} $(cat $p/numa_node 2>/dev/null)"; done; done
lscpu | grep -i numa
} > $O/sysfs.txt 2>&1
{ echo "## info, no provider asked for"; LD_LIBRARY_PATH=$PWD/dist/lib dist/tidewire info
  echo "## info, TIDEWIRE_FABRIC_PROVIDER=tcp"; TIDEWIRE_FABRIC_PROVIDER=tcp LD_LIBRARY_PATH=$PWD/dist/lib dist/tidewire info; } > $O/info.txt 2>&1
timeout 420 python3 -m pytest -v -p no:cacheprovider python/tests/test_distributed.py -k "elastic or joining or sglang" \
  --deselect "python/tests/test_distributed.py::test_sglangs_elastic_flow_world_and_tp_groups_lose_and_regain_a_rank" > $O/elastic.txt 2>&1
echo "done $SECONDS s" >> $O/machine.txt
