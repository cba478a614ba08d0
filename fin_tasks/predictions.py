"""Predictions as files, torch-free: which variants a run predicts with, how a raw output
becomes a label, the schema every predictions file meets, and the writer that runs each
variant's predictor over the configured splits. Baselines predict here without a model;
`predict.py` adds the models."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa

from fin_tasks import baselines, costs
from fin_tasks.artifacts import (atomic_dir, package_versions, read_jsonl, sha256_file,
                                 write_json, write_jsonl)
from fin_tasks.config import ModelConfig, PredictConfig
from fin_tasks.metrics import MISSING, PARSERS
from fin_tasks.runs import RunInputs
from fin_tasks.tasks import Task

log = logging.getLogger(__name__)


def variants_for(config: ModelConfig, settings: PredictConfig,
                 zero_shot: bool = False, head: bool = False) -> tuple[str, ...]:
    """The model variants a trained run predicts with (a baseline's one is `baseline`, a
    label head's `head`)."""
    if zero_shot:
        return ("base",)
    if head:
        return ("head",)
    if config.lora is None:
        return ("full",)
    if config.model_kind.own_head:  # the head exists only with its trained adapter
        return tuple(v for v in settings.variants if v != "base") or ("adapter",)
    return settings.variants


def parse(task: Task, text: str) -> str | None:
    """The label a generated text stands for (None for summarization)."""
    return PARSERS[task.parser](text, task.labels) if task.kind.prediction == "label" else None


def predictions_schema(task: Task) -> pa.DataFrameSchema:
    """One row per input id: the raw output and, for classification, a label or "missing"."""
    columns = {"id": pa.Column(str, unique=True), "output": pa.Column(str)}
    if task.kind.prediction == "label":
        columns["label"] = pa.Column(str, pa.Check.isin([*task.labels, MISSING]))
        columns["probs"] = pa.Column(object, pa.Check(
            lambda probs: is_distribution(probs, len(task.labels)), element_wise=True,
            error=f"one probability per label ({len(task.labels)}), each in [0, 1], "
                  "summing to 1"), required=False)
    elif task.kind.prediction == "loss":
        columns |= {"nll": pa.Column(float, pa.Check.ge(0)),
                    "tokens": pa.Column(int, pa.Check.ge(0))}
    else:
        columns["label"] = pa.Column(object, pa.Check(lambda s: s.isna()), nullable=True)
    return pa.DataFrameSchema(columns, strict=False)


def is_distribution(probs: Any, size: int, tolerance: float = 1e-4) -> bool:
    """Whether `probs` is a list of `size` probabilities summing to one (within rounding)."""
    return (isinstance(probs, list) and len(probs) == size
            and all(isinstance(p, (int, float)) and 0 <= p <= 1 for p in probs)
            and abs(sum(probs) - 1) <= tolerance)


def write_predictions(info: dict[str, Any], task: Task, config: ModelConfig,
                      predictors: dict[str, Callable[[], Callable]], settings: PredictConfig,
                      prepared_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run each variant's predictor (built one at a time) on every configured split and
    write `<variant>/<split>.jsonl` plus `predict.json` into `out_dir`, atomically."""
    prepared_dir = Path(prepared_dir)
    splits = {s: read_jsonl(prepared_dir / f"{s}.jsonl") for s in settings.splits}
    only = settings.base_splits if settings.base_splits is not None else settings.splits
    generative = config.model_kind.causal and "head" not in predictors
    info |= {"mode": settings.mode if task.kind.prediction == "label" and generative else None,
             "probabilities": _probabilities_from(task, config, settings, predictors),
             "variants": {}}
    spent: dict[str, dict[str, float]] = {}  # this machine's speed: recorded apart
    with atomic_dir(out_dir) as scratch:
        for variant, make in predictors.items():
            predictor = make()
            info["variants"][variant] = {}
            for split, records in splits.items():
                if variant == "base" and len(predictors) > 1 and split not in only:
                    continue
                started = time.perf_counter()
                rows = [{"id": r["id"]} | out for r, out in zip(records, predictor(records))]
                seconds = time.perf_counter() - started
                predictions_schema(task).validate(pd.DataFrame(rows))
                write_jsonl(scratch / variant / f"{split}.jsonl", rows)
                info["variants"][variant][split] = {"rows": len(rows)}
                spent[f"{variant}/{split}"] = {
                    "rows": len(rows), "seconds": round(seconds, 3),
                    "examples_per_s": round(len(rows) / max(seconds, 1e-9), 2)}
                log.info("%s %s %s: %d rows, %.1f examples/s", info.get("run", info.get("merge")),
                         variant, split, len(rows), len(rows) / max(seconds, 1e-9))
            del predictor
        info |= {"settings": settings.model_dump(mode="json"),
                 "inputs": {p.name: sha256_file(p) for p in sorted(prepared_dir.glob("*.jsonl"))},
                 "packages": package_versions()}
        write_json(scratch / "predict.json", info)
    costs.record("predict", str(info.get("run", info.get("merge"))), spent)
    return info


def _probabilities_from(task: Task, config: ModelConfig, settings: PredictConfig,
                        predictors: dict[str, Any]) -> str | None:
    """Where a classifier's `probs` come from, for whoever combines them (an ensemble)."""
    if task.kind.prediction != "label":
        return None
    if config.model_kind.own_head or "head" in predictors:
        return "softmax of the head's logits"
    if not config.model_kind.causal:
        return "one-hot: the rule's one answer"
    return "softmax of each label's mean log-likelihood per token" + (
        "; the label is parsed from the generation and may differ from their argmax"
        if settings.mode == "generate" else "")


def predict_baseline(run: RunInputs, prepared_dir: str | Path, train_dir: str | Path,
                     out_dir: str | Path) -> dict[str, Any]:
    """The `predict` stage of a baseline run: its fitted rule applied to every split."""
    fitted = json.loads((Path(train_dir) / "baseline.json").read_text(encoding="utf-8"))

    def predictor(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = [{"output": text, "label": parse(run.task, text)}
                for text in baselines.outputs(fitted, records)]
        if run.task.kind.prediction == "label":  # a rule is certain of its one answer
            for row in rows:
                row["probs"] = [float(label == row["label"]) for label in run.task.labels]
        return rows

    return write_predictions(run.names, run.task, run.model, {"baseline": lambda: predictor},
                             run.predict, prepared_dir, out_dir)
