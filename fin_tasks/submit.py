"""The `submit` stage: one bundle per task, ready to hand in.

A bundle holds the test predictions in test order (id, model output, parsed label), the
model (an adapter with its base id and revision, or merged safetensors weights), a model
card stating data, method and scores, and a validation report. The validator refuses a
bundle with missing or duplicate ids, labels outside the task's set, empty summaries, or a
row count that differs from the test set. For causal models it also runs the organizers'
data leakage test: perplexity on test texts minus perplexity on train texts.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fin_tasks.artifacts import atomic_dir, read_jsonl, sha256_file, write_json
from fin_tasks.config import Params
from fin_tasks.layout import ENSEMBLE_RECORD, ENSEMBLE_VARIANT, EVALUATION_FILE, Layout
from fin_tasks.metrics import MISSING, perplexity
from fin_tasks.tasks import Task, task_from_config

log = logging.getLogger(__name__)
LEAKAGE_MAX_LENGTH = 512  # tokens per window of the leakage test's perplexity


class SubmissionError(ValueError):
    """A bundle that would be refused by the organizers; nothing is written."""


def choose(task_name: str, params: Params, layout: Layout) -> tuple[str, str, float, int]:
    """The (run, variant) a task submits, its validation score, and how many candidates it
    was picked from on that score (1: params named it)."""
    choice = params.submit.tasks[task_name]
    task = task_from_config(task_name, params.tasks[task_name])
    key = task.kind.ranking
    candidates = []
    for run, spec in params.train.runs.items():
        if spec.task != task_name or choice.run not in ("auto", run):
            continue
        baseline = params.models[spec.model].model_kind.baseline
        if choice.run == "auto" and baseline and not choice.include_baselines:
            continue
        metrics = layout.read_evaluation(run)["metrics"]
        for variant, splits in metrics.items():
            predicted_test = _predictions_file(params, layout, run, variant).exists()
            if choice.variant in ("auto", variant) and "valid" in splits and predicted_test:
                candidates.append((splits["valid"][key], run, variant))
    for name, ensemble in params.ensemble.items():
        if ensemble.task != task_name or choice.run not in ("auto", name) or \
                choice.variant not in ("auto", ENSEMBLE_VARIANT):
            continue
        if not (layout.evaluation(name) / EVALUATION_FILE).exists():
            log.warning("submit %s: ensemble %s was not evaluated; not a candidate",
                        task_name, name)
            continue
        splits = layout.read_evaluation(name)["metrics"].get(ENSEMBLE_VARIANT, {})
        if "valid" in splits and _predictions_file(params, layout, name,
                                                   ENSEMBLE_VARIANT).exists():
            candidates.append((splits["valid"][key], name, ENSEMBLE_VARIANT))
    if not candidates:
        raise SubmissionError(f"submit.tasks.{task_name}: no evaluated run matches "
                              f"run={choice.run}, variant={choice.variant}")
    score, run, variant = min(candidates, key=lambda c: task.kind.sort_key(c[0]))
    return run, variant, score, len(candidates)


def _predictions_file(params: Params, layout: Layout, name: str, variant: str,
                      split: str = "test") -> Path:
    """Where a run's (or an ensemble's) predictions of a split are."""
    folder = layout.ensembled(name) if name in params.ensemble else layout.predictions(name)
    return folder / variant / f"{split}.jsonl"


def validate_bundle(task: Task, test: Sequence[dict[str, Any]],
                    predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Check a prediction file against the test set; raise SubmissionError on any problem."""
    problems = []
    ids = [p["id"] for p in predictions]
    expected = [t["id"] for t in test]
    if len(predictions) != len(test):
        problems.append(f"{len(predictions)} rows, but the test set has {len(test)}")
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        labels = {i: sorted({str(p.get("label", p.get("output"))) for p in predictions
                             if p["id"] == i}) for i in duplicates[:5]}
        problems.append("duplicate ids: " + ", ".join(
            f"{i} (predicted {' and '.join(labels[i])})" for i in duplicates[:5]))
    missing = sorted(set(expected) - set(ids))
    if missing:
        problems.append(f"test ids without a prediction: {', '.join(missing[:5])}")
    extra = sorted(set(ids) - set(expected))
    if extra:
        problems.append(f"ids not in the test set: {', '.join(extra[:5])}")
    if task.labels:
        outside = sorted({p["label"] for p in predictions} - {*task.labels, MISSING})
        if outside:
            problems.append(f"labels outside {list(task.labels)}: {', '.join(outside)}")
    else:
        empty = [p["id"] for p in predictions if not str(p["output"]).strip()]
        if empty:
            problems.append(f"{len(empty)} empty summaries (first: {empty[0]})")
    if problems:
        raise SubmissionError("submission refused: " + "; ".join(problems))
    report: dict[str, Any] = {"ok": True, "rows": len(predictions), "order": "test order"}
    if task.labels:
        report["unparsed_outputs"] = sum(1 for p in predictions if p["label"] == MISSING)
    return report


