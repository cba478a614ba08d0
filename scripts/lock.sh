#!/usr/bin/env bash
# Refresh requirements.lock from pyproject.toml and constraints.txt: every package's exact
# version and sha256 hashes, resolved for CPython 3.11 on x86_64 Linux (the project's machines).
#   bash scripts/lock.sh
# Run it after editing either file and commit the lock with them (a test fails otherwise).
# torch is left out on purpose: setup installs torch==2.13.0 first, the local CPU wheel where
# PIP_FIND_LINKS holds one and PyPI's CUDA build elsewhere, and that build's metadata pins its
# own CUDA packages exactly; the lock is resolved against the CPU wheel, so it holds none.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
uv=$(command -v uv || true)
if [[ -z $uv ]]; then
  [[ -x .venv/bin/uv ]] || { python3 -m venv .venv && .venv/bin/python -m pip install -q uv; }
  uv=.venv/bin/uv
fi
links=()
for dir in ${PIP_FIND_LINKS:-}; do links+=(--find-links "$dir"); done
inputs=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-64)
"$uv" pip compile --quiet pyproject.toml --extra quant --extra encoder --extra gguf --extra dev \
  -c constraints.txt "${links[@]}" --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --generate-hashes --no-emit-package torch --no-header -o requirements.lock.tmp
{
  echo "# fin-tasks lock: exact versions and hashes for CPython 3.11, x86_64 Linux (torch apart)."
  echo "# Made by: bash scripts/lock.sh   from pyproject.toml + constraints.txt, sha256 below."
  echo "# inputs-sha256: $inputs"
  cat requirements.lock.tmp
} > requirements.lock
rm requirements.lock.tmp
echo "lock: $(grep -c '^[A-Za-z0-9]' requirements.lock) packages -> requirements.lock"
