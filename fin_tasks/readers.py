"""Readers for raw rows: local JSONL, JSON array, CSV, parquet, or a hub dataset.

Every row keeps where it came from (file and line, or row for parquet/hub) so that
a later check can name the exact place of a bad value.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fin_tasks.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
HUB_PREFIX = "hub:"


@dataclass(frozen=True)
class RawRow:
    """One raw record and where it came from."""

    source: str
    line: int
    fields: dict[str, Any]
    unit: str = "line"


def split_location(data: str, split: str) -> str:
    """Where a split lives: `data/split` locally, or `hub:<id>` plus a split name."""
    return f"{data}#{split}" if data.startswith(HUB_PREFIX) else str(Path(data) / split)


def read_rows(location: str, required: Sequence[str] = (), revision: str | None = None,
              ) -> list[RawRow]:
    """Read every row of a file, a folder of files, or a hub split (`hub:<id>#<split>`)."""
    if location.startswith(HUB_PREFIX):
        dataset_id, _, split = location[len(HUB_PREFIX):].partition("#")
        return read_hub(dataset_id, split or "train", required, revision)
    path = Path(location)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise DataError(path, None, None, "folder holds no data files",
                            f"files ending in {', '.join(SUFFIXES)}")
        return [row for file in files for row in read_file(file, required)]
    return read_file(path, required)


def read_file(path: Path, required: Sequence[str] = ()) -> list[RawRow]:
    """Read one local file, chosen by its suffix."""
    if not path.exists():
        raise DataError(path, None, None, "file not found", "an existing file or folder")
    readers = {".jsonl": _read_jsonl, ".json": _read_json_array, ".csv": _read_csv,
               ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise DataError(path, None, None, f"unsupported file type '{path.suffix}'",
                        f"one of {', '.join(SUFFIXES)}")
    rows = readers[path.suffix](path, required)
    if not rows:
        raise DataError(path, 1, None, "file is empty", "at least one record")
    return rows


def read_text(path: Path) -> str:
    """File text as UTF-8 (a leading byte-order mark is accepted)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(path, line, None,
                        f"not valid UTF-8 (byte 0x{data[error.start]:02x} at column {column})",
                        "a UTF-8 encoded file (re-save it as UTF-8)") from None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's fields, refusing a key given twice (json keeps the last silently)."""
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _read_jsonl(path: Path, required: Sequence[str]) -> list[RawRow]:
    rows = []
    # JSON lines end at "\n" only: U+2028, U+2029 and U+0085 may stand raw inside strings
    # (json.dumps(..., ensure_ascii=False) writes them so), where str.splitlines would cut.
    for number, text in enumerate(read_text(path).split("\n"), start=1):
        if not text.strip():
            continue
        try:
            record = _DECODER.decode(text.removesuffix("\r"))
        except json.JSONDecodeError as error:
            raise DataError(path, number, None, f"broken JSON ({error.msg}, column {error.colno})",
                            "one JSON object per line") from None
        except _DuplicateKey as duplicate:
            raise DataError(path, number, duplicate.key, "field given twice in one record",
                            "each field once per JSON object") from None
        rows.append(_checked(path, number, record, required))
    return rows


