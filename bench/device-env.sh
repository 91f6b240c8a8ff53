# Sourced by the GPU-host scripts (bench/gpu-*.sh) after they set O (their output folder):
# never NVLink multicast on shared hosts, the wheel from dist/ installed for this run,
# machine.txt started, and `step NAME RC` to record each step's exit code and time.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$O"
python3 -m pip install -q --no-index --no-deps --target /tmp/tidewire-site --upgrade dist/tidewire-*.whl
export PYTHONPATH=/tmp/tidewire-site${PYTHONPATH:+:$PYTHONPATH}
{ date -u; nvidia-smi -L; nproc; } >> "$O/machine.txt" 2>&1
step() { echo "$1 rc $2 ${SECONDS} s" >> "$O/machine.txt"; }
