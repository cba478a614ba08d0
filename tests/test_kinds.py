"""A kind of task is one object: a new kind, defined here and nowhere in fin_tasks/, runs
through prepare, a baseline, predict, evaluate and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fin_tasks import kinds
from fin_tasks.cli import main
from fin_tasks.config import parse_params
from fin_tasks.errors import ConfigError
from fin_tasks.kinds import Kind

from conftest import write_jsonl


def _exact_match(task, gold, rows, settings) -> dict:
    """Share of outputs equal to the reference, ignoring case and surrounding space."""
    hits = [g["answer"].strip().lower() == r["output"].strip().lower()
            for g, r in zip(gold, rows)]
    return {"exact_match": sum(hits) / len(hits), "rows": len(rows)}


@pytest.fixture
def ticker_kind():
    """A toy kind: name the company a sentence is about, ranked by exact match."""
    kind = kinds.register(Kind(name="ticker", ranking="exact_match", score=_exact_match,
                               prediction="text", columns=("exact_match",),
                               baselines=("lead",), generic=True, max_new_tokens=4))
    yield kind
    del kinds.KINDS["ticker"]


def test_a_kind_defined_in_a_test_runs_every_stage(ticker_kind, tmp_path: Path) -> None:
    companies = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark"]
    rows = [{"uid": f"r{i}", "sentence": f"{name} raised its outlook for {2020 + i}.",
             "company": name if i % 3 else "Other"}
            for i, name in enumerate(companies * 4)]
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", rows[:12])
    write_jsonl(data / "valid.jsonl", rows[12:18])
    write_jsonl(data / "test.jsonl", rows[18:])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "tasks": {"tickers": {
            "type": "ticker", "data": str(data),
            "splits": {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"},
            "columns": {"id": "uid", "text": "sentence", "label": "company"},
            "instruction": "Which company is this sentence about?"}},
        "models": {"first-word": {"kind": "lead", "lead_words": 1}},
        "train": {"runs": {"first-word-tickers": {"model": "first-word", "task": "tickers"}}},
    }))
    out = tmp_path / "outputs"
    for verb in ("prepare", "base", "train", "predict", "evaluate", "report"):
        assert main([verb, "--params", str(params), "--out-dir", str(out)]) == 0, verb
    manifest = json.loads((out / "prepare/tickers/manifest.json").read_text())
    assert manifest["kind"] == "ticker"
    evaluation = json.loads((out / "evaluate/first-word-tickers/evaluation.json").read_text())
    assert evaluation["ranking_metric"] == "exact_match"
    # the first word is the company in 4 of the 6 valid rows (the others say "Other")
    assert evaluation["metrics"]["baseline"]["valid"]["exact_match"] == pytest.approx(4 / 6)
    table = (out / "report/leaderboard.md").read_text()
    assert "## tickers (valid, ranked by exact_match)" in table
    assert "| 1 | first-word-tickers | baseline | 0.6667 |" in table


def test_a_baseline_that_does_not_apply_to_a_kind_is_refused(ticker_kind, tmp_path) -> None:
    from fin_tasks.baselines import fit
    from fin_tasks.tasks import task_from_config

    params = parse_params({
        "tasks": {"tickers": {"type": "ticker", "data": "x", "splits": {"train": "t"},
                              "columns": {"id": "id", "text": "text", "label": "label"},
                              "instruction": "Which company?"}},
        "models": {"majority": {"kind": "majority"}}})
    task = task_from_config("tickers", params.tasks["tickers"])
    assert task.kind is ticker_kind and task.max_new_tokens == 4
    with pytest.raises(ValueError, match="a 'majority' baseline does not apply to ticker task"):
        fit(params.models["majority"], task, [])


def test_an_unknown_task_type_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown task type 'tickr' \(built-in: finarg_ecc, "
                                          r"edtsum, fineval, corpus; generic: classification, "
                                          r"summarization\)"):
        parse_params({"tasks": {"t": {"type": "tickr", "data": "x", "splits": {"train": "t"}}}})


def test_a_kind_name_is_registered_once(ticker_kind) -> None:
    with pytest.raises(ConfigError, match="task kind 'ticker' is already registered"):
        kinds.register(Kind(name="ticker", ranking="x", score=_exact_match,
                            prediction="text", columns=()))