def leakage_test(model: Any, tokenizer: Any, train: Sequence[dict[str, Any]],
                 test: Sequence[dict[str, Any]], rows: int) -> dict[str, float]:
    """The organizers' data leakage test: perplexity on test minus perplexity on train.

    A model that saw the test set tends to find it easier than its own training data,
    which drives the difference down (below zero)."""
    from fin_tasks.predict import text_losses

    train_ppl = perplexity(text_losses(model, tokenizer, train[:rows], LEAKAGE_MAX_LENGTH))
    test_ppl = perplexity(text_losses(model, tokenizer, test[:rows], LEAKAGE_MAX_LENGTH))
    return {"rows": min(rows, len(train), len(test)), "train_perplexity": round(train_ppl, 4),
            "test_perplexity": round(test_ppl, 4),
            "test_minus_train": round(test_ppl - train_ppl, 4)}


def submit_task(task_name: str, params: Params, root: str | Path,
                out_dir: str | Path) -> dict[str, Any]:
    """Build and validate the submission bundle of one task under `out_dir`."""
    layout = Layout(Path(root))
    task = task_from_config(task_name, params.tasks[task_name])
    run, variant, valid_score, compared = choose(task_name, params, layout)
    test = read_jsonl(layout.prepared(task_name) / "test.jsonl")
    evaluation = layout.read_evaluation(run)
    predictions_file = _predictions_file(params, layout, run, variant)
    scored = evaluation.get("predictions", {}).get(f"{variant}/test.jsonl")
    if scored != sha256_file(predictions_file):
        raise SubmissionError(f"{predictions_file} is not the file `evaluate` scored for run "
                              f"{run} (its hash changed since); rerun predict and evaluate")
    rows = read_jsonl(predictions_file)
    report = validate_bundle(task, test, rows)  # duplicates refused before any lookup by id
    by_id = {p["id"]: p for p in rows}
    predictions = [by_id[t["id"]] for t in test]
    ensemble = run in params.ensemble
    model = None if ensemble else _leakage(task, params, layout, run, variant, test, report)
    with atomic_dir(out_dir) as scratch:
        _write_predictions(scratch / "predictions.csv", predictions, task)
        if ensemble:
            bundled = _bundle_ensemble(scratch / "model", layout.ensembled(run))
        else:
            spec = params.train.runs[run]
            bundled = _bundle_model(scratch / "model", params, run, variant,
                                    layout.base(spec.model), layout.trained(run), model,
                                    task.labels)
        card = model_card(task_name, params, run, variant, evaluation, report, bundled, layout)
        (scratch / "MODEL_CARD.md").write_text(card, encoding="utf-8")
        report |= {"task": task_name, "run": run, "variant": variant,
                   "valid_" + task.kind.ranking: valid_score, "picked_from": compared,
                   "predictions_sha256": sha256_file(scratch / "predictions.csv")}
        write_json(scratch / "validation.json", report)
    log.info("submission %s: run %s (%s), %d rows -> %s", task_name, run, variant,
             len(predictions), out_dir)
    return report


def _method_lines(params: Params, run: str, bundled: dict[str, Any]) -> list[str]:
    """The model card's method of one train run: its model, weights, LoRA, head, settings."""
    spec = params.train.runs[run]
    config = params.models[spec.model]
    return [f"- model entry `{spec.model}`: kind {config.kind}, source {config.source or '-'}"
            f" (revision {config.revision or '-'})",
            *([f"- weights: {config.gguf.origin}; licence {config.gguf.license}; "
               f"GGUF sha256 {config.gguf.sha256}"] if config.gguf else []),
            f"- quantization: "
            f"{config.quantization.model_dump() if config.quantization else 'none'}",
            f"- LoRA: {config.lora.model_dump() if config.lora else 'none (every weight)'}",
            *([f"- label head: {spec.head.model_dump()} (a linear head over the labels on the "
               "last real token's hidden state)"] if spec.head else []),
            f"- hyper-parameters: {params.train.hyper(run).model_dump()}",
            f"- bundled model: {bundled.get('kind')}"]


def _leakage(task: Task, params: Params, layout: Layout, run: str, variant: str,
             test: Sequence[dict[str, Any]], report: dict[str, Any]) -> Any:
    """The organizers' leakage test of a causal LM's variant, into `report`; the model it
    loaded (reused for a merged bundle), or None where the test does not apply (a label
    head reads no text's likelihood)."""
    spec = params.train.runs[run]
    config = params.models[spec.model]
    if not config.model_kind.causal or not params.submit.leakage_rows or variant == "head":
        return None
    from fin_tasks.models import BaseRef, load_tokenizer
    from fin_tasks.predict import load_variant

    train_dir = layout.trained(run)
    model = load_variant(variant, config, task.labels, layout.base(spec.model), train_dir)
    tokenizer = load_tokenizer(BaseRef(str(train_dir / "tokenizer")))
    train = read_jsonl(layout.prepared(task.name) / "train.jsonl")
    report["leakage"] = leakage_test(model, tokenizer, train, test, params.submit.leakage_rows)
    return model


