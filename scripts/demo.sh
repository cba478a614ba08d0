#!/usr/bin/env bash
# Set up the environment (idempotent) and run the main job offline: `dvc repro` on the
# default params.yaml (the team-written demo data). Extra arguments go to `dvc repro`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
dvc repro "$@"
echo
echo "Outputs (DVC-tracked, under $PWD/outputs):"
for stage in outputs/*/; do
  for item in "$stage"*/; do
    [[ -d $item ]] && echo "  ${item%/}/  ($(ls "$item" | tr '\n' ' '))"
  done
done
