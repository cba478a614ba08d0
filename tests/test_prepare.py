"""The prepare stage: splits, manifests, carving, leakage, every reader, real data counts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fin_tasks.artifacts import sha256_file
from fin_tasks.config import PrepareConfig, TaskConfig, load_params
from fin_tasks.errors import DataError
from fin_tasks.prepare import carve, load_split, prepare_task
from fin_tasks.readers import read_rows
from fin_tasks.tasks import finarg_ecc, has_numeric

from conftest import ROOT, SHARED_DATA, finarg_record, write_jsonl


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_task1_splits_manifest_and_record_format(finarg_dir: Path, tmp_path: Path) -> None:
    config = TaskConfig.model_validate({"type": "finarg_ecc", "data": str(finarg_dir),
                                        "splits": {"train": "train.jsonl", "test": "test.jsonl"}})
    manifest = prepare_task("t1", config, PrepareConfig(valid_fraction=0.2), tmp_path / "out")
    splits = manifest["splits"]
    assert (splits["train"]["rows"], splits["valid"]["rows"], splits["test"]["rows"]) == (8, 2, 4)
    assert splits["valid"]["labels"] == {"claim": 1, "premise": 1}  # stratified
    assert splits["test"]["labeled"] is False
    assert manifest["dropped"] == {"rows": 0, "reasons": {}}
    assert manifest["sources"][str(finarg_dir / "train.jsonl")] == sha256_file(
        finarg_dir / "train.jsonl")
    for name, digest in manifest["outputs"].items():
        assert sha256_file(tmp_path / "out" / name) == digest
    train = _read(tmp_path / "out" / "train.jsonl")
    first = train[0]
    assert set(first) == {"id", "query", "answer", "text", "choices", "gold"}
    assert first["query"] == f"{finarg_ecc('x').instruction}\nText: {first['text']}\nAnswer:"
    assert first["choices"][first["gold"]] == first["answer"]
    test = _read(tmp_path / "out" / "test.jsonl")
    assert all(r["answer"] is None and r["gold"] is None for r in test)


def test_carving_is_reproducible_and_stratified() -> None:
    frame = pd.DataFrame({"id": [str(i) for i in range(40)], "text": [f"t{i}" for i in range(40)],
                          "answer": ["a"] * 30 + ["b"] * 10, "_source": "f", "_line": 1})
    rest1, part1 = carve(frame, 0.2, seed=3, stratify=True)
    rest2, part2 = carve(frame, 0.2, seed=3, stratify=True)
    _, part3 = carve(frame, 0.2, seed=4, stratify=True)
    assert part1["id"].tolist() == part2["id"].tolist()
    assert part1["id"].tolist() != part3["id"].tolist()
    assert part1["answer"].value_counts().to_dict() == {"a": 6, "b": 2}
    assert set(rest1["id"]).isdisjoint(part1["id"]) and len(rest1) + len(part1) == 40


def _leaky(finarg_dir: Path) -> TaskConfig:
    shared = finarg_record(3)["text"]
    test = {k: v for k, v in finarg_record(200, text=shared).items() if k not in ("answer", "gold")}
    write_jsonl(finarg_dir / "test.jsonl", [test])
    return TaskConfig.model_validate({"type": "finarg_ecc", "data": str(finarg_dir),
                                      "splits": {"train": "train.jsonl", "test": "test.jsonl"}})


def test_leakage_warns_and_is_reported(finarg_dir: Path, tmp_path: Path, caplog) -> None:
    manifest = prepare_task("t1", _leaky(finarg_dir), PrepareConfig(), tmp_path / "out")
    assert manifest["leakage"]["train_test"] == {"rows": 1, "train_ids": ["r3"]}
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["valid"]["rows"] == 10
    assert "also appear in test" in caplog.text


def test_leakage_drop_removes_it_from_train(finarg_dir: Path, tmp_path: Path) -> None:
    manifest = prepare_task("t1", _leaky(finarg_dir), PrepareConfig(on_leakage="drop"),
                            tmp_path / "out")
    assert manifest["dropped"] == {"rows": 1, "reasons": {"text also in test": 1}}
    kept = _read(tmp_path / "out" / "train.jsonl") + _read(tmp_path / "out" / "valid.jsonl")
    assert "r3" not in {r["id"] for r in kept} and len(kept) == 9


def test_fineval_subject_ids_and_numeric_flag(tmp_path: Path) -> None:
    folder = tmp_path / "fineval" / "val"
    folder.mkdir(parents=True)
    (folder / "tax_law_val.csv").write_text(
        "\ufeffid,question,A,B,C,D,answer\n"
        '0,"税率为13%时，应纳税额为____元。",10,20,30,40,B \n'
        "1,下列属于直接税的是____。,增值税,消费税,个人所得税,关税,C\n", encoding="utf-8")
    config = TaskConfig.model_validate({"type": "fineval", "data": str(tmp_path / "fineval"),
                                        "splits": {"train": "val", "valid": "val", "test": "val"}})
    prepare_task("fineval", config, PrepareConfig(), tmp_path / "out")
    rows = _read(tmp_path / "out" / "test.jsonl")
    assert [r["id"] for r in rows] == ["tax_law-0", "tax_law-1"]
    assert [r["answer"] for r in rows] == ["B", "C"]  # trailing space stripped
    assert [r["gold"] for r in rows] == [1, 2]
    assert [r["numeric"] for r in rows] == [True, False]
    assert rows[1]["subject"] == "tax_law"
    assert rows[1]["query"].endswith(
        "下列属于直接税的是____。\nA. 增值税\nB. 消费税\nC. 个人所得税\nD. 关税\n答案：")


def test_has_numeric() -> None:
    assert has_numeric("利率为５％") and has_numeric("question", "100元")
    assert not has_numeric("下列说法正确的是", "增值税", "消费税")


def test_generic_classification_from_parquet_with_label_names(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    pd.DataFrame({"uid": ["a", "b", "c", "d"], "body": ["up", "down", "flat", "up again"],
                  "y": [2, 0, 1, 2]}).to_parquet(raw / "rows.parquet")
    config = TaskConfig.model_validate({
        "type": "classification", "data": str(raw),
        "splits": {"train": "rows.parquet", "valid": "rows.parquet", "test": "rows.parquet"},
        "columns": {"id": "uid", "text": "body", "label": "y"},
        "labels": ["negative", "neutral", "positive"],
        "label_names": {"0": "negative", "1": "neutral", "2": "positive"},
        "instruction": "Classify the sentiment."})
    manifest = prepare_task("s", config, PrepareConfig(), tmp_path / "out")
    assert manifest["splits"]["test"]["labels"] == {"negative": 1, "neutral": 1, "positive": 2}
    first = _read(tmp_path / "out" / "test.jsonl")[0]
    assert first["query"] == "Classify the sentiment.\nText: up\nAnswer:"
    assert (first["answer"], first["gold"]) == ("positive", 2)


def test_parquet_rows_are_located_by_row_number(tmp_path: Path) -> None:
    pd.DataFrame({"id": ["a", "b"], "text": ["fine", " "], "answer": ["claim", "claim"]}
                 ).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet, row 2, field 'text': empty text"):
        load_split(finarg_ecc("t"), str(tmp_path / "t.parquet"))


def test_json_array_rows_keep_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('[\n  {"ID": 1, "s": "x"},\n\n  {"ID": 2,\n   "s": "y"}\n]\n', encoding="utf-8")
    rows = read_rows(str(path), ["ID", "s"])
    assert [(r.line, r.fields["ID"]) for r in rows] == [(2, 1), (4, 2)]


def test_hub_dataset_goes_through_datasets_load_dataset(monkeypatch, tmp_path: Path) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name, split, revision):
        calls.append((name, split, revision))
        return datasets.Dataset.from_list(
            [{"id": f"e{i}", "text": f"Article {i}.", "answer": f"Headline {i}"} for i in range(6)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = TaskConfig.model_validate({"type": "edtsum", "data": "hub:TheFinAI/flare-edtsum",
                                        "revision": "abc123", "splits": {"train": "train"}})
    manifest = prepare_task("edtsum", config, PrepareConfig(), tmp_path / "out")
    assert calls == [("TheFinAI/flare-edtsum", "train", "abc123")]
    assert sum(s["rows"] for s in manifest["splits"].values()) == 6
    assert manifest["sources"] == {"hub:TheFinAI/flare-edtsum": "revision abc123"}


def test_default_params_prepare_every_demo_task(tmp_path: Path) -> None:
    from fin_tasks.corpus import build_corpus
    from fin_tasks.questions import build_questions

    params = load_params(ROOT / "params.yaml")
    outputs = tmp_path / "outputs"  # tasks built by the corpus and questions stages
    for name, corpus in params.corpus.items():
        build_corpus(name, corpus.model_copy(update={"data": str(ROOT / corpus.data)}),
                     outputs / "corpus" / name)
    for name, questions in params.questions.items():
        build_questions(name, questions, outputs / "corpus" / questions.corpus,
                        outputs / "questions" / name)
    for name, config in params.tasks.items():
        root = tmp_path if config.data.startswith("outputs/") else ROOT
        config = config.model_copy(update={"data": str(root / config.data)})
        manifest = prepare_task(name, config, params.prepare, tmp_path / name)
        assert all(info["rows"] > 0 for info in manifest["splits"].values()), name


needs_shared = pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")


@needs_shared
def test_real_task1_counts_match_the_files(tmp_path: Path) -> None:
    config = TaskConfig.model_validate({
        "type": "finarg_ecc", "data": str(SHARED_DATA / "finarg_ecc"),
        "splits": {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}})
    manifest = prepare_task("finarg_ecc", config, PrepareConfig(), tmp_path / "out")
    splits = manifest["splits"]
    assert splits["train"]["rows"] == 7753
    assert splits["train"]["labels"] == {"claim": 3691, "premise": 4062}
    assert splits["valid"]["rows"] == 969 and splits["test"]["rows"] == 969
    assert manifest["dropped"]["rows"] == 0


@needs_shared
def test_real_fineval_val_counts(tmp_path: Path) -> None:
    config = TaskConfig.model_validate({"type": "fineval", "data": str(SHARED_DATA / "fineval"),
                                        "splits": {"train": "dev", "test": "val"}})
    manifest = prepare_task("fineval", config, PrepareConfig(), tmp_path / "out")
    assert manifest["splits"]["test"]["rows"] == 3340
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["valid"]["rows"] == 170
    assert len({r["subject"] for r in _read(tmp_path / "out" / "test.jsonl")}) == 34


@needs_shared
def test_real_financial_phrasebank_reads_unchanged_through_the_generic_task(tmp_path: Path) -> None:
    params = load_params(ROOT / "configs" / "shared-data.yaml")
    config = params.tasks["fpb"].model_copy(update={"data": str(SHARED_DATA / "fpb")})
    manifest = prepare_task("fpb", config, params.prepare, tmp_path / "out")
    totals: dict[str, int] = {}
    for split in manifest["splits"].values():
        for label, count in split["labels"].items():
            totals[label] = totals.get(label, 0) + count
    kept = sum(totals.values()) + manifest["dropped"]["rows"]
    assert kept == 2264 and totals == {"negative": 303, "neutral": 1391, "positive": 570}


def test_a_sample_is_a_seeded_stratified_subset_recorded_in_the_manifest(
        finarg_dir: Path, tmp_path: Path) -> None:
    labels = ["premise"] * 30 + ["claim"] * 10
    write_jsonl(finarg_dir / "big.jsonl", [finarg_record(n, label)
                                           for n, label in enumerate(labels)])
    raw = {"type": "finarg_ecc", "data": str(finarg_dir),
           "splits": {"train": "big.jsonl", "valid": "train.jsonl", "test": "test.jsonl"}}
    full = prepare_task("t1", TaskConfig.model_validate(raw), PrepareConfig(), tmp_path / "full")
    config = TaskConfig.model_validate(raw | {"sample": {"train": 8, "valid": 4}})
    manifest = prepare_task("t1", config, PrepareConfig(seed=5), tmp_path / "a")
    again = prepare_task("t1", config, PrepareConfig(seed=5), tmp_path / "b")
    assert manifest["splits"]["train"]["labels"] == {"claim": 2, "premise": 6}  # 30:10 kept
    assert manifest["splits"]["valid"]["labels"] == {"claim": 2, "premise": 2}
    assert manifest["splits"]["test"]["rows"] == full["splits"]["test"]["rows"] == 4
    assert "seeded subset of 8 of 40 rows" in manifest["splits"]["train"]["origin"]
    assert manifest["outputs"] == again["outputs"]
    ids = [r["id"] for r in _read(tmp_path / "a" / "train.jsonl")]
    assert set(ids) <= {r["id"] for r in _read(tmp_path / "full" / "train.jsonl")}
    with pytest.raises(ValueError, match="positive row count"):
        TaskConfig.model_validate(raw | {"sample": {"train": 0}})


def test_a_killed_stage_leaves_nothing_a_later_run_keeps_and_outputs_are_readable(
        tmp_path: Path) -> None:
    import os
    import stat

    from fin_tasks.artifacts import atomic_dir

    final = tmp_path / "out"
    dead = tmp_path / ".out.tmp-999999999-abc"  # a scratch of a process that no longer runs
    live = tmp_path / f".out.tmp-{os.getpid()}-xyz"  # a concurrent run's: not touched
    for folder in (dead, live):
        folder.mkdir()
    with atomic_dir(final) as scratch:
        (scratch / "weights.bin").write_bytes(b"w")
        (scratch / "weights.bin").chmod(0o600)  # as some writers create them
    assert not dead.exists() and live.exists()
    umask = os.umask(0o022)
    try:
        with atomic_dir(final) as scratch:
            (scratch / "weights.bin").write_bytes(b"w")
            (scratch / "weights.bin").chmod(0o600)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert stat.S_IMODE((final / "weights.bin").stat().st_mode) == 0o644


@pytest.mark.parametrize("layout", ["one-line array", "pretty array", "jsonl"])
def test_data_without_an_id_column_runs_by_params_alone(tmp_path: Path, layout: str) -> None:
    """FiQA-style rows (instruction, input, output: no id) need no rewriting of the files:
    ids are row positions in the split, the same whatever the file's layout."""
    raw = tmp_path / "fiqa"
    labels = ["negative", "neutral", "positive"]
    rows = [{"instruction": "Sentiment?", "input": f"Shares moved {n}% today.",
             "output": labels[n % 3]} for n in range(30)]
    raw.mkdir()
    if layout == "jsonl":
        write_jsonl(raw / "train.jsonl", rows)
    else:
        (raw / "train.json").write_text(json.dumps(rows, indent=2 if layout == "pretty array"
                                                   else None), encoding="utf-8")
    config = TaskConfig.model_validate({
        "type": "classification", "data": str(raw),
        "splits": {"train": "train.jsonl" if layout == "jsonl" else "train.json"},
        "columns": {"id": None, "text": "input", "label": "output"}, "labels": labels,
        "instruction": "What is the sentiment?"})
    prepare_task("fiqa", config, PrepareConfig(), tmp_path / "a")
    again = prepare_task("fiqa", config, PrepareConfig(), tmp_path / "b")
    records = [r for split in ("train", "valid", "test")
               for r in _read(tmp_path / "a" / f"{split}.jsonl")]
    assert sorted(r["id"] for r in records) == sorted(f"train-{n}" for n in range(1, 31))
    assert {r["id"]: r["text"] for r in records}["train-7"] == "Shares moved 6% today."
    assert again["outputs"] == prepare_task("fiqa", config, PrepareConfig(),
                                            tmp_path / "c")["outputs"]
