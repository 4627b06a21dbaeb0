#!/usr/bin/env bash
# Runs every check and test tollgate has, on a fresh machine too: installs a
# real redis-server from the system's packages when it is missing (the tests
# start their own on free loopback ports), then formatting, lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
  echo "==> installing redis-server and redis-cli (Debian packages)"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server redis-tools >/dev/null
fi
echo "==> $(redis-server --version)"

# The client examples (examples/node, examples/python), which tests/examples.rs
# runs against a live tollgate: Node.js and Python from the system's packages
# when missing, then each example's own packages, reinstalled when its lock
# or requirements file changes. EXAMPLES_REQUIRED makes a missing one fail
# that test instead of skipping it.
apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "==> installing nodejs and npm (Debian packages)"
  apt_install nodejs npm
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "==> installing python3 (Debian packages)"
  apt_install python3 python3-venv python3-pip
fi
echo "==> node $(node --version), $(python3 --version)"

if ! cmp -s examples/node/package-lock.json examples/node/node_modules/.tollgate-lock; then
  echo "==> npm ci (examples/node)"
  (cd examples/node && npm ci --no-audit --no-fund --loglevel=error)
  cp examples/node/package-lock.json examples/node/node_modules/.tollgate-lock
fi

venv=examples/python/.venv
if ! cmp -s examples/python/requirements.txt "$venv/.tollgate-requirements"; then
  echo "==> pip install -r examples/python/requirements.txt (into $venv)"
  rm -rf "$venv"
  # Debian's own python3 makes a venv only with python3-venv installed.
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    apt_install python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r examples/python/requirements.txt
  cp examples/python/requirements.txt "$venv/.tollgate-requirements"
fi
# Stubs from proto/, regenerated only when the protos change.
"$venv/bin/python" examples/python/stubs.py >/dev/null
export EXAMPLES_REQUIRED=1

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "==> cargo test"
cargo test --locked --all-targets
