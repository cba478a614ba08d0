#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite: every tier by default.
# Fast tier only: bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
source scripts/env.sh
exec python -m pytest "$@"
