#!/usr/bin/env bash
# The real-LLM CPU set-up end to end (configs/cpu-llms.yaml), one verb after the other, each
# timed: prepare, base, train, predict, evaluate, submit, report. Outputs go to DIR
# (default outputs-cpu/); a training that is killed resumes from its last checkpoint when
# the script is run again. 74 minutes on a 2-core CPU with nothing else running (README).
#   bash scripts/cpu-llms.sh [DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
out="${1:-outputs-cpu}"
for verb in prepare base train predict evaluate submit report; do
  started=$SECONDS
  fin-tasks "$verb" --params configs/cpu-llms.yaml --out-dir "$out"
  echo "cpu-llms: $verb took $((SECONDS - started)) s" >&2
done
echo "leaderboard: $out/report/leaderboard.md"
