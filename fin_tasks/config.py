"""Typed, frozen, strict configuration loaded from params.yaml: one section per stage.

An unknown or misspelled key is an error that names it and lists the allowed keys.
Paths in params are relative to the folder the command runs in (the project root).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fin_tasks.errors import ConfigError

TaskType = Literal["finarg_ecc", "edtsum", "fineval", "classification", "summarization"]
GENERIC_TYPES = ("classification", "summarization")


class Strict(BaseModel):
    """Base of every config object: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Columns(Strict):
    """Where a generic task finds its fields in the raw rows."""

    id: str = "id"
    """Column holding a unique row id."""
    text: str = "text"
    """Column holding the input text."""
    label: str | None = "label"
    """Column holding the label (classification) or reference summary (summarization)."""


class Splits(Strict):
    """The raw files of a task, relative to its `data` path (or split names on the hub)."""

    train: str
    """Training rows (required)."""
    valid: str | None = None
    """Validation rows; carved from train (seeded, stratified) when absent."""
    test: str | None = None
    """Test rows, labeled or not; carved from train when absent."""


class TaskConfig(Strict):
    """One task: a built-in description, or a generic one defined entirely here."""

    type: TaskType
    """Built-in description (finarg_ecc, edtsum, fineval) or generic (classification, summarization)."""
    data: str
    """Folder or file holding the raw splits (a DVC dependency), or `hub:<dataset id>`."""
    splits: Splits
    """Which files (or hub split names) hold train, valid and test."""
    revision: str | None = None
    """Hub dataset revision (commit or tag); only with a `hub:` data source."""
    columns: Columns | None = None
    """Raw column names; generic tasks only (built-ins know their own)."""
    labels: tuple[str, ...] | None = None
    """Label set in choice order; generic classification only."""
    label_names: dict[str, str] | None = None
    """Maps raw label values (e.g. "0") to label names; generic classification only."""
    instruction: str | None = None
    """Prompt instruction; required for generic tasks, overrides a built-in's default."""

    @model_validator(mode="after")
    def _generic_fields(self) -> TaskConfig:
        generic = self.type in GENERIC_TYPES
        if generic and (self.columns is None or self.instruction is None):
            raise ValueError(f"a '{self.type}' task needs 'columns' and 'instruction'")
        if self.type == "classification" and not self.labels:
            raise ValueError("a 'classification' task needs 'labels' (the label set, in order)")
        if not generic and (self.columns or self.labels or self.label_names):
            raise ValueError(f"built-in task type '{self.type}' takes no columns/labels/label_names")
        if self.revision and not self.data.startswith("hub:"):
            raise ValueError("'revision' applies only to a 'hub:<dataset id>' data source")
        return self


class PrepareConfig(Strict):
    """The `prepare` stage: raw rows in, validated splits out."""

    seed: int = 13
    """Seed for carving missing validation/test splits."""
    valid_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of train carved out as validation when a task has no valid split."""
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of train carved out as test when a task has no test split."""
    on_leakage: Literal["error", "warn", "drop"] = "warn"
    """Exact-duplicate text shared by train and valid/test: fail, report, or drop it from train."""


class Params(Strict):
    """The whole params.yaml."""

    tasks: dict[str, TaskConfig]
    """Every task the pipeline knows, by name."""
    prepare: PrepareConfig = PrepareConfig()
    """Settings of the `prepare` stage."""


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate a params file; errors name the key and the allowed keys."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read params: {error}") from error
    return parse_params(raw, source=str(path))


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate an already-loaded params mapping."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_explain(error, source)) from None


def _explain(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(sorted(_model_at(Params, item["loc"][:-1]).model_fields))
            lines.append(f"{source}: unknown key '{loc}'; allowed keys here: {allowed}")
        else:
            lines.append(f"{source}: '{loc or '<top>'}': {item['msg']}")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The config class that sits at `loc` (dict keys skipped) inside `model`."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            current = _unwrap(current.model_fields[str(part)].annotation)
        elif typing.get_origin(current) is dict:
            current = _unwrap(typing.get_args(current)[1])
    return current


def _unwrap(annotation: Any) -> Any:
    """Strip `X | None` down to X."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        arms = [arm for arm in typing.get_args(annotation) if arm is not type(None)]
        return arms[0] if len(arms) == 1 else annotation
    return annotation
