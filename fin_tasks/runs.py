"""What every training run reads and records, whatever it trains: its inputs resolved from
params once, the records it learns from, its train_config.json entry and its loss curves
(torch-free, so a baseline's stage never imports torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fin_tasks.artifacts import atomic_dir, read_jsonl, sha256_file, write_csv
from fin_tasks.config import (EvaluateConfig, Hyper, MergeConfig, ModelConfig, Params,
                              PredictConfig, Run, TaskConfig)
from fin_tasks.errors import ConfigError
from fin_tasks.tasks import Task, task_from_config


@dataclass(frozen=True)
class RunInputs:
    """One train run with its names resolved: everything its train, predict and evaluate
    stages read, and nothing else (the CLI resolves it once, from params)."""

    name: str
    entry: Run
    """Its params entry: the model and task names, overrides, zero_shot, predict_splits."""
    model: ModelConfig
    task_config: TaskConfig
    task: Task
    hyper: Hyper
    """The train defaults with the run's overrides."""
    predict: PredictConfig
    """The predict settings with the run's own `predict_splits`."""
    evaluate: EvaluateConfig

    @property
    def names(self) -> dict[str, str]:
        """The run, model and task names every record of the run starts with."""
        return {"run": self.name, "model": self.entry.model, "task": self.entry.task}


def resolve_run(params: Params, name: str) -> RunInputs:
    """The inputs of train run `name` (a name params does not define is a KeyError)."""
    entry = params.train.runs[name]
    predict = params.predict
    if entry.predict_splits is not None:
        predict = predict.model_copy(update={"splits": entry.predict_splits})
    return RunInputs(name=name, entry=entry, model=params.models[entry.model],
                     task_config=params.tasks[entry.task],
                     task=task_from_config(entry.task, params.tasks[entry.task]),
                     hyper=params.train.hyper(name), predict=predict, evaluate=params.evaluate)


@dataclass(frozen=True)
class MergeInputs:
    """One `merge` entry with its names resolved: what its merge, predict and evaluate stages
    read (the CLI resolves it once, from params)."""

    name: str
    config: MergeConfig
    model_name: str
    """The base model its adapters were trained on (params checks they share one)."""
    model: ModelConfig
    task: Task
    """`evaluate_on`, the task the merged model is compared on."""
    max_length: int
    """The first adapter's training `max_length` (prompts are cut as in training)."""
    predict: PredictConfig
    """The predict settings with the merge's own `mode`."""
    evaluate: EvaluateConfig


def resolve_merge(params: Params, name: str) -> MergeInputs:
    """The inputs of merge `name` (a name params does not define is a KeyError)."""
    merge = params.merge[name]
    first = params.train.runs[merge.adapters[0]]
    predict = params.predict.model_copy(update={"mode": merge.mode or params.predict.mode})
    return MergeInputs(name=name, config=merge, model_name=first.model,
                       model=params.models[first.model],
                       task=task_from_config(merge.evaluate_on, params.tasks[merge.evaluate_on]),
                       max_length=params.train.hyper(merge.adapters[0]).max_length,
                       predict=predict, evaluate=params.evaluate)


def run_record(run: RunInputs, prepared_dir: Path) -> dict[str, Any]:
    """What every run's train_config.json holds: its entry, model, task and data hashes."""
    return {"run": run.entry.model_dump(mode="json"),
            "model": run.model.model_dump(mode="json"),
            "task": run.task_config.model_dump(mode="json"),
            "data": {p.name: sha256_file(p) for p in sorted(prepared_dir.glob("*.jsonl"))}}


def labeled_records(path: Path) -> list[dict[str, Any]]:
    """The records of a prepared split that carry an answer."""
    return [r for r in read_jsonl(path) if r.get("answer") is not None]


def training_records(path: Path, task: Task) -> list[dict[str, Any]]:
    """Records a run learns from: every text of a corpus, else the labeled records."""
    return labeled_records(path) if task.kind.labeled else read_jsonl(path)


def selection_split(records: list[dict[str, Any]], fraction: float, seed: int
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows to train on, rows to select the best step on): `fraction` of each label's rows,
    drawn with `seed`, in their original order."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_label.setdefault(str(record.get("answer")), []).append(index)
    chosen: set[int] = set()
    for label in sorted(by_label):
        rows = by_label[label]
        chosen.update(rng.choice(rows, size=round(len(rows) * fraction), replace=False).tolist())
    if not chosen or len(chosen) == len(records):
        raise ConfigError(f"selection_fraction {fraction} of {len(records)} train rows leaves "
                          "no rows to select on or none to train on")
    return ([r for i, r in enumerate(records) if i not in chosen],
            [r for i, r in enumerate(records) if i in chosen])


def selected_on(hyper: Hyper) -> str | None:
    """The rows a run's best step or early stop is chosen on: `valid`, `selection` (carved
    from train), or None when nothing is chosen (the last step is kept)."""
    if not hyper.select_best and hyper.early_stopping_patience is None:
        return None
    return "selection" if hyper.selection_fraction else "valid"


def write_loss_plots(plots_dir: str | Path | None, history: list[dict[str, Any]],
                     valid_history: list[dict[str, Any]]) -> None:
    """Loss curves for `dvc plots` (header-only files for a run without steps)."""
    if plots_dir is None:
        return
    with atomic_dir(plots_dir) as scratch:
        write_csv(scratch / "train_loss.csv", history, ["step", "train_loss"])
        write_csv(scratch / "valid_loss.csv", valid_history, ["step", "valid_loss"])
