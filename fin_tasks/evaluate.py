"""The `evaluate` stage: organizer-exact metrics for every variant and labeled split.

Classification: accuracy, weighted F1 (the ranking metric), macro F1, MCC, missing rate,
a confusion matrix. Summarization: ROUGE-1/2/L (ranking: ROUGE-1), BERTScore F1, length
statistics. Multiple choice (FinEval): accuracy overall, per subject, and for questions with
and without numeric content. A corpus: held-out perplexity (lower is better). The ranking
metric gets a bootstrap 95% interval.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fin_tasks.artifacts import atomic_dir, read_jsonl, sha256_file, write_csv, write_json
from fin_tasks.config import EvaluateConfig, Params
from fin_tasks.layout import EVALUATION_FILE
from fin_tasks.metrics import (bertscore_f1, bootstrap_ci, classification_ci,
                               classification_metrics, perplexity, rouge_scores)
from fin_tasks.tasks import Task, task_from_config

log = logging.getLogger(__name__)

RANKING = {"classification": "f1_weighted", "multiple_choice": "accuracy",
           "summarization": "rouge1", "corpus": "perplexity"}
LOWER_IS_BETTER = {"perplexity"}


def evaluate_run(run: str, params: Params, prepared_dir: str | Path, predict_dir: str | Path,
                 out_dir: str | Path, plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Score every variant's predictions of one train run; write evaluation.json (the full
    record) and metrics.json (its numbers)."""
    spec = params.train.runs[run]
    return evaluate_predictions({"run": run, "task": spec.task, "model": spec.model}, params,
                                prepared_dir, predict_dir, out_dir, plots_dir)


