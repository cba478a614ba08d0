#!/usr/bin/env bash
# The real-LLM CPU set-up end to end (configs/cpu-llms.yaml): every verb in turn, timed
# (scripts/run-config.sh). Outputs go to DIR (default outputs-cpu/).
#   bash scripts/cpu-llms.sh [DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec bash scripts/run-config.sh configs/cpu-llms.yaml "${1:-outputs-cpu}"
