"""The `report` stage: one leaderboard across runs, tasks and variants (Markdown and CSV),
with confidence intervals, training cost and data/adapter hashes, and the published
FinLLM Challenge 2024 figures beside it for reference."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from fin_tasks import kinds
from fin_tasks.artifacts import atomic_dir, sha256_file, write_json
from fin_tasks.config import Params
from fin_tasks.layout import EVALUATION_FILE, Layout
from fin_tasks.tasks import task_from_config

log = logging.getLogger(__name__)

# Published results on the official test sets (../shared/CHALLENGE.md): references only.
ANCHORS = {
    "finarg_ecc": [
        ("1st Team Barclays", {"f1_weighted": 0.7626, "mcc": 0.5237}),
        ("2nd Albatross", {"f1_weighted": 0.7575, "mcc": 0.5174}),
        ("3rd L3iTC (QLoRA)", {"f1_weighted": 0.7544, "mcc": 0.5149}),
        ("6th CatMemo", {"f1_weighted": 0.7110}),
        ("majority class", {"f1_weighted": 0.361}),
    ],
    "edtsum": [
        ("1st LBZ", {"rouge1": 0.5346, "rouge2": 0.3581, "rougeL": 0.4922,
                     "bertscore_f1": 0.9117}),
        ("2nd Upaya", {"rouge1": 0.5295}),
        ("3rd Finance Wizard", {"rouge1": 0.5210}),
        ("6th L3iTC (QLoRA)", {"rouge1": 0.3661, "rouge2": 0.1872, "rougeL": 0.3046,
                               "bertscore_f1": 0.8750}),
    ],
}
ANCHOR_TYPES = {"finarg_ecc": "finarg_ecc", "edtsum": "edtsum"}


def leaderboard_rows(params: Params, layout: Layout,
                     failed: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per (run, merge or ensemble; variant; split) that was scored, best first.
    Names in `failed` (name -> reason) have no outputs and are skipped."""
    failed = failed or {}
    rows = []
    for run, spec in params.train.runs.items():
        if run in failed:
            continue
        training = json.loads((layout.trained(run) / "metrics.json").read_text())
        weights = (layout.trained(run) / "adapter" / "adapter_model.safetensors",
                   layout.trained(run) / "head" / "adapter_model.safetensors",  # a head's LoRA
                   layout.trained(run) / "head" / "head.safetensors")  # a probe's head alone
        adapter = next((path for path in weights if path.exists()), weights[0])
        numerics = (f"{training['compute_dtype']} on {training['device']}"
                    if training.get("compute_dtype") else None)
        rows += _rows(params, layout, run, spec.task, spec.model, {
            "numerics": numerics, "selected_on": training.get("selected_on"),
            "adapter_sha256": sha256_file(adapter)[:12] if adapter.exists() else None})
    for name, merge in params.merge.items():
        if name in failed:
            continue
        model = params.train.runs[merge.adapters[0]].model
        rows += _rows(params, layout, name, merge.evaluate_on, model,
                      dict.fromkeys(("numerics", "selected_on", "adapter_sha256")))
    for name, ensemble in params.ensemble.items():
        if name not in failed:
            rows += _rows(params, layout, name, ensemble.task, "ensemble",
                          dict.fromkeys(("numerics", "selected_on", "adapter_sha256")))
    return sorted(rows, key=lambda r: (r["task"], r["split"],
                                       kinds.get(r["kind"]).sort_key(r["score"])))


def _rows(params: Params, layout: Layout, key: str, task_name: str, model: str,
          training: dict[str, Any]) -> list[dict[str, Any]]:
    evaluation = layout.read_evaluation(key)
    task = task_from_config(task_name, params.tasks[task_name])
    manifest = json.loads((layout.prepared(task_name) / "manifest.json").read_text())
    metric = task.kind.ranking
    rows = []
    for variant, splits in evaluation["metrics"].items():
        for split, metrics in splits.items():
            ci = metrics.get(f"{metric}_ci95")
            rows.append({
                "task": task_name, "kind": task.kind.name, "run": key, "model": model,
                "variant": variant, "split": split, "rows": metrics["rows"],
                "metric": metric, "score": metrics[metric],
                "ci95_low": ci[0] if ci else None, "ci95_high": ci[1] if ci else None,
                **{c: metrics.get(c) for c in task.kind.columns}, **training,
                "single_class": bool(metrics.get("single_class")),
                "data_sha256": manifest["outputs"]["train.jsonl"][:12],
            })
    return rows


