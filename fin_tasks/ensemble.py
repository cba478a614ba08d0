"""The `ensemble` stage: several runs' class probabilities combined into one prediction.

`mean` averages the members' probabilities; `stack` fits a logistic regression on them
(scikit-learn) over the valid split and applies it to test. Its valid predictions are
out-of-fold: each valid row is predicted by a stacker fit on the other folds (k folds,
stratified, seeded), so the valid score the leaderboard shows was never fit on the rows it
scores. Members must have predicted the same prepared data the ensemble reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fin_tasks.artifacts import atomic_dir, read_jsonl, sha256_file, write_json, write_jsonl
from fin_tasks.config import EnsembleConfig
from fin_tasks.errors import OutputError
from fin_tasks.layout import ENSEMBLE_RECORD as RECORD, ENSEMBLE_VARIANT as VARIANT
from fin_tasks.predictions import is_distribution, predictions_schema
from fin_tasks.tasks import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """One member: a train run and the variant of its predictions that is combined."""

    run: str
    variant: str

    @property
    def name(self) -> str:
        return f"{self.run}/{self.variant}"


def resolve_members(config: EnsembleConfig, predict_root: Path) -> list[Member]:
    """Each member as (run, variant): `run/variant`, or `run` alone when the run predicted
    one trained variant (a zero-shot run's is `base`)."""
    members = []
    for entry in config.members:
        run, _, variant = entry.partition("/")
        folder = predict_root / run
        if not folder.is_dir():
            raise OutputError(f"ensemble member '{entry}': {folder} does not exist; run "
                              f"`fin-tasks predict --run {run}` first")
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not variant:
            trained = [v for v in found if v != "base"] or found
            if len(trained) != 1:
                raise OutputError(f"ensemble member '{entry}' predicted {', '.join(found)}; "
                                  f"name one as '{run}/<variant>'")
            variant = trained[0]
        if variant not in found:
            raise OutputError(f"ensemble member '{entry}': run {run} predicted "
                              f"{', '.join(found) or 'nothing'}, not '{variant}'")
        if Member(run, variant) in members:
            raise OutputError(f"ensemble member '{entry}' is {run}/{variant}, listed already")
        members.append(Member(run, variant))
    return members


def member_probabilities(member: Member, split: str, ids: Sequence[str], task: Task,
                         predict_root: Path) -> np.ndarray:
    """(rows, labels) probabilities a member predicted for `ids`, in that order."""
    path = predict_root / member.run / member.variant / f"{split}.jsonl"
    if not path.is_file():
        raise OutputError(f"ensemble member '{member.name}' has no {split} predictions "
                          f"({path}); add {split} to its predict splits")
    rows = {r["id"]: r for r in read_jsonl(path)}
    missing = [i for i in ids if i not in rows]
    if missing or len(rows) != len(ids):
        raise OutputError(f"{path}: its ids are not the {split} split's ({len(rows)} rows for "
                          f"{len(ids)}; first missing: {missing[:1] or 'none'}); it was "
                          "predicted from other data: rerun its predict stage")
    for i in ids:
        if not is_distribution(rows[i].get("probs"), len(task.labels)):
            raise OutputError(f"{path}: row '{i}', field 'probs': expected one probability per "
                              f"label of {', '.join(task.labels)} summing to 1, found "
                              f"{rows[i].get('probs')!r}; predict it again with this version "
                              "of fin-tasks")
    return np.array([rows[i]["probs"] for i in ids], dtype=np.float64)


def check_same_data(member: Member, prepared_dir: Path, predict_root: Path) -> None:
    """Refuse a member whose predictions were made from other prepared data."""
    record = predict_root / member.run / "predict.json"
    if not record.is_file():
        raise OutputError(f"ensemble member '{member.name}': {record} is missing; rerun "
                          f"`fin-tasks predict --run {member.run}`")
    used = json.loads(record.read_text(encoding="utf-8")).get("inputs", {})
    here = {p.name: sha256_file(p) for p in sorted(prepared_dir.glob("*.jsonl"))}
    if used != here:
        changed = sorted(name for name in here.keys() | used.keys()
                         if here.get(name) != used.get(name))
        raise OutputError(f"ensemble member '{member.name}' predicted other data than "
                          f"{prepared_dir} holds now ({', '.join(changed)} differ); rerun its "
                          "train and predict stages, or drop it from the ensemble")


def stacker(config: EnsembleConfig) -> Any:
    """The logistic regression a `stack` ensemble fits on its members' probabilities."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=config.c, max_iter=2000)


def features(probs: Sequence[np.ndarray]) -> np.ndarray:
    """The stacker's input: every member's log-probabilities side by side."""
    return np.log(np.clip(np.concatenate(probs, axis=1), 1e-6, 1.0))


def out_of_fold(config: EnsembleConfig, x: np.ndarray, gold: np.ndarray,
                labels: int) -> tuple[np.ndarray, int]:
    """Valid probabilities each predicted by a stacker fit on the other folds only; the
    number of folds used (fewer than asked when a label has fewer valid rows)."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(gold, minlength=labels)
    folds = min(config.folds, int(counts[counts > 0].min()))
    if (counts > 0).sum() < 2 or counts[counts > 0].min() < 2:
        raise OutputError(f"a stack ensemble needs at least 2 labels in valid, each on 2 rows "
                          f"or more, for out-of-fold scores; valid has {counts.tolist()} rows "
                          "per label")
    result = np.zeros((len(gold), labels))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.seed)
    for fit_rows, held_out in split.split(x, gold):
        model = stacker(config).fit(x[fit_rows], gold[fit_rows])
        result[np.ix_(held_out, model.classes_)] = model.predict_proba(x[held_out])
    return result, folds


