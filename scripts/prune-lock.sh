#!/usr/bin/env bash
# Drop from dvc.lock the stages dvc.yaml no longer defines (DVC keeps them after a run or
# model is removed from params.yaml). Keeps DVC's own layout of the file.
#   bash scripts/prune-lock.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
python - <<'PY'
from pathlib import Path

from ruamel.yaml import YAML

from flows.stages import stage_graph

yaml = YAML()
lock = yaml.load(Path("dvc.lock"))
defined = {stage.name for stage in stage_graph(Path("."))}
stale = [name for name in lock["stages"] if name not in defined]
for name in stale:
    del lock["stages"][name]
yaml.dump(lock, Path("dvc.lock"))
print(f"prune-lock: removed {len(stale)} stage(s): {', '.join(stale) or 'none'}")
PY