def build_report(params: Params, root: str | Path, out_dir: str | Path,
                 failed: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Write leaderboard.md, leaderboard.csv and leaderboard.json into `out_dir`.
    `failed` names runs or merges that failed upstream (name -> reason): the report says
    so instead of needing their outputs."""
    layout = Layout(Path(root))
    failed = failed or {}
    unscored = [name for name in [*params.train.runs, *params.merge, *params.ensemble]
                if name not in failed and not (layout.evaluation(name) / EVALUATION_FILE).exists()]
    if unscored:  # e.g. only a merge's comparison was predicted and evaluated
        log.warning("report: no evaluation for %s; the leaderboard leaves them out",
                    ", ".join(unscored))
    rows = leaderboard_rows(params, layout, failed | dict.fromkeys(unscored, "not evaluated"))
    submissions = {task: json.loads((layout.submission(task) / "validation.json").read_text())
                   for task in sorted(params.submit.tasks)
                   if (layout.submission(task) / "validation.json").exists()}
    mark_selection(rows, submissions)
    with atomic_dir(out_dir) as scratch:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with (scratch / "leaderboard.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        write_json(scratch / "leaderboard.json", {"rows": rows, "submissions": submissions,
                                                  "failed": failed, "not_evaluated": unscored})
        (scratch / "leaderboard.md").write_text(
            markdown(params, layout, rows, submissions, failed, unscored), encoding="utf-8")
    return rows


def costs_summary(params: Params, root: str | Path) -> str:
    """What each run cost on the machine that last ran it (`outputs/costs/`, never part of a
    DVC output): training time, speed and peak memory, prediction speed, the machine."""
    from fin_tasks import costs

    folder = Path(root) / "costs"
    lines = ["# Costs", "", "This machine's figures for the last run of each stage (not DVC "
             "outputs: they change from run to run).", "",
             "| run | train s | tokens/s | peak MiB | predict rows/s | machine |",
             "|---|---|---|---|---|---|"]
    for run in params.train.runs:
        spent = costs.read(folder / "train" / f"{run}.json")
        predicted = costs.read(folder / "predict" / f"{run}.json")
        speeds = [v["examples_per_s"] for v in predicted.values() if isinstance(v, dict)
                  and "examples_per_s" in v]
        peak = spent.get("peak_memory_bytes")
        where = spent.get("machine") or predicted.get("machine") or {}
        lines.append(f"| {run} | {_fmt(spent.get('wall_s'))} | {_fmt(spent.get('tokens_per_s'))}"
                     f" | {round(peak / 2**20) if peak else '-'} | "
                     f"{_fmt(min(speeds)) if speeds else '-'} | "
                     f"{where.get('cpu', '-')} ({', '.join(where.get('cpu_flags', []))}), "
                     f"{where.get('cores', '-')} cores, load {where.get('load_1min', '-')} |")
    return "\n".join(lines) + "\n"


def mark_selection(rows: list[dict[str, Any]], submissions: dict[str, Any]) -> None:
    """Name, on each row, what was chosen on that very row's scores (`chosen_on_these_rows`):
    the best step of a run that selects on valid, the run a submission picked on valid
    among several.
    Such a score is optimistic: it was the selection criterion as well as the result."""
    picked = {(task, report["run"], report["variant"]) for task, report in submissions.items()
              if report.get("picked_from", 1) > 1}  # a run named in params was not picked
    for row in rows:
        chosen = []
        if row["split"] == "valid" and row.get("selected_on") == "valid" and \
                row["variant"] not in ("base", "baseline"):
            chosen.append("best step")
        if row["split"] == "valid" and (row["task"], row["run"], row["variant"]) in picked:
            chosen.append("submission")
        row["chosen_on_these_rows"] = ", ".join(chosen) or None


def _option(params: Params, name: str) -> str:
    """The CLI option that selects a run, merge or ensemble."""
    return "merge" if name in params.merge else "ensemble" if name in params.ensemble else "run"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.4f}"
    return str(value)


def _merge_lines(params: Params, layout: Layout, failed: dict[str, str]) -> list[str]:
    """Each merge's check: merged vs unmerged logits, beside how much the adapters move them."""
    if not params.merge:
        return []
    lines = ["## Merges", "",
             "Rows named after a merge compare, on its task, the base alone, the base carrying "
             "each adapter (unmerged) and the merged model. The check compares merged and "
             "unmerged logits on a fixed probe batch.", ""]
    for name, merge in params.merge.items():
        if name in failed:
            continue
        check = layout.read_evaluation(name)["merge_check"]
        lines.append(f"- {name}: {merge.method} of {', '.join(merge.adapters)}: max |logit "
                     f"difference| {check['max_abs_diff']:.3g} (mean {check['mean_abs_diff']:.3g})"
                     f" over {check['probe_tokens']} probe tokens, limit "
                     f"{_fmt(check['limit'])}; the adapters move the base's logits by up to "
                     f"{check['adapter_effect_max']:.3g}")
    return lines + [""]


def _ensemble_lines(params: Params, layout: Layout, skipped: dict[str, str]) -> list[str]:
    """Each ensemble: its members and weights, and how its valid score was obtained."""
    lines = []
    for name in params.ensemble:
        if name not in skipped:
            record = layout.read_evaluation(name)
            lines.append(f"- {name}: {record['method']} of " + ", ".join(
                f"{m} ({w:.3f})" for m, w in zip(record["members"], record["weights"]))
                + f"; valid: {record['valid_scores']}")
    return ["## Ensembles", "", "Members with their weights (a stack's: its coefficients' "
            "share). A stack's valid row is out-of-fold, so its valid score is an honest "
            "estimate beside the members'.", "", *lines, ""] if lines else []


def _headline(params: Params, rows: list[dict[str, Any]]) -> list[str]:
    """One line on what the scores show: per task, the best trained model against the best
    baseline on valid, and whether their 95% intervals separate (tiny models left out)."""
    claims = []
    for task in sorted({r["task"] for r in rows}):
        valid = [r for r in rows if r["task"] == task and r["split"] == "valid"
                 and r["ci95_low"] is not None]
        baselines = [r for r in valid if r["variant"] == "baseline"]
        trained = [r for r in valid if r["variant"] not in ("base", "baseline")
                   and not (params.models.get(r["model"]) and params.models[r["model"]].tiny)]
        if not baselines or not trained:
            continue
        best, floor = trained[0], baselines[0]  # rows come best first
        apart = (best["ci95_low"] > floor["ci95_high"] or best["ci95_high"] < floor["ci95_low"])
        verdict = ("beats" if best["score"] > floor["score"] else "trails") if apart else \
            "is not told apart from"
        claims.append(f"{task} ({best['rows']} valid rows): {best['run']} {_interval(best)} "
                      f"{verdict} the best baseline, {floor['run']} {_interval(floor)}"
                      + ("" if apart else " (the intervals overlap)"))
    return [f"**What these scores show**: {'; '.join(claims)}.", ""] if claims else []


def _interval(row: dict[str, Any]) -> str:
    return f"{_fmt(row['score'])} ({_fmt(row['ci95_low'])}-{_fmt(row['ci95_high'])})"


def _tiny_note(params: Params, rows: list[dict[str, Any]]) -> list[str]:
    """Say plainly when scores come from a tiny demo model."""
    tiny = sorted({r["model"] for r in rows
                   if params.models.get(r["model"]) and params.models[r["model"]].tiny})
    if not tiny:
        return []
    return [f"Note: {', '.join(tiny)} is a tiny model built from a config with random weights "
            "and trained for minutes on the demo data. Its scores sit near chance by "
            "construction (FinEval: 0.25; claim/premise: the majority class); they show that the "
            "pipeline runs end to end, not how well the method works.", ""]


def _table(task: str, split: str, kind: str, part: list[dict[str, Any]]) -> list[str]:
    """One task's rows of one split, best first, as a Markdown table."""
    metric = part[0]["metric"]
    columns = [c for c in kinds.get(kind).columns if c != metric]
    lines = [f"## {task} ({split}, ranked by {metric})", "",
             "| # | run | variant | " + metric + " (95% CI) | " + " | ".join(columns)
             + " | numerics | data | adapter |",
             "|" + "---|" * (7 + len(columns))]
    for rank, r in enumerate(part, start=1):
        ci = f" ({_fmt(r['ci95_low'])}-{_fmt(r['ci95_high'])})" if r["ci95_low"] is not None \
            else ""
        lines.append(f"| {rank} | {r['run']}{_flags(r)} | {r['variant']} | "
                     f"{_fmt(r['score'])}{ci} | " + " | ".join(_fmt(r[c]) for c in columns)
                     + f" | {_fmt(r['numerics'])} | "
                     f"{r['data_sha256']} | {r['adapter_sha256'] or '-'} |")
    return lines + [""]


def _flags(row: dict[str, Any]) -> str:
    """What a reader must know beside a row's score: a collapsed model, an ensemble's
    out-of-fold figures, a score that was also the selection criterion."""
    flag = " (one class)" if row.get("single_class") and row["variant"] != "baseline" else ""
    if row["model"] == "ensemble" and row["split"] == "valid":
        flag += " (see Ensembles)"
    if row.get("chosen_on_these_rows"):
        flag += f" (selected on these rows: {row['chosen_on_these_rows']})"
    return flag


def markdown(params: Params, layout: Layout, rows: list[dict[str, Any]],
             submissions: dict[str, Any], failed: dict[str, str] | None = None,
             unscored: list[str] | tuple[str, ...] = ()) -> str:
    """The leaderboard as Markdown: a table per task and split, anchors, submissions."""
    lines = ["# Leaderboard", "",
             "Scores from `fin-tasks evaluate` (organizer-exact parsing and metrics); the "
             "interval is a bootstrap 95% CI of the ranking metric. Published figures are on "
             "the official test sets and are shown for reference only.", ""]
    lines += _headline(params, rows)
    for task in sorted({r["task"] for r in rows}):
        kind = next(r["kind"] for r in rows if r["task"] == task)
        for split in ("valid", "test"):
            part = [r for r in rows if r["task"] == task and r["split"] == split]
            if part:
                lines += _table(task, split, kind, part)
        anchor_key = ANCHOR_TYPES.get(params.tasks[task].type)
        if anchor_key:
            lines += [f"Published ({anchor_key}, official test set): " + "; ".join(
                f"{name} " + ", ".join(f"{k} {v}" for k, v in values.items())
                for name, values in ANCHORS[anchor_key]), ""]
    if any(r.get("chosen_on_these_rows") for r in rows):
        lines += ["(selected on these rows): that score was also the selection criterion (the "
                  "best step of the training, or the run the submission picked), so it is "
                  "optimistic. `train.defaults.selection_fraction` picks the best step on rows "
                  "carved from train instead; the test rows are never selected on.", ""]
    if any(r.get("single_class") and r["variant"] != "baseline" for r in rows):
        lines += ["(one class): every prediction of that row is the same label (or missing): "
                  "the model collapsed, and its score is what a majority-class guess gets.", ""]
    if failed:
        lines += ["## Failed", ""] + [f"- {name}: FAILED: {reason}"
                                      for name, reason in sorted(failed.items())] + [""]
    if unscored:
        lines += ["## Not evaluated", ""] + [
            f"- {name}: no `{EVALUATION_FILE}`; run `fin-tasks "
            f"{'ensemble' if name in params.ensemble else 'predict'}` and `fin-tasks evaluate` "
            f"with `--{_option(params, name)} {name}`" for name in unscored]
        lines += [""]
    skipped = (failed or {}) | dict.fromkeys(unscored, "")
    lines += (_merge_lines(params, layout, skipped) + _ensemble_lines(params, layout, skipped)
              + _tiny_note(params, rows))
    if submissions:
        lines += ["## Submissions", ""]
        for task, report in submissions.items():
            score = next((v for k, v in report.items() if k.startswith("valid_")), None)
            leak = report.get("leakage")
            lines.append(f"- {task}: {report['run']} ({report['variant']}), {report['rows']} "
                         f"rows, valid {_fmt(score)}"
                         + (f", leakage test (test - train perplexity) "
                            f"{leak['test_minus_train']}" if leak else ""))
    return "\n".join(lines) + "\n"
