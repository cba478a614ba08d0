#!/usr/bin/env bash
# One params file end to end with the fin-tasks CLI, one verb after the other, each timed:
# prepare, base, train, predict, ensemble, evaluate, submit, report. A training that is
# killed resumes from its last checkpoint when the script is run again. Used for the CPU
# set-ups of configs/ whose runs are too long for the demo's `dvc repro`.
#   bash scripts/run-config.sh CONFIG [DIR]     (DIR: default outputs-<config name>)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
config="${1:?usage: run-config.sh CONFIG [DIR]}"
out="${2:-outputs-$(basename "$config" .yaml)}"
bash scripts/setup.sh
source scripts/env.sh
ensembles=$(python -c "import sys; from fin_tasks.config import load_params; \
print(' '.join('--ensemble ' + name for name in load_params(sys.argv[1]).ensemble))" "$config")
started_all=$SECONDS
step() {
  local started=$SECONDS
  fin-tasks "$@" --params "$config" --out-dir "$out"
  echo "run-config: $* took $((SECONDS - started)) s" >&2
}
for verb in prepare base train predict; do step "$verb"; done
if [[ -n $ensembles ]]; then step ensemble; fi
step evaluate
# shellcheck disable=SC2086  # one word per option and name
if [[ -n $ensembles ]]; then step evaluate $ensembles; fi
for verb in submit report; do step "$verb"; done
echo "run-config: $config took $((SECONDS - started_all)) s in all" >&2
echo "leaderboard: $out/report/leaderboard.md"