def _read_json_array(path: Path, required: Sequence[str]) -> list[RawRow]:
    text = read_text(path)
    position = _skip_space(text, 0)
    if not text.strip():
        return []
    if text[position] != "[":
        raise DataError(path, 1, None, "not a JSON array", "a JSON array of objects")
    rows = []
    position = _skip_space(text, position + 1)
    while position < len(text) and text[position] != "]":
        line = text.count("\n", 0, position) + 1
        try:
            record, position = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(path, error.lineno, None, f"broken JSON ({error.msg})",
                            "a JSON array of objects") from None
        except _DuplicateKey as duplicate:
            raise DataError(path, line, duplicate.key, "field given twice in one record",
                            "each field once per JSON object") from None
        rows.append(_checked(path, line, record, required))
        position = _skip_space(text, position)
        if position < len(text) and text[position] == ",":
            position = _skip_space(text, position + 1)
        elif position < len(text) and text[position] != "]":
            raise DataError(path, text.count("\n", 0, position) + 1, None,
                            f"'{text[position]}' after a record",
                            "',' between records and ']' after the last") from None
    if position >= len(text):
        raise DataError(path, text.count("\n") + 1, None,
                        "the array is not closed (the file may be truncated)",
                        "a JSON array ending in ']'")
    end = _skip_space(text, position + 1)
    if end < len(text):
        raise DataError(path, text.count("\n", 0, end) + 1, None,
                        "text after the closing ']'", "one JSON array and nothing after it")
    return rows


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _checked(path: Path, line: int, record: Any, required: Sequence[str]) -> RawRow:
    """A JSON record as a row, after checking it is an object with the required fields."""
    if not isinstance(record, dict):
        raise DataError(path, line, None, f"a JSON {type(record).__name__}, not an object",
                        "a JSON object per record")
    for name in required:
        if name not in record:
            raise DataError(path, line, name, "missing field",
                            f"a record with fields {', '.join(required)}")
    return RawRow(str(path), line, record)


def _read_csv(path: Path, required: Sequence[str]) -> list[RawRow]:
    text = read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return _csv_rows(path, reader, required, re.split(r"\r\n|\n|\r", text))
    except csv.Error as error:  # e.g. a field over csv.field_size_limit() (128 KiB)
        raise DataError(path, max(reader.line_num, 1), None, f"unreadable CSV ({error})",
                        "comma-separated fields, none over "
                        f"{csv.field_size_limit() // 1024} KiB") from None


def _csv_rows(path: Path, reader: Any, required: Sequence[str],
              lines: Sequence[str]) -> list[RawRow]:
    header = next(reader, None)
    if header is None:
        return []
    for name in required:
        if name not in header:
            raise DataError(path, 1, name, "missing column",
                            f"a header with columns {', '.join(required)}")
    rows, start = [], reader.line_num + 1
    for values in reader:
        if values and len(values) != len(header):
            raise DataError(path, start, None, f"{len(values)} fields in this row",
                            f"{len(header)} comma-separated fields, as in the header")
        if values:
            _check_unterminated_quote(path, start, lines[start:reader.line_num], len(header))
            rows.append(RawRow(str(path), start, dict(zip(header, values))))
        start = reader.line_num + 1
    return rows


def _check_unterminated_quote(path: Path, start: int, continued: Sequence[str],
                              fields: int) -> None:
    """A quoted field may hold line breaks, but not a line that is a whole row by itself: that
    is an unterminated quote swallowing the rows after it (and taking their last label)."""
    for offset, line in enumerate(continued, start=1):
        if len(next(csv.reader([line]), [])) == fields:
            raise DataError(path, start, None,
                            f"a quoted field runs on over line {start + offset}, which reads "
                            f"as a row of its own: an unterminated quote?",
                            "a closing quote at the end of the field on its own line")


def _read_parquet(path: Path, required: Sequence[str]) -> list[RawRow]:
    import pandas as pd

    frame = pd.read_parquet(path)
    _check_columns(path, list(frame.columns), required)
    return [RawRow(str(path), number, record, unit="row")
            for number, record in enumerate(frame.to_dict("records"), start=1)]


def read_hub(dataset_id: str, split: str, required: Sequence[str] = (),
             revision: str | None = None) -> list[RawRow]:
    """Rows of a Hugging Face hub dataset split, pinned to `revision` when given."""
    import datasets

    log.info("loading hub dataset %s split %s (revision %s)", dataset_id, split, revision)
    dataset = datasets.load_dataset(dataset_id, split=split, revision=revision)
    source = f"hub:{dataset_id}#{split}"
    _check_columns(source, list(dataset.column_names), required)
    rows = [RawRow(source, number, dict(record), unit="row")
            for number, record in enumerate(dataset, start=1)]
    if not rows:
        raise DataError(source, None, None, "dataset split is empty", "at least one record")
    return rows


def _check_columns(source: str | Path, columns: list[str], required: Sequence[str]) -> None:
    for name in required:
        if name not in columns:
            raise DataError(source, None, name, "missing column",
                            f"columns {', '.join(required)}; found {', '.join(columns)}")
