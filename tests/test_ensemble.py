"""The ensemble stage: members' probabilities combined, a stacker never fit on the rows it
scores, members checked, and the ensemble scored, reported and submitted like a run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from fin_tasks.artifacts import read_jsonl, sha256_file, write_json, write_jsonl
from fin_tasks.config import ConfigError, Params, parse_params
from fin_tasks.ensemble import build_ensemble, out_of_fold
from fin_tasks.errors import OutputError
from fin_tasks.evaluate import evaluate_ensemble, evaluate_predictions
from fin_tasks.layout import Layout
from fin_tasks.predictions import is_distribution
from fin_tasks.tasks import task_from_config

from conftest import make_params

TASK = "finarg_ecc"


def ensemble_params(method: str = "stack", members: list[str] | None = None) -> Params:
    raw = make_params().model_dump(mode="json")
    raw["train"]["runs"]["majority-t1"] = {"model": "majority", "task": TASK}
    raw["models"]["majority"] = {"kind": "majority"}
    raw["ensemble"] = {"t1-ens": {"task": TASK, "method": method, "folds": 3,
                                  "members": members or ["tiny-t1", "majority-t1/baseline"]}}
    raw["evaluate"] = {"bootstrap": 20, "bertscore_model": None}
    return parse_params(raw)


@pytest.fixture
def layout(workspace: Path, tmp_path: Path) -> Layout:
    """Prepared Task 1 data and two members' predictions with probabilities: `tiny-t1` (its
    adapter's, informative but noisy) and `majority-t1` (its baseline's)."""
    layout = Layout(tmp_path / "outputs")
    shutil.copytree(workspace / "prepare" / TASK, layout.prepared(TASK))
    inputs = {p.name: sha256_file(p) for p in sorted(layout.prepared(TASK).glob("*.jsonl"))}
    rng = np.random.default_rng(0)
    for run, variant in (("tiny-t1", "adapter"), ("majority-t1", "baseline")):
        for split in ("valid", "test"):
            rows = []
            for record in read_jsonl(layout.prepared(TASK) / f"{split}.jsonl"):
                p = float(np.clip(0.7 if record["gold"] == 1 else 0.3 + rng.normal(0, 0.2),
                                  0.01, 0.99)) if run == "tiny-t1" else 0.0
                label = "claim" if p > 0.5 else "premise"
                rows.append({"id": record["id"], "output": label, "label": label,
                             "probs": [round(1 - p, 6), round(p, 6)]})
            write_jsonl(layout.predictions(run) / variant / f"{split}.jsonl", rows)
        write_json(layout.predictions(run) / "predict.json", {"inputs": inputs})
    return layout


def _build(params: Params, layout: Layout) -> dict:
    config = params.ensemble["t1-ens"]
    return build_ensemble("t1-ens", config, task_from_config(TASK, params.tasks[TASK]),
                          layout.prepared(TASK), layout.root / "predict",
                          layout.ensembled("t1-ens"))


class _Recording:
    """A logistic regression that remembers the rows it was fit on and refuses to score them."""

    def __init__(self) -> None:
        from sklearn.linear_model import LogisticRegression

        self.inner, self.seen = LogisticRegression(), set()

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Recording:
        self.seen = {tuple(row) for row in x}
        self.inner.fit(x, y)
        self.classes_, self.coef_, self.intercept_ = (self.inner.classes_, self.inner.coef_,
                                                      self.inner.intercept_)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        assert not {tuple(row) for row in x} & self.seen, "scored a row it was fit on"
        return self.inner.predict_proba(x)


def test_a_stack_never_scores_a_valid_row_with_a_fit_that_saw_it(monkeypatch) -> None:
    import fin_tasks.ensemble as ensemble

    monkeypatch.setattr(ensemble, "stacker", lambda config: _Recording())
    rng = np.random.default_rng(1)
    x, gold = rng.normal(size=(30, 4)), np.array([0, 1] * 15)
    probs, folds = out_of_fold(ensemble_params().ensemble["t1-ens"], x, gold, 2)
    assert folds == 3 and np.allclose(probs.sum(1), 1)


def test_an_in_sample_stack_would_be_caught(monkeypatch) -> None:
    """The recording stacker fails a fit scored on its own rows (what the test above rules
    out), so that test can fail."""
    x, gold = np.random.default_rng(2).normal(size=(10, 4)), np.array([0, 1] * 5)
    with pytest.raises(AssertionError, match="fit on"):
        _Recording().fit(x, gold).predict_proba(x)


@pytest.mark.parametrize("method", ["mean", "stack"])
def test_an_ensemble_is_scored_reported_and_submitted_like_a_run(layout, method) -> None:
    from fin_tasks.report import build_report
    from fin_tasks.submit import submit_task

    params = ensemble_params(method)
    record = _build(params, layout)
    assert record["members"] == ["tiny-t1/adapter", "majority-t1/baseline"]
    assert len(record["weights"]) == 2 and sum(record["weights"]) == pytest.approx(1, abs=1e-5)
    assert ("out-of-fold" in record["valid_scores"]) == (method == "stack")
    for split in ("valid", "test"):
        rows = read_jsonl(layout.ensembled("t1-ens") / "ensemble" / f"{split}.jsonl")
        assert rows and all(is_distribution(r["probs"], 2) for r in rows)
    task = task_from_config(TASK, params.tasks[TASK])
    evaluation = evaluate_ensemble("t1-ens", task, params.evaluate, layout.prepared(TASK),
                                   layout.ensembled("t1-ens"), layout.evaluation("t1-ens"))
    assert evaluation["valid_scores"] == record["valid_scores"]
    for run in ("tiny-t1", "majority-t1"):
        evaluate_predictions({"run": run}, task, params.evaluate, layout.prepared(TASK),
                             layout.predictions(run), layout.evaluation(run))
    raw = params.model_dump(mode="json")
    raw["train"]["runs"] = {k: v for k, v in raw["train"]["runs"].items() if v["task"] == TASK}
    raw["submit"] = {"tasks": {TASK: {"run": "t1-ens"}}, "leakage_rows": 0}
    params = parse_params(raw)
    report = submit_task(TASK, params, layout.root, layout.submission(TASK))
    assert report["run"] == "t1-ens" and report["variant"] == "ensemble"
    bundle = layout.submission(TASK)
    assert json.loads((bundle / "model" / "ensemble.json").read_text())["members"] == \
        record["members"]
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "member `tiny-t1/adapter`: weight" in card
    for run in ("tiny-t1", "majority-t1"):  # the report reads each run's training record
        write_json(layout.trained(run) / "metrics.json", {"wall_s": 1.0})
    build_report(params, layout.root, layout.report())
    board = (layout.report() / "leaderboard.md").read_text()
    # named in params, not picked on valid: no "(selected on these rows)"
    assert re.search(r"\| t1-ens[^|]*\(see Ensembles\) \| ensemble \|", board)
    assert record["valid_scores"] in board


def test_a_member_that_predicted_other_data_is_refused(layout) -> None:
    path = layout.predictions("tiny-t1") / "predict.json"
    path.write_text(json.dumps({"inputs": {"train.jsonl": "0" * 64}}))
    with pytest.raises(OutputError, match=r"'tiny-t1/adapter' predicted other data"):
        _build(ensemble_params(), layout)


def test_a_member_without_predictions_is_refused(layout) -> None:
    shutil.rmtree(layout.predictions("majority-t1"))
    with pytest.raises(OutputError, match="predict --run majority-t1"):
        _build(ensemble_params(), layout)


def test_an_ensemble_of_runs_on_another_task_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="run 'minilm-s' is trained on task 'sentiment'"):
        ensemble_params(members=["tiny-t1", "minilm-s"])


def test_a_stack_needs_labeled_valid_rows(layout, monkeypatch) -> None:
    import fin_tasks.ensemble as ensemble

    path = layout.prepared(TASK) / "valid.jsonl"
    rows = read_jsonl(path)
    write_jsonl(path, [rows[0] | {"gold": None, "answer": None}] + rows[1:])
    # the edit above changed the data the members predicted: that check is not under test
    monkeypatch.setattr(ensemble, "check_same_data", lambda *args: None)
    with pytest.raises(OutputError, match=rf"valid.jsonl: .*row '{rows[0]['id']}' has no "
                                          "gold label"):
        _build(ensemble_params(), layout)


def test_a_member_with_broken_probabilities_is_named_with_its_row(layout) -> None:
    path = layout.predictions("tiny-t1") / "adapter" / "valid.jsonl"
    rows = read_jsonl(path)
    write_jsonl(path, [rows[0] | {"probs": [0.9, 0.3]}] + rows[1:])
    with pytest.raises(OutputError, match=rf"row '{rows[0]['id']}', field 'probs'"):
        _build(ensemble_params(), layout)