def build_ensemble(name: str, config: EnsembleConfig, task: Task, prepared_dir: str | Path,
                   predict_root: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Combine the members' probabilities; write `ensemble/{valid,test}.jsonl` and
    `ensemble.json` (members, weights, how the valid score was obtained) into `out_dir`."""
    prepared_dir, predict_root = Path(prepared_dir), Path(predict_root)
    members = resolve_members(config, predict_root)
    for member in members:
        check_same_data(member, prepared_dir, predict_root)
    splits = {s: read_jsonl(prepared_dir / f"{s}.jsonl") for s in ("valid", "test")
              if (prepared_dir / f"{s}.jsonl").exists()}
    probs = {s: [member_probabilities(m, s, [r["id"] for r in records], task, predict_root)
                 for m in members] for s, records in splits.items()}
    gold = _valid_gold(config, splits, prepared_dir)
    combined, record = _combine(config, probs, gold, len(task.labels))
    record = {"ensemble": name, "task": config.task, "method": config.method,
              "members": [m.name for m in members]} | record
    with atomic_dir(out_dir) as scratch:
        for split, values in combined.items():
            rows = [{"id": r["id"]} | _row(task, p) for r, p in zip(splits[split], values)]
            predictions_schema(task).validate(pd.DataFrame(rows))
            write_jsonl(scratch / VARIANT / f"{split}.jsonl", rows)
        write_json(scratch / RECORD, record | {
            "inputs": {p.name: sha256_file(p) for p in sorted(prepared_dir.glob("*.jsonl"))}})
    log.info("ensemble %s: %s of %s -> %s", name, config.method,
             ", ".join(m.name for m in members), out_dir)
    return record


def _valid_gold(config: EnsembleConfig, splits: dict[str, list[dict[str, Any]]],
                prepared_dir: Path) -> np.ndarray | None:
    """The valid split's gold class indices, which a stack is fit on (a mean needs none)."""
    if config.method == "mean":
        return None
    path = prepared_dir / "valid.jsonl"
    unlabeled = [r["id"] for r in splits.get("valid", []) if r.get("gold") is None]
    if "valid" not in splits or unlabeled:
        raise OutputError(f"{path}: a stack is fit on labeled valid rows; "
                          + (f"row '{unlabeled[0]}' has no gold label" if unlabeled
                             else "there is no valid split") + " (use method: mean)")
    return np.array([r["gold"] for r in splits["valid"]])


def _combine(config: EnsembleConfig, probs: dict[str, list[np.ndarray]],
             gold: np.ndarray | None, labels: int,
             ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Each split's combined probabilities, and what the combination is (for the card)."""
    count = len(next(iter(probs.values())))
    if config.method == "mean":
        return ({s: np.mean(p, axis=0) for s, p in probs.items()},
                {"weights": [round(1 / count, 6)] * count,
                 "valid_scores": "mean of the members' probabilities: nothing is fit"})
    valid, folds = out_of_fold(config, features(probs["valid"]), gold, labels)
    model = stacker(config).fit(features(probs["valid"]), gold)
    combined = {"valid": valid}
    if "test" in probs:
        combined["test"] = np.zeros((len(probs["test"][0]), labels))
        combined["test"][:, model.classes_] = model.predict_proba(features(probs["test"]))
    magnitude = np.abs(model.coef_).reshape(len(model.coef_), count, labels).sum(axis=(0, 2))
    absent = sorted(set(range(labels)) - set(model.classes_.tolist()))
    if absent:
        log.warning("ensemble: label(s) %s never occur in valid; the stack gives them "
                    "probability 0", absent)
    return combined, {"absent_labels": absent,
        "weights": [round(float(w), 6) for w in magnitude / magnitude.sum()],
        "coefficients": np.round(model.coef_, 6).tolist(),
        "intercept": np.round(model.intercept_, 6).tolist(), "classes": model.classes_.tolist(),
        "valid_scores": f"out-of-fold: {folds} stratified folds (seed {config.seed}), each "
                        "valid row predicted by a stacker fit on the other folds; test by "
                        "one fit on all of valid"}


def _row(task: Task, probs: np.ndarray) -> dict[str, Any]:
    """A prediction row: the most probable label and every label's probability."""
    best = task.labels[int(np.argmax(probs))]
    return {"output": best, "label": best, "probs": [round(float(p), 6) for p in probs]}
