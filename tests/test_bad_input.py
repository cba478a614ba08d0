"""Every bad-input case fails with one error naming the file, the line and the field,
and a failed prepare writes nothing (a previous complete output survives)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fin_tasks.cli import main
from fin_tasks.config import PrepareConfig, TaskConfig
from fin_tasks.errors import DataError
from fin_tasks.prepare import prepare_task

from conftest import finarg_record, write_jsonl

FINARG = {"type": "finarg_ecc", "splits": {"train": "train.jsonl", "test": "test.jsonl"}}


def _prepare(raw: Path, out: Path, **settings) -> dict:
    config = TaskConfig.model_validate({**FINARG, "data": str(raw)})
    return prepare_task("t1", config, PrepareConfig(**settings), out)


def _error(raw: Path, tmp_path: Path) -> str:
    with pytest.raises(DataError) as caught:
        _prepare(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "a failed prepare left an output behind"
    return str(caught.value)


def _rewrite_line(path: Path, line: int, text: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_broken_json_line(finarg_dir: Path, tmp_path: Path) -> None:
    _rewrite_line(finarg_dir / "train.jsonl", 4, '{"id": "r3", "text": "cut off')
    message = _error(finarg_dir, tmp_path)
    assert message.startswith(f"{finarg_dir / 'train.jsonl'}, line 4: broken JSON")
    assert "expected one JSON object per line" in message


def test_missing_field_in_a_jsonl_row(finarg_dir: Path, tmp_path: Path) -> None:
    record = finarg_record(6)
    del record["text"]
    _rewrite_line(finarg_dir / "train.jsonl", 7, json.dumps(record))
    assert _error(finarg_dir, tmp_path).startswith(
        f"{finarg_dir / 'train.jsonl'}, line 7, field 'text': missing field")


def _csv_error(tmp_path: Path, text: str) -> str:
    """The error of preparing one CSV file (columns ID, text, label); nothing is written."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "sentences.csv").write_text(text, encoding="utf-8")
    config = TaskConfig.model_validate({
        "type": "classification", "data": str(raw), "splits": {"train": "sentences.csv"},
        "columns": {"id": "ID", "text": "text", "label": "label"}, "labels": ["neg", "pos"],
        "instruction": "Classify."})
    with pytest.raises(DataError) as caught:
        prepare_task("s", config, PrepareConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    return str(caught.value)


def test_missing_column_in_a_csv_header(tmp_path: Path) -> None:
    assert _csv_error(tmp_path, "ID,sentence\n1,Profit rose.\n").startswith(
        f"{tmp_path / 'raw/sentences.csv'}, line 1, field 'text': missing column")


def test_a_nul_byte_in_a_csv_field_is_refused(tmp_path: Path) -> None:
    text = "ID,text,label\n1,Profit rose.,pos\n2,Costs\x00 fell.,neg\n"
    assert _csv_error(tmp_path, text).startswith(
        f"{tmp_path / 'raw/sentences.csv'}, line 3, field 'text': a NUL byte at character 6")


def test_a_number_where_the_text_belongs_is_refused(finarg_dir: Path, tmp_path: Path) -> None:
    _rewrite_line(finarg_dir / "train.jsonl", 5, json.dumps(finarg_record(4) | {"text": 12345}))
    assert _error(finarg_dir, tmp_path).startswith(
        f"{finarg_dir / 'train.jsonl'}, line 5, field 'text': a number; expected a string")


def test_unknown_label(finarg_dir: Path, tmp_path: Path) -> None:
    record = finarg_record(2) | {"answer": "opinion"}
    del record["gold"]
    _rewrite_line(finarg_dir / "train.jsonl", 3, json.dumps(record))
    message = _error(finarg_dir, tmp_path)
    assert message.startswith(f"{finarg_dir / 'train.jsonl'}, line 3, field 'answer': "
                              "unknown label 'opinion'")
    assert "expected one of premise, claim" in message


def test_gold_that_disagrees_with_the_label(finarg_dir: Path, tmp_path: Path) -> None:
    record = finarg_record(1, "claim") | {"gold": 0}
    _rewrite_line(finarg_dir / "train.jsonl", 2, json.dumps(record))
    assert _error(finarg_dir, tmp_path).startswith(
        f"{finarg_dir / 'train.jsonl'}, line 2, field 'gold': gold 0 disagrees with label 'claim'")


def test_empty_text(finarg_dir: Path, tmp_path: Path) -> None:
    _rewrite_line(finarg_dir / "train.jsonl", 9, json.dumps(finarg_record(8, "premise", "   ")))
    message = _error(finarg_dir, tmp_path)
    assert message.startswith(f"{finarg_dir / 'train.jsonl'}, line 9, field 'text': empty text")


def test_duplicate_id(finarg_dir: Path, tmp_path: Path) -> None:
    _rewrite_line(finarg_dir / "train.jsonl", 6, json.dumps(finarg_record(5) | {"id": "r1"}))
    message = _error(finarg_dir, tmp_path)
    assert message.startswith(f"{finarg_dir / 'train.jsonl'}, line 6, field 'id': "
                              "duplicate id 'r1' (first seen at line 2")


def test_empty_file(finarg_dir: Path, tmp_path: Path) -> None:
    (finarg_dir / "test.jsonl").write_text("", encoding="utf-8")
    assert _error(finarg_dir, tmp_path) == (
        f"{finarg_dir / 'test.jsonl'}, line 1: file is empty; expected at least one record")


def test_wrong_encoding(finarg_dir: Path, tmp_path: Path) -> None:
    lines = (finarg_dir / "train.jsonl").read_bytes().splitlines(keepends=True)
    text = "Umsatz stieg um 5 %, sagte der Vorstand f\u00fcr das Quartal"
    record = json.dumps(finarg_record(4, "premise", text), ensure_ascii=False)
    lines[4] = record.encode("latin-1") + b"\n"
    (finarg_dir / "train.jsonl").write_bytes(b"".join(lines))
    message = _error(finarg_dir, tmp_path)
    assert message.startswith(f"{finarg_dir / 'train.jsonl'}, line 5: not valid UTF-8 (byte 0xfc")
    assert "re-save it as UTF-8" in message


def test_csv_row_with_a_missing_field(tmp_path: Path) -> None:
    folder = tmp_path / "fineval" / "val"
    folder.mkdir(parents=True)
    (folder / "tax_val.csv").write_text(
        "id,question,A,B,C,D,answer\n0,q1,a,b,c,d,A\n1,q2,a,b,c,B\n", encoding="utf-8")
    config = TaskConfig.model_validate({"type": "fineval", "data": str(tmp_path / "fineval"),
                                        "splits": {"train": "val", "test": "val"}})
    with pytest.raises(DataError, match=r"tax_val\.csv, line 3: 6 fields in this row; "
                                        r"expected 7 comma-separated fields"):
        prepare_task("f", config, PrepareConfig(), tmp_path / "out")


def test_leakage_is_an_error_when_params_say_so(finarg_dir: Path, tmp_path: Path) -> None:
    shared = finarg_record(3)["text"]
    test = {k: v for k, v in finarg_record(200, text=shared).items() if k not in ("answer", "gold")}
    write_jsonl(finarg_dir / "test.jsonl", [test])
    with pytest.raises(DataError) as caught:
        _prepare(finarg_dir, tmp_path / "out", on_leakage="error")
    assert str(caught.value).startswith(
        f"{finarg_dir / 'train.jsonl'}, line 4, field 'text': 1 train text(s) also appear in test")


def test_failed_prepare_keeps_the_previous_output(finarg_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _prepare(finarg_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _rewrite_line(finarg_dir / "train.jsonl", 1, "not json")
    with pytest.raises(DataError):
        _prepare(finarg_dir, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_reports_the_error_and_exits_2(finarg_dir: Path, tmp_path: Path, capsys) -> None:
    _rewrite_line(finarg_dir / "train.jsonl", 2, "{")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"tasks": {"t1": {**FINARG, "data": str(finarg_dir)}}}))
    code = main(["prepare", "--params", str(params), "--out-dir", str(tmp_path / "outputs")])
    assert code == 2
    assert f"{finarg_dir / 'train.jsonl'}, line 2: broken JSON" in capsys.readouterr().err
    assert not (tmp_path / "outputs" / "prepare" / "t1").exists()


# ---------------------------------------------------------------- silent loss, now refused

SENTIMENT = {"type": "classification", "splits": {"train": "sentences.json"},
             "columns": {"id": "ID", "text": "sentence", "label": "label"},
             "labels": ["negative", "neutral", "positive"], "instruction": "Sentiment?"}


def _json_array_error(tmp_path: Path, text: str) -> str:
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    (raw / "sentences.json").write_text(text, encoding="utf-8")
    config = TaskConfig.model_validate({**SENTIMENT, "data": str(raw)})
    with pytest.raises(DataError) as caught:
        prepare_task("s", config, PrepareConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    return str(caught.value)


ROWS = [{"ID": n, "sentence": f"Profit moved {n}%.", "label": "positive"} for n in range(12)]


@pytest.mark.parametrize("damage, problem, marker", [
    (lambda t: t[: t.rindex("}") + 1] + "\n", "the array is not closed", None),
    (lambda t: t.replace("},\n  {", "}\n  {!", 1), "'{' after a record", "{!"),
    (lambda t: t + "\ngarbage\n", "text after the closing ']'", "garbage"),
], ids=["truncated", "missing comma", "trailing garbage"])
def test_a_damaged_json_array_is_refused_where_it_breaks(tmp_path, damage, problem,
                                                         marker) -> None:
    text = damage(json.dumps(ROWS, indent=2))
    line = text.count("\n") + 1 if marker is None else \
        text[: text.index(marker)].count("\n") + 1
    message = _json_array_error(tmp_path, text.replace("{!", "{"))
    assert message.startswith(f"{tmp_path / 'raw' / 'sentences.json'}, line {line}: {problem}")


def test_a_key_given_twice_is_refused_not_last_wins(finarg_dir: Path, tmp_path: Path) -> None:
    record = json.dumps(finarg_record(2))[:-1] + ', "answer": "claim"}'
    _rewrite_line(finarg_dir / "train.jsonl", 3, record)
    assert _error(finarg_dir, tmp_path).startswith(
        f"{finarg_dir / 'train.jsonl'}, line 3, field 'answer': field given twice")


def test_text_of_invisible_characters_is_empty(finarg_dir: Path, tmp_path: Path) -> None:
    _rewrite_line(finarg_dir / "train.jsonl", 5,
                  json.dumps(finarg_record(4, "premise", "\u200b\u200d \ufeff")))
    assert _error(finarg_dir, tmp_path).startswith(
        f"{finarg_dir / 'train.jsonl'}, line 5, field 'text': empty text")


def test_line_separators_inside_jsonl_strings_are_text(finarg_dir: Path, tmp_path: Path) -> None:
    text = "Revenue rose\u2028and margins\u2029widened\u0085again."
    _rewrite_line(finarg_dir / "train.jsonl", 2,
                  json.dumps(finarg_record(1, "claim", text), ensure_ascii=False))
    manifest = _prepare(finarg_dir, tmp_path / "out")
    rows = [json.loads(line) for line in
            (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8").split("\n") if line]
    rows += [json.loads(line) for line in
             (tmp_path / "out" / "valid.jsonl").read_text(encoding="utf-8").split("\n") if line]
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["valid"]["rows"] == 10
    assert text in {r["text"] for r in rows}


def test_a_csv_field_over_the_size_limit_is_located(tmp_path: Path) -> None:
    folder = tmp_path / "fineval" / "val"
    folder.mkdir(parents=True)
    huge = "x" * (200 * 1024)
    (folder / "tax_val.csv").write_text(
        f"id,question,A,B,C,D,answer\n0,q1,a,b,c,d,A\n1,\"{huge}\",a,b,c,d,B\n", encoding="utf-8")
    config = TaskConfig.model_validate({"type": "fineval", "data": str(tmp_path / "fineval"),
                                        "splits": {"train": "val", "test": "val"}})
    with pytest.raises(DataError, match=r"tax_val\.csv, line 3: unreadable CSV \(field larger"):
        prepare_task("f", config, PrepareConfig(), tmp_path / "out")


def test_an_unterminated_quote_in_a_csv_is_refused_not_swallowing_rows(tmp_path: Path) -> None:
    folder = tmp_path / "fineval" / "val"
    folder.mkdir(parents=True)
    rows = "".join(f"{i},q{i},a,b,c,d,A\n" for i in range(3, 6))
    good = f'id,question,A,B,C,D,answer\n0,"a question\nover two lines",a,b,c,d,A\n{rows}'
    config = TaskConfig.model_validate({"type": "fineval", "data": str(tmp_path / "fineval"),
                                        "splits": {"train": "val", "test": "val"}})
    (folder / "tax_val.csv").write_text(good, encoding="utf-8")  # a line break inside quotes
    assert prepare_task("f", config, PrepareConfig(valid_fraction=0.2),
                        tmp_path / "ok")["splits"]["train"]["rows"] > 0
    # the quote opened on line 3 closes on line 4: row 4 (and its label) would join row 3's text
    (folder / "tax_val.csv").write_text(
        f'id,question,A,B,C,D,answer\n0,q0,a,b,c,d,A\n1,"q1,a,b,c,d,B\n2,q2",a,b,c,d,C\n{rows}',
        encoding="utf-8")
    with pytest.raises(DataError, match=r"tax_val\.csv, line 3: a quoted field runs on over "
                                        r"line 4, which reads as a row of its own"):
        prepare_task("f", config, PrepareConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_says_interrupted_not_a_traceback(finarg_dir, tmp_path, monkeypatch,
                                                 capsys) -> None:
    import fin_tasks.prepare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fin_tasks.prepare, "prepare_task", interrupted)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"tasks": {"t1": {**FINARG, "data": str(finarg_dir)}}}))
    code = main(["prepare", "--params", str(params), "--out-dir", str(tmp_path / "outputs")])
    assert code == 130
    err = capsys.readouterr().err
    assert "fin-tasks prepare: interrupted; nothing was half-written" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("make, problem", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "has no config.json, no weights"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"),
                (d / "model.safetensors").write_bytes(b"x")), "has no tokenizer files"),
], ids=["missing", "empty", "no tokenizer"])
def test_base_checks_a_local_model_folder(tmp_path, make, problem, capsys) -> None:
    folder = tmp_path / "my-model"
    make(folder)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({
        "tasks": {"t1": {**FINARG, "data": "x"}},
        "models": {"mine": {"kind": "causal", "source": str(folder)}}}))
    code = main(["base", "--params", str(params), "--out-dir", str(tmp_path / "outputs")])
    assert code == 2 and problem in capsys.readouterr().err
    assert not (tmp_path / "outputs" / "base" / "mine").exists()


def test_an_unwritable_output_location_fails_before_any_work(finarg_dir, tmp_path,
                                                             capsys) -> None:
    (tmp_path / "outputs").write_text("a file where the output folder should be")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"tasks": {"t1": {**FINARG, "data": str(finarg_dir)}}}))
    code = main(["prepare", "--params", str(params), "--out-dir", str(tmp_path / "outputs")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot write the output t1 here" in err and "Traceback" not in err
