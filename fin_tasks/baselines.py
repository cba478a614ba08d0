"""Baselines as ordinary model entries, so every leaderboard has a floor.

`majority` predicts the most frequent train label (classification, multiple choice);
`lead` predicts an article's first sentence, or its first `lead_words` words (summarization).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fin_tasks import costs
from fin_tasks.artifacts import atomic_dir, check_writable, package_versions, write_json
from fin_tasks.config import ModelConfig
from fin_tasks.runs import RunInputs, labeled_records, run_record, write_loss_plots
from fin_tasks.tasks import Task

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")


def fit(config: ModelConfig, task: Task, train: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What a baseline learns from the train split."""
    if config.kind not in task.kind.baselines:
        raise ValueError(f"a '{config.kind}' baseline does not apply to {task.kind.name} "
                         f"task '{task.name}'")
    if config.kind == "majority":
        counts = Counter(r["answer"] for r in train if r.get("answer") is not None)
        # ties broken by choice order, so the result does not depend on row order
        label = max(task.labels, key=lambda label: (counts[label], -task.labels.index(label)))
        return {"kind": "majority", "label": label, "counts": dict(counts)}
    return {"kind": "lead", "words": config.lead_words}


def outputs(fitted: dict[str, Any], records: Sequence[dict[str, Any]]) -> list[str]:
    """The baseline's raw output for each record."""
    if fitted["kind"] == "majority":
        return [fitted["label"]] * len(records)
    return [lead(r["text"], fitted["words"]) for r in records]


def lead(text: str, words: int | None) -> str:
    """The first sentence of `text`, or its first `words` words."""
    text = " ".join(text.split())
    if words is not None:
        return " ".join(text.split(" ")[:words])
    return _SENTENCE_END.split(text, maxsplit=1)[0]


def train_baseline(run: RunInputs, prepared_dir: str | Path, out_dir: str | Path,
                   plots_dir: str | Path | None = None) -> dict[str, Any]:
    """The `train` stage of a baseline run: it 'trains' by reading the train split (majority)
    or not at all (lead), and writes what a trained run writes, without importing torch."""
    prepared_dir = Path(prepared_dir)
    check_writable(out_dir)
    started = time.perf_counter()
    fitted = fit(run.model, run.task, labeled_records(prepared_dir / "train.jsonl"))
    metrics = run.names | {"steps": 0, "best_valid": None, "baseline": fitted}
    with atomic_dir(out_dir) as scratch:
        write_json(scratch / "baseline.json", fitted)
        write_json(scratch / "metrics.json", metrics)
        write_json(scratch / "train_config.json", run_record(run, prepared_dir) | {
            "packages": package_versions(("fin-tasks",))})
    write_loss_plots(plots_dir, [], [])
    spent = {"wall_s": round(time.perf_counter() - started, 3)}
    costs.record("train", run.name, spent)
    log.info("baseline %s: %s", run.name, {k: v for k, v in fitted.items() if k != "counts"})
    return metrics | spent | {"tokens_per_s": None}
