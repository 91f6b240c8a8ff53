#!/usr/bin/env bash
# Installs what the tests need and runs them all. CI (.ci/run) and the README run this.
# Needs: a Rust toolchain (rustup) and gcc. The Rust GPU tests are listed as ignored here
# (scripts/gpu-test.sh runs them on a GPU host); the Python GPU tests skip and say why.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TERM_COLOR=never RUST_BACKTRACE=1

step() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust from https://rustup.rs first" >&2
  exit 1
fi
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  step "installing rustfmt and clippy"
  rustup component add rustfmt clippy
fi

# Real servers for the metadata tests: the tests start their own etcd members and redis
# servers on free loopback ports with temporary directories and stop them when they end
# (also when one fails); this trap stops any a killed test run left behind.
cleanup() { pkill -f "tidewire-(etcd|redis)-" 2>/dev/null || true; }
trap cleanup EXIT
need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# libfabric for the fabric transport's probe (its tcp provider runs without RDMA hardware).
ldconfig -p 2>/dev/null | grep 'libfabric\.so\.1 ' >/dev/null || need+=(libfabric1)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]} from Debian's packages"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
export TIDEWIRE_ETCD_BIN=${TIDEWIRE_ETCD_BIN:-$(command -v etcd)}
export TIDEWIRE_REDIS_BIN=${TIDEWIRE_REDIS_BIN:-$(command -v redis-server)}
# The servers are installed: a metadata test that finds one missing fails instead of skipping.
export TIDEWIRE_REQUIRE_SERVERS=1
# libfabric too: its tests fail instead of skipping when it is missing.
export TIDEWIRE_REQUIRE_LIBFABRIC=1

step "format"
cargo fmt --all -- --check

step "clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build tests"
cargo test --workspace --locked --no-run

step "tests (bounded: 20 minutes)"
timeout 1200 cargo test --workspace --locked

step "python: a virtual environment with the test tools"
venv=${TIDEWIRE_VENV:-target/py-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check "maturin>=1.5,<2" "pytest>=7" pytest-timeout numpy mypy
# torch for the torch.distributed backend tests: the PyPI build (CUDA, runs without a GPU),
# pinned to the GPU host's version; pip's cache makes later runs cheap.
"$venv/bin/python" -m pip install -q --disable-pip-version-check "torch==2.11.0"

step "python: pip install . (maturin, abi3)"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps .

step "python: type stubs match the compiled module"
(cd "$venv" && bin/python -m mypy.stubtest tidewire._native)

step "python: tests (bounded: 30 minutes)"
timeout 1800 "$venv/bin/python" -m pytest -q -p no:cacheprovider python/tests

step "all tests passed"
