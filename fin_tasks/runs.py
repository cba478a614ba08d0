"""What every training run reads and records, whatever it trains: the records it learns
from, its train_config.json entry and its loss curves (torch-free, so a baseline's stage
never imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fin_tasks.artifacts import atomic_dir, read_jsonl, sha256_file, write_csv
from fin_tasks.config import Params
from fin_tasks.tasks import Task


def run_record(params: Params, run: str, prepared_dir: Path) -> dict[str, Any]:
    """What every run's train_config.json holds: its entry, model, task and data hashes."""
    spec = params.train.runs[run]
    return {"run": spec.model_dump(mode="json"),
            "model": params.models[spec.model].model_dump(mode="json"),
            "task": params.tasks[spec.task].model_dump(mode="json"),
            "data": {p.name: sha256_file(p) for p in sorted(prepared_dir.glob("*.jsonl"))}}


def labeled_records(path: Path) -> list[dict[str, Any]]:
    """The records of a prepared split that carry an answer."""
    return [r for r in read_jsonl(path) if r.get("answer") is not None]


def training_records(path: Path, task: Task) -> list[dict[str, Any]]:
    """Records a run learns from: every text of a corpus, else the labeled records."""
    return labeled_records(path) if task.kind.labeled else read_jsonl(path)


def write_loss_plots(plots_dir: str | Path | None, history: list[dict[str, Any]],
                     valid_history: list[dict[str, Any]]) -> None:
    """Loss curves for `dvc plots` (header-only files for a run without steps)."""
    if plots_dir is None:
        return
    with atomic_dir(plots_dir) as scratch:
        write_csv(scratch / "train_loss.csv", history, ["step", "train_loss"])
        write_csv(scratch / "valid_loss.csv", valid_history, ["step", "valid_loss"])
