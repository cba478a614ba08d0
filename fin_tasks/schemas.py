"""pandera schemas at the boundaries: raw rows in, prepared records out.

A schema failure becomes one DataError naming the source file, line and raw field.
"""

from __future__ import annotations

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaError, SchemaErrors

from fin_tasks.errors import DataError
from fin_tasks.tasks import Task

# Characters that show nothing: a text made only of them (and spaces) is empty.
_INVISIBLE = "[\u200b\u200c\u200d\u2060\ufeff\u00ad]"


def _non_empty(error: str) -> pa.Check:
    return pa.Check(lambda s: s.astype(str).str.replace(_INVISIBLE, "", regex=True)
                    .str.strip().str.len() > 0, element_wise=False, error=error)


def rows_schema(task: Task, labeled: bool) -> pa.DataFrameSchema:
    """Schema of canonical rows (id, text, answer, options) read from one split."""
    columns = {
        "id": pa.Column(str, _non_empty("empty id"), unique=True),
        "text": pa.Column(str, _non_empty("empty text")),
    }
    if labeled and task.labels:
        columns["answer"] = pa.Column(str, pa.Check.isin(task.labels, error="unknown label"))
    elif labeled:
        columns["answer"] = pa.Column(str, _non_empty("empty reference text"))
    if task.option_fields:
        columns["options"] = pa.Column(
            object, pa.Check(lambda opts: all(str(o).strip() for o in opts), element_wise=True,
                             error="empty option"))
    return pa.DataFrameSchema(columns, strict=False, coerce=False)


def records_schema(task: Task, labeled: bool) -> pa.DataFrameSchema:
    """Schema of prepared records in the organizers' layout (the `prepare` stage's output)."""
    columns = {
        "id": pa.Column(str, unique=True),
        "query": pa.Column(str, _non_empty("empty query")),
        "text": pa.Column(str, _non_empty("empty text")),
        "answer": pa.Column(str, nullable=not labeled),
    }
    if task.labels:
        columns["choices"] = pa.Column(object)
        columns["gold"] = pa.Column(
            "Int64", pa.Check.isin(range(len(task.labels))), nullable=not labeled)
    return pa.DataFrameSchema(columns, strict=False)


EXPECTED = {
    "empty id": "a non-empty id",
    "empty text": "non-empty text",
    "empty reference text": "a non-empty reference text",
    "empty option": "four non-empty options",
}


def validate_rows(frame: pd.DataFrame, task: Task, labeled: bool) -> pd.DataFrame:
    """Validate canonical rows; the first failure is raised as a located DataError."""
    try:
        return rows_schema(task, labeled).validate(frame, lazy=True)
    except (SchemaErrors, SchemaError) as errors:
        raise _located(errors, frame, task) from None


def _located(errors: SchemaErrors | SchemaError, frame: pd.DataFrame, task: Task) -> DataError:
    cases = errors.failure_cases.dropna(subset=["index"]).sort_values("index", kind="stable")
    case = cases.iloc[0]
    row = frame.loc[case["index"]]
    raw_field = {"id": task.id_field, "text": task.text_field,
                 "answer": task.label_field}.get(case["column"], case["column"])
    check = str(case["check"])
    if "unique" in check:
        again = frame[frame["id"].duplicated()].iloc[0]
        first = frame[frame["id"] == again["id"]].iloc[0]
        return DataError(again["_source"], int(again["_line"]), raw_field,
                         f"duplicate id '{again['id']}' (first seen at {first['_unit']} "
                         f"{first['_line']} of {first['_source']})",
                         "ids unique within a split", unit=again["_unit"])
    if "isin" in check or check == "unknown label":
        return DataError(row["_source"], int(row["_line"]), raw_field,
                         f"unknown label '{row['answer']}'",
                         f"one of {', '.join(task.labels)}", unit=row["_unit"])
    return DataError(row["_source"], int(row["_line"]), raw_field, check,
                     EXPECTED.get(check), unit=row["_unit"])