def _bundle_ensemble(target: Path, ensemble_dir: Path) -> dict[str, Any]:
    """An ensemble's bundle: its record (members, weights, the stacker's coefficients); each
    member's model is in that member's own bundle."""
    target.mkdir(parents=True)
    shutil.copy2(ensemble_dir / ENSEMBLE_RECORD, target / ENSEMBLE_RECORD)
    record = json.loads((ensemble_dir / ENSEMBLE_RECORD).read_text(encoding="utf-8"))
    return {"kind": "ensemble", "members": record["members"], "weights": record["weights"],
            "method": record["method"]}


def _write_predictions(path: Path, predictions: Sequence[dict[str, Any]], task: Task) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        fields = ["id", "output", "label"] if task.labels else ["id", "output"]
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(predictions)


def _bundle_model(target: Path, params: Params, run: str, variant: str, base_dir: Path,
                  train_dir: Path, model: Any, labels: tuple[str, ...]) -> dict[str, Any]:
    """Copy what reproduces the predictions: baseline, weights, or adapter + base reference."""
    spec = params.train.runs[run]
    config = params.models[spec.model]
    target.mkdir(parents=True)
    if variant == "baseline":
        shutil.copy2(train_dir / "baseline.json", target / "baseline.json")
        return {"kind": "baseline"}
    if variant == "full":
        shutil.copytree(train_dir / "model", target, dirs_exist_ok=True)
        shutil.copytree(train_dir / "tokenizer", target, dirs_exist_ok=True)
        return {"kind": "weights", "variant": variant}
    if variant == "merged" and params.submit.merged_weights:
        from fin_tasks.predict import load_variant

        merged = model or load_variant("merged", config, labels, base_dir, train_dir)
        merged.save_pretrained(target, safe_serialization=True)
        shutil.copytree(train_dir / "tokenizer", target, dirs_exist_ok=True)
        return {"kind": "weights", "variant": variant}
    from fin_tasks.models import read_base_ref

    ref = read_base_ref(base_dir)
    if variant != "base":  # the adapter, or a label head with its adapter
        folder = "head" if variant == "head" else "adapter"
        shutil.copytree(train_dir / folder, target / folder)
    base_info = {"source": config.source, "revision": config.revision,
                 "quantization": config.quantization.model_dump() if config.quantization else None,
                 "merge": variant == "merged"}
    if config.tiny is not None:  # a locally built base travels with its adapter
        shutil.copytree(Path(ref.name_or_path), target / "base")
        base_info["source"] = "base/ (built by fin-tasks from a config; bundled)"
    if config.gguf is not None:  # rebuilt by `fin-tasks base` from the pinned packages
        base_info |= {"gguf": config.gguf.model_dump(mode="json")}
    write_json(target / "base.json", base_info)
    kind = "label head" if variant == "head" else "adapter"
    return {"kind": kind, "variant": variant} | base_info


def model_card(task_name: str, params: Params, run: str, variant: str,
               evaluation: dict[str, Any], report: dict[str, Any], bundled: dict[str, Any],
               layout: Layout) -> str:
    """A Markdown model card: data, method and scores of the submitted model."""
    manifest = json.loads((layout.prepared(task_name) / "manifest.json").read_text())
    lines = [f"# {task_name}: {run} ({variant})", "", "## Data", ""]
    for split, info in manifest["splits"].items():
        lines.append(f"- {split}: {info['rows']} rows ({info['origin']}); labels "
                     f"{info['labels'] or 'n/a'}")
    lines += ["", "## Method", ""]
    if bundled["kind"] == "ensemble":
        lines += [f"- ensemble `{run}`: {bundled['method']} of the members' class "
                  "probabilities; each member's own model card describes it", ""]
        lines += [f"- member `{member}`: weight {weight}"
                  for member, weight in zip(bundled["members"], bundled["weights"])]
        lines += [f"- valid scores: {evaluation.get('valid_scores')}"]
    else:
        lines += _method_lines(params, run, bundled)
    lines += ["", "## Scores", ""]
    for split, metrics in evaluation["metrics"].get(variant, {}).items():
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()
                 if not isinstance(v, dict)}
        lines.append(f"- {split}: {shown}")
    if "leakage" in report:
        lines += ["", "## Data leakage test", "", f"- {report['leakage']}"]
    return "\n".join(lines) + "\n"
