#!/usr/bin/env bash
# session 8, device call 10 (one H200): the CUDA Work stream test after its warm-up fix.
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade dist/*.whl
export PYTHONPATH=/tmp/site
timeout 100 python3 -m pytest -q -p no:cacheprovider python/tests/test_distributed.py -k default_stream 2>&1 | tail -5 | tee $O/work-stream.txt
