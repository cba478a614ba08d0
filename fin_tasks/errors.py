"""Errors raised at the library's boundaries: bad input data and bad params."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class DataError(ValueError):
    """A raw input row that cannot be used, located by file, line (or row) and field."""

    path: str | Path
    line: int | None
    field: str | None
    problem: str
    expected: str | None = None
    unit: str = "line"
    """How `line` counts: "line" for text files, "row" for parquet or hub datasets."""

    def __str__(self) -> str:
        where = str(self.path)
        if self.line is not None:
            where += f", {self.unit} {self.line}"
        if self.field is not None:
            where += f", field '{self.field}'"
        message = f"{where}: {self.problem}"
        if self.expected:
            message += f"; expected {self.expected}"
        return message


class ConfigError(ValueError):
    """A params file that does not match the typed configuration."""


class ModelError(RuntimeError):
    """A model that cannot be loaded as configured, with what to do about it."""


class OutputError(RuntimeError):
    """An output location the stage cannot write to, found before any work is done."""
