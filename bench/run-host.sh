#!/usr/bin/env bash
# The host-memory benchmarks of the foundation issue, each with its baseline measured in the
# same run. Writes JSON lines (one per result, tagged with the scenario) to
# bench/results/<date>-<host>-host.jsonl and prints a table.
#   bench/run-host.sh [duration]      (default 3s per point)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dur=${1:-3s}
cargo build --release -p tidewire-cli >/dev/null
tw=target/release/tidewire
out=${TIDEWIRE_BENCH_OUT:-bench/results/$(date -u +%Y-%m-%d)-$(hostname -s)-host.jsonl}
: > "$out"
run() {
  local scenario=$1; shift
  echo "== $scenario: tidewire bench --pair $*" >&2
  "$tw" bench --pair --json --duration "$dur" "$@" | while read -r line; do
    python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["scenario"]=sys.argv[2]; d["cmd"]=sys.argv[3]; print(json.dumps(d))' \
      "$line" "$scenario" "tidewire bench --pair --duration $dur $*"
  done | tee -a "$out"
}
run tcp-1MiB-4thr      --transport tcp --op write --block-size 1MiB --batch-size 32 --threads 4 --baseline raw-tcp
run shm-1MiB           --transport shm --op write --block-size 1MiB --batch-size 32 --baseline memcpy
run tcp-4KiB-sync      --transport tcp --op write --block-size 4KiB --batch-size 1 --baseline raw-tcp
run tcp-4K-64K-b128    --transport tcp --op write --block-size 4KiB,64KiB --batch-size 128 --baseline raw-tcp
run shm-4K-64K-b128    --transport shm --op write --block-size 4KiB,64KiB --batch-size 128 --baseline memcpy
run tcp-4KiB-b100      --transport tcp --op write --block-size 4KiB --batch-size 100
run tcp-4KiB-b10000    --transport tcp --op write --block-size 4KiB --batch-size 10000
run shm-4KiB-b100      --transport shm --op write --block-size 4KiB --batch-size 100
run shm-4KiB-b10000    --transport shm --op write --block-size 4KiB --batch-size 10000
# Same 400 KiB footprint for both batch sizes: per-request cost without cache/TLB misses.
run shm-4KiB-b100-fp   --transport shm --op write --block-size 4KiB --batch-size 100 --footprint 400KiB --baseline memcpy
run shm-4KiB-b10000-fp --transport shm --op write --block-size 4KiB --batch-size 10000 --footprint 400KiB --baseline memcpy
run tcp-1MiB-read-4thr --transport tcp --op read --block-size 1MiB --batch-size 32 --threads 4 --baseline raw-tcp
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'scenario':<20} {'block':>7} {'batch':>6} {'thr':>3} {'GB/s':>7} {'req/s':>10} {'p50us':>8} {'p99us':>8} {'base':>8} {'bGB/s':>7} {'bp50us':>8} {'ratio':>6}")
for r in rows:
    print(f"{r['scenario']:<20} {r['block_size']:>7} {r['batch_size']:>6} {r['threads']:>3} {r['gbps']:>7.3f} {r['req_per_s']:>10.0f} {r['p50_us']:>8.1f} {r['p99_us']:>8.1f} "
          f"{r.get('baseline','-'):>8} {r.get('baseline_gbps',0):>7.3f} {r.get('baseline_p50_us',0):>8.1f} {r.get('ratio',0):>6.2f}")
PY
