"""Submission bundles: the validator refuses bad bundles; a good one round-trips."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from fin_tasks.metrics import MISSING
from fin_tasks.runs import resolve_run
from fin_tasks.submit import SubmissionError, validate_bundle
from fin_tasks.tasks import edtsum, finarg_ecc

TEST = [{"id": f"t{i}"} for i in range(4)]


def _rows(labels):
    return [{"id": f"t{i}", "output": label, "label": label} for i, label in enumerate(labels)]


def test_a_valid_bundle_passes_and_counts_unparsed_outputs() -> None:
    report = validate_bundle(finarg_ecc("t"), TEST, _rows(["claim", "premise", MISSING, "claim"]))
    assert report["ok"] and report["rows"] == 4 and report["unparsed_outputs"] == 1


@pytest.mark.parametrize("rows, message", [
    (_rows(["claim"] * 3), "3 rows, but the test set has 4"),
    (_rows(["claim"] * 3) + [{"id": "t0", "output": "x", "label": "claim"}], "duplicate ids: t0"),
    (_rows(["claim"] * 3) + [{"id": "zz", "output": "x", "label": "claim"}],
     "ids not in the test set: zz"),
    (_rows(["claim", "claim", "opinion", "claim"]), "labels outside ['premise', 'claim']: opinion"),
])
def test_the_validator_refuses_bad_classification_bundles(rows, message) -> None:
    with pytest.raises(SubmissionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_bundle(finarg_ecc("t"), TEST, rows)


def test_the_validator_refuses_empty_summaries() -> None:
    rows = [{"id": f"t{i}", "output": " " if i == 2 else "A headline", "label": None}
            for i in range(4)]
    with pytest.raises(SubmissionError, match="1 empty summaries \\(first: t2\\)"):
        validate_bundle(edtsum("e"), TEST, rows)


def test_missing_test_ids_are_named() -> None:
    rows = _rows(["claim"] * 4)
    rows[3]["id"] = "t9"
    with pytest.raises(SubmissionError, match="test ids without a prediction: t3"):
        validate_bundle(finarg_ecc("t"), TEST, rows)


def test_a_written_bundle_round_trips_through_the_validator(tmp_path) -> None:
    from fin_tasks.submit import _write_predictions

    rows = _rows(["claim", "premise", "premise", MISSING])
    _write_predictions(tmp_path / "predictions.csv", rows, finarg_ecc("t"))
    with (tmp_path / "predictions.csv").open(encoding="utf-8") as handle:
        back = list(csv.DictReader(handle))
    assert [r["id"] for r in back] == [t["id"] for t in TEST]
    assert validate_bundle(finarg_ecc("t"), TEST, back)["ok"]
    assert json.loads(json.dumps(back)) == back


@pytest.fixture
def scored_baseline(workspace, tmp_path):
    """A majority baseline trained, predicted and evaluated on the demo Task 1 data."""
    from fin_tasks.config import parse_params
    from fin_tasks.evaluate import evaluate_run
    from fin_tasks.predict import predict_run
    from fin_tasks.train import train

    from conftest import make_params

    raw = make_params().model_dump(mode="json")
    raw["models"]["majority"] = {"kind": "majority"}
    raw["train"]["runs"] = {"maj": {"model": "majority", "task": "finarg_ecc"}}
    raw["submit"] = {"tasks": {"finarg_ecc": {"include_baselines": True}}}
    raw["evaluate"] = {"bootstrap": 0, "bertscore_model": None}
    params = parse_params(raw)
    root = tmp_path / "outputs"
    shutil.copytree(workspace / "prepare", root / "prepare")
    prepared = root / "prepare/finarg_ecc"
    train(resolve_run(params, "maj"), prepared, root / "base/majority", root / "train/maj")
    predict_run(resolve_run(params, "maj"), prepared, root / "base/majority", root / "train/maj",
                root / "predict/maj")
    evaluate_run(resolve_run(params, "maj"), prepared, root / "predict/maj", root / "evaluate/maj")
    return params, root


def test_a_duplicate_conflicting_id_is_refused_by_name(scored_baseline) -> None:
    from fin_tasks.artifacts import read_jsonl, write_jsonl
    from fin_tasks.evaluate import evaluate_run
    from fin_tasks.submit import submit_task

    params, root = scored_baseline
    path = root / "predict/maj/baseline/test.jsonl"
    rows = read_jsonl(path)
    first = rows[0]
    other = "claim" if first["label"] == "premise" else "premise"
    write_jsonl(path, rows + [first | {"label": other, "output": other}])
    with pytest.raises(SubmissionError, match="is not the file `evaluate` scored"):
        submit_task("finarg_ecc", params, root, root / "submit/finarg_ecc")  # not re-scored
    evaluate_run(resolve_run(params, "maj"), root / "prepare/finarg_ecc", root / "predict/maj",
                 root / "evaluate/maj")
    with pytest.raises(SubmissionError, match=rf"duplicate ids: {first['id']} \(predicted "):
        submit_task("finarg_ecc", params, root, root / "submit/finarg_ecc")
    assert not (root / "submit").exists()


def test_the_leakage_test_is_test_minus_train_perplexity(workspace) -> None:
    """Each text scored as continual pre-training scores it: every token after the first,
    the end-of-text token included, exp of the mean loss."""
    import math

    import torch

    from conftest import make_params
    from fin_tasks.models import load_base, load_tokenizer, read_base_ref
    from fin_tasks.submit import leakage_test

    ref = read_base_ref(workspace / "base/tiny")
    model = load_base(make_params({"quantization": None}).models["tiny"], ref).eval()
    tokenizer = load_tokenizer(ref)
    train = [{"text": "Revenue rose 12% in the quarter."}, {"text": "Margins improve."},
             {"text": "Not read: beyond the rows asked for."}]
    test = [{"text": "Costs fell sharply."}]

    def by_hand(texts: list[str]) -> float:
        total, count = 0.0, 0
        for text in texts:
            ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]),
                                                             reduction="sum"))
            count += len(ids) - 1
        return math.exp(total / count)

    result = leakage_test(model, tokenizer, train, test, rows=2)
    train_ppl, test_ppl = by_hand([r["text"] for r in train[:2]]), by_hand([test[0]["text"]])
    assert result["rows"] == 1
    assert result["train_perplexity"] == pytest.approx(train_ppl, rel=1e-4)
    assert result["test_minus_train"] == pytest.approx(test_ppl - train_ppl, rel=1e-3, abs=1e-3)
