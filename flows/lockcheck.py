"""Which stages of a `dvc repro` wrote other bytes than the committed dvc.lock records.

    python -m flows.lockcheck COMMITTED_LOCK NEW_LOCK [--params params.yaml]
    python -m flows.lockcheck --record      # after `dvc repro`: this machine wrote the lock

Every stage that neither trains nor runs a model (prepare, corpus, questions, base, the
baselines, and what only reads them) must give the same output hashes on any machine. Stages
that train or run a model, and those downstream of them, may differ in the last bits between
machines that compute differently (AVX2 against AVX512-BF16, float32 against bf16 compute);
they must agree too on a machine of the kind that wrote the lock (`.dvc/lock-machine.json`).
Exit status 1 names every stage that broke its rule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from fin_tasks.config import BASELINE_KINDS, Params, load_params
from flows.stages import Stage, stage_graph

ROOT = Path(__file__).resolve().parents[1]
MACHINE_FILE = ".dvc/lock-machine.json"
MODEL_GROUPS = ("train", "predict", "merge", "predict_merge")


def machine_kind() -> dict[str, str]:
    """What decides a model stage's last bits here: the device and `auto`'s compute dtype."""
    import torch

    from fin_tasks.devices import cpu_has_native_bf16

    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(0), "auto_compute": "gpu"}
    return {"device": "cpu", "auto_compute": "bfloat16" if cpu_has_native_bf16() else "float32"}


def runs_a_model(stage: Stage, params: Params) -> bool:
    """Whether a stage itself runs a model: to train or predict (not a baseline's), or to
    score summaries by BERTScore (an encoder embeds them)."""
    if stage.group.startswith("evaluate"):
        return params.evaluate.bertscore_model is not None and \
            params.tasks[_task_of(stage, params)].kind.name == "summarization"
    if stage.group not in MODEL_GROUPS:
        return False
    run = params.train.runs.get(stage.key or "")
    return run is None or params.models[run.model].kind not in BASELINE_KINDS


def _task_of(stage: Stage, params: Params) -> str:
    """The task an evaluation scores: its run's, merge's or ensemble's."""
    key = stage.key or ""
    if key in params.train.runs:
        return params.train.runs[key].task
    return params.merge[key].evaluate_on if key in params.merge else params.ensemble[key].task


def machine_bound(stages: list[Stage], params: Params) -> set[str]:
    """The stages that run a model or read, directly or not, what one wrote."""
    bound: set[str] = set()
    for stage in stages:  # in dependency order: upstream first
        if runs_a_model(stage, params) or bound & set(stage.upstream):
            bound.add(stage.name)
    return bound


def changed(committed: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Stages whose output hashes differ between two dvc.lock files (or exist in one only)."""
    def outs(lock: dict[str, Any], name: str) -> dict[str, Any]:
        return {o["path"]: o.get("md5") for o in lock["stages"].get(name, {}).get("outs", [])}

    names = set(committed["stages"]) | set(new["stages"])
    return sorted(name for name in names if outs(committed, name) != outs(new, name))


def check(committed_path: Path, new_path: Path, params_path: Path,
          workdir: Path) -> dict[str, list[str]]:
    """The changed stages, split into `broken` (must not differ here) and `allowed`."""
    committed, new = (yaml.safe_load(p.read_text(encoding="utf-8"))
                      for p in (committed_path, new_path))
    bound = machine_bound(stage_graph(workdir), load_params(params_path))
    recorded = workdir / MACHINE_FILE
    same_kind = recorded.exists() and json.loads(recorded.read_text()) == machine_kind()
    differ = changed(committed, new)
    broken = [name for name in differ if name not in bound or same_kind]
    return {"broken": broken, "allowed": [name for name in differ if name not in broken],
            "same_machine_kind": [str(same_kind)]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("locks", nargs="*", help="the committed dvc.lock, then the new one")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--record", action="store_true",
                        help=f"write this machine's kind to {MACHINE_FILE}")
    args = parser.parse_args()
    if args.record:
        (ROOT / MACHINE_FILE).write_text(json.dumps(machine_kind(), indent=2) + "\n")
        print(f"lockcheck: {MACHINE_FILE} = {machine_kind()}")
        return 0
    result = check(Path(args.locks[0]), Path(args.locks[1]), Path(args.params), Path.cwd())
    for name in result["allowed"]:
        print(f"lockcheck: {name}: other bytes, allowed (it runs a model, on a machine of "
              "another kind than the lock's)")
    for name in result["broken"]:
        print(f"lockcheck: {name}: other output hashes than the committed dvc.lock")
    return 1 if result["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