def evaluate_merge(name: str, params: Params, prepared_dir: str | Path, merge_dir: str | Path,
                   predict_dir: str | Path, out_dir: str | Path,
                   plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Score a merge's comparison (base, base + each adapter, merged) on its task; the
    merge's own check (merged vs unmerged logits) is carried into evaluation.json."""
    merge = params.merge[name]
    model = params.train.runs[merge.adapters[0]].model
    record = json.loads((Path(merge_dir) / "merge.json").read_text(encoding="utf-8"))
    return evaluate_predictions({"merge": name, "task": merge.evaluate_on, "model": model,
                                 "method": merge.method, "merge_check": record["check"]},
                                params, prepared_dir, predict_dir, out_dir, plots_dir)


def evaluate_predictions(info: dict[str, Any], params: Params, prepared_dir: str | Path,
                         predict_dir: str | Path, out_dir: str | Path,
                         plots_dir: str | Path | None = None) -> dict[str, Any]:
    """Score every `<variant>/<split>.jsonl` under `predict_dir` on `info["task"]`'s labeled
    splits; write evaluation.json, its numbers in metrics.json, and confusion matrices for
    `dvc plots`."""
    settings = params.evaluate
    task = task_from_config(info["task"], params.tasks[info["task"]])
    prepared_dir, predict_dir = Path(prepared_dir), Path(predict_dir)
    metrics: dict[str, Any] = {}
    confusions: dict[str, list[dict[str, str]]] = {}
    for variant_dir in sorted(p for p in predict_dir.iterdir() if p.is_dir()):
        for predictions_file in sorted(variant_dir.glob("*.jsonl")):
            split = predictions_file.stem
            gold = {r["id"]: r for r in read_jsonl(prepared_dir / f"{split}.jsonl")}
            if task.kind != "corpus" and any(r.get("answer") is None for r in gold.values()):
                continue  # an unlabeled split (an official test set) has nothing to score
            rows = read_jsonl(predictions_file)
            scored = score(task, [gold[r["id"]] for r in rows], rows, settings)
            metrics.setdefault(variant_dir.name, {})[split] = scored
            if task.labels:
                confusions[f"{variant_dir.name}_{split}"] = [
                    {"actual": gold[r["id"]]["answer"], "predicted": r["label"]} for r in rows]
    result = info | {"ranking_metric": RANKING[task.kind],
                     "higher_is_better": RANKING[task.kind] not in LOWER_IS_BETTER,
                     "metrics": metrics,
                     "predictions": {str(p.relative_to(predict_dir)): sha256_file(p)
                                     for p in sorted(predict_dir.rglob("*.jsonl"))}}
    with atomic_dir(out_dir) as scratch:
        write_json(scratch / EVALUATION_FILE, result)
        write_json(scratch / "metrics.json", numbers_only(
            {"metrics": metrics} | ({"merge_check": info["merge_check"]}
                                    if "merge_check" in info else {})))
    if plots_dir is not None:
        with atomic_dir(plots_dir) as scratch:
            for name, rows in confusions.items():
                write_csv(scratch / f"confusion_{name}.csv", rows, ["actual", "predicted"])
    return result


def numbers_only(tree: dict[str, Any]) -> dict[str, Any]:
    """The numbers of an evaluation, nested as they are, for `dvc metrics show`: a `<m>_ci95`
    pair becomes `<m>_ci95_low` and `<m>_ci95_high`; names, flags and hashes stay in
    evaluation.json beside it."""
    numbers: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            numbers[key] = numbers_only(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[key] = value
        elif key.endswith("_ci95") and isinstance(value, (list, tuple)) and len(value) == 2:
            numbers[f"{key}_low"], numbers[f"{key}_high"] = value
    return numbers


def score(task: Task, gold: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
          settings: EvaluateConfig) -> dict[str, Any]:
    """Metrics of one prediction file against its gold records (same order)."""
    if task.kind == "summarization":
        return _summarization(gold, rows, settings)
    if task.kind == "corpus":
        return _perplexity(rows, settings)
    golds = [g["answer"] for g in gold]
    preds = [r["label"] for r in rows]
    result: dict[str, Any] = classification_metrics(golds, preds) | {"rows": len(rows)}
    answered = {p for p in preds if p in task.labels}
    # a model that answers one class whatever the input (or nothing) ranks by chance alone
    result["single_class"] = len(answered) <= 1 and len(set(golds)) > 1
    if result["single_class"]:
        log.warning("%s: every prediction is %s: the model collapsed to one class; its "
                    "score is a majority-class score", task.name,
                    f"'{answered.pop()}'" if answered else "missing")
    ranking = RANKING[task.kind]
    result[f"{ranking}_ci95"] = classification_ci(golds, preds, ranking, settings.bootstrap,
                                                  settings.seed)
    if task.kind == "multiple_choice":
        result |= _by_group(gold, golds, preds)
    return result


def _by_group(gold: Sequence[dict[str, Any]], golds: list[str], preds: list[str]) -> dict:
    """FinEval: accuracy per subject and for numeric / non-numeric questions."""
    correct = np.array([g == p for g, p in zip(golds, preds)])
    numeric = np.array([bool(g.get("numeric")) for g in gold])
    subjects = np.array([g.get("subject", "") for g in gold])
    return {
        "accuracy_numeric": float(correct[numeric].mean()) if numeric.any() else None,
        "rows_numeric": int(numeric.sum()),
        "accuracy_non_numeric": float(correct[~numeric].mean()) if (~numeric).any() else None,
        "rows_non_numeric": int((~numeric).sum()),
        "accuracy_by_subject": {s: float(correct[subjects == s].mean())
                                for s in sorted(set(subjects))},
    }


def _perplexity(rows: Sequence[dict[str, Any]], settings: EvaluateConfig) -> dict[str, Any]:
    """Held-out perplexity over all predicted tokens (exp of the mean token loss)."""
    pairs = [(r["nll"], r["tokens"]) for r in rows]
    tokens = sum(t for _, t in pairs)
    return {"perplexity": perplexity(pairs), "loss": sum(n for n, _ in pairs) / max(tokens, 1),
            "tokens": tokens, "rows": len(rows),
            "perplexity_ci95": bootstrap_ci(pairs, perplexity, settings.bootstrap, settings.seed)}


def _summarization(gold: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
                   settings: EvaluateConfig) -> dict[str, Any]:
    references, candidates = [g["answer"] for g in gold], [r["output"] for r in rows]
    scores = rouge_scores(references, candidates)
    result: dict[str, Any] = {key: float(np.mean(values)) for key, values in scores.items()}
    result["rouge1_ci95"] = bootstrap_ci(scores["rouge1"], np.mean, settings.bootstrap,
                                         settings.seed)
    if settings.bertscore_model:
        from fin_tasks.models import resolve_source  # torch: only where BERTScore runs

        model = resolve_source(settings.bertscore_model).name_or_path
        result["bertscore_f1"] = float(np.mean(bertscore_f1(
            references, candidates, model, settings.bertscore_layer,
            settings.bertscore_batch_size)))
        result["bertscore_model"] = settings.bertscore_model
    lengths = [len(c.split()) for c in candidates]
    result |= {"rows": len(rows), "words_mean": float(np.mean(lengths)),
               "words_reference_mean": float(np.mean([len(r.split()) for r in references])),
               "empty_outputs": int(sum(1 for c in candidates if not c.strip()))}
    return result

