"""Kinds of task, one module each, and their registry.

A task (`fin_tasks.tasks.Task`) points at its kind; the stages ask the kind how to score,
rank, validate and tabulate, and which baselines apply. A new kind is a `Kind` (see
`base.py`) passed to `register`, in its own module or in a test: no stage changes.
"""

from __future__ import annotations

from fin_tasks.errors import ConfigError
from fin_tasks.kinds import classification, corpus, multiple_choice, summarization
from fin_tasks.kinds.base import Kind

KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Make `kind` known by its name (a name already taken by another kind is refused)."""
    if KINDS.get(kind.name, kind) is not kind:
        raise ConfigError(f"task kind '{kind.name}' is already registered")
    KINDS[kind.name] = kind
    return kind


def get(name: str) -> Kind:
    """The registered kind called `name`."""
    if name not in KINDS:
        raise ConfigError(f"unknown task kind '{name}' (known: {', '.join(sorted(KINDS))})")
    return KINDS[name]


def generic_names() -> tuple[str, ...]:
    """Kinds a params entry can define from columns and an instruction (`type: <kind>`)."""
    return tuple(name for name, kind in KINDS.items() if kind.generic)


for _builtin in (classification.KIND, multiple_choice.KIND, summarization.KIND, corpus.KIND):
    register(_builtin)

__all__ = ["KINDS", "Kind", "generic_names", "get", "register"]
