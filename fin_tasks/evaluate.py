"""The `evaluate` stage: organizer-exact metrics for every variant and labeled split.

What is measured is the task's kind's (`fin_tasks.kinds`): classification (accuracy,
weighted F1 for ranking, macro F1, MCC, missing rate, a confusion matrix), summarization
(ROUGE-1/2/L, BERTScore F1, lengths), multiple choice (accuracy overall, per subject, and
numeric / non-numeric), a corpus (held-out perplexity, lower is better). The ranking metric
gets a bootstrap 95% interval.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fin_tasks.artifacts import atomic_dir, read_jsonl, sha256_file, write_csv, write_json
from fin_tasks.config import EvaluateConfig
from fin_tasks.layout import ENSEMBLE_RECORD, EVALUATION_FILE, HEADLINE_DIR
from fin_tasks.runs import MergeInputs, RunInputs
from fin_tasks.tasks import Task


def evaluate_run(run: RunInputs, prepared_dir: str | Path, predict_dir: str | Path,
                 out_dir: str | Path, plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Score every variant's predictions of one train run; write evaluation.json (the full
    record) and headline/<variant>.json (its ranking metric and interval per split)."""
    return evaluate_predictions(run.names, run.task, run.evaluate, prepared_dir, predict_dir,
                                out_dir, plots_dir)


def evaluate_merge(merge: MergeInputs, prepared_dir: str | Path, merge_dir: str | Path,
                   predict_dir: str | Path, out_dir: str | Path,
                   plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Score a merge's comparison (base, base + each adapter, merged) on its task; the
    merge's own check (merged vs unmerged logits) is carried into evaluation.json."""
    record = json.loads((Path(merge_dir) / "merge.json").read_text(encoding="utf-8"))
    info = {"merge": merge.name, "task": merge.config.evaluate_on, "model": merge.model_name,
            "method": merge.config.method, "merge_check": record["check"]}
    return evaluate_predictions(info, merge.task, merge.evaluate, prepared_dir, predict_dir,
                                out_dir, plots_dir)


def evaluate_ensemble(name: str, task: Task, settings: EvaluateConfig,
                      prepared_dir: str | Path, ensemble_dir: str | Path, out_dir: str | Path,
                      plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Score an ensemble's predictions; its record (members, weights, and how its valid
    predictions were obtained: out-of-fold for a stack) is carried into evaluation.json."""
    record = json.loads((Path(ensemble_dir) / ENSEMBLE_RECORD).read_text(encoding="utf-8"))
    info = {key: record[key] for key in ("ensemble", "task", "method", "members", "weights",
                                         "valid_scores")}
    return evaluate_predictions(info, task, settings, prepared_dir, ensemble_dir, out_dir,
                                plots_dir)


def evaluate_predictions(info: dict[str, Any], task: Task, settings: EvaluateConfig,
                         prepared_dir: str | Path, predict_dir: str | Path, out_dir: str | Path,
                         plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Score every `<variant>/<split>.jsonl` under `predict_dir` on `task`'s labeled splits;
    write evaluation.json (with `info`), the headline figures of each variant, and confusion
    matrices for `dvc plots`."""
    prepared_dir, predict_dir = Path(prepared_dir), Path(predict_dir)
    metrics: dict[str, Any] = {}
    confusions: dict[str, list[dict[str, str]]] = {}
    for variant_dir in sorted(p for p in predict_dir.iterdir() if p.is_dir()):
        for predictions_file in sorted(variant_dir.glob("*.jsonl")):
            split = predictions_file.stem
            gold = {r["id"]: r for r in read_jsonl(prepared_dir / f"{split}.jsonl")}
            if task.kind.labeled and any(r.get("answer") is None for r in gold.values()):
                continue  # an unlabeled split (an official test set) has nothing to score
            rows = read_jsonl(predictions_file)
            scored = task.kind.score(task, [gold[r["id"]] for r in rows], rows, settings)
            metrics.setdefault(variant_dir.name, {})[split] = scored
            if task.labels:
                confusions[f"{variant_dir.name}_{split}"] = [
                    {"actual": gold[r["id"]]["answer"], "predicted": r["label"]} for r in rows]
    result = info | {"ranking_metric": task.kind.ranking,
                     "higher_is_better": task.kind.higher_is_better,
                     "metrics": metrics,
                     "predictions": {str(p.relative_to(predict_dir)): sha256_file(p)
                                     for p in sorted(predict_dir.rglob("*.jsonl"))}}
    with atomic_dir(out_dir) as scratch:
        write_json(scratch / EVALUATION_FILE, result)
        for variant, figures in headline(task, metrics, info.get("merge_check")).items():
            write_json(scratch / HEADLINE_DIR / f"{variant}.json", figures)
    if plots_dir is not None:
        with atomic_dir(plots_dir) as scratch:
            for name, rows in confusions.items():
                write_csv(scratch / f"confusion_{name}.csv", rows, ["actual", "predicted"])
    return result


def headline(task: Task, metrics: dict[str, dict[str, dict[str, Any]]],
             merge_check: dict[str, Any] | None = None) -> dict[str, dict[str, float]]:
    """Per variant, the ranking metric on each split with its 95% interval (`valid`,
    `valid_low`, `valid_high`, ...), for `dvc metrics show` and `dvc exp show`: one small file
    per variant, the same columns for every run, so the table stays narrow. A merge's
    comparison adds its check (`check_max_abs_diff`) to the merged variant."""
    ranking, figures = task.kind.ranking, {}
    for variant, splits in metrics.items():
        row: dict[str, float] = {}
        for split, scores in splits.items():
            row[split] = scores[ranking]
            if scores.get(f"{ranking}_ci95"):
                row[f"{split}_low"], row[f"{split}_high"] = scores[f"{ranking}_ci95"]
        figures[variant] = row
    if merge_check and "merged" in figures:
        figures["merged"]["check_max_abs_diff"] = merge_check["max_abs_diff"]
    return figures
