"""Submission bundles: the validator refuses bad bundles; a good one round-trips."""

from __future__ import annotations

import csv
import json

import pytest

from fin_tasks.metrics import MISSING
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
