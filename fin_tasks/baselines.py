"""Baselines as ordinary model entries, so every leaderboard has a floor.

`majority` predicts the most frequent train label (classification, multiple choice);
`lead` predicts an article's first sentence, or its first `lead_words` words (summarization).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from fin_tasks.config import ModelConfig
from fin_tasks.tasks import Task

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")
KINDS_FOR_TASK = {"majority": ("classification", "multiple_choice"), "lead": ("summarization",)}


def fit(config: ModelConfig, task: Task, train: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What a baseline learns from the train split."""
    if task.kind not in KINDS_FOR_TASK[config.kind]:
        raise ValueError(f"a '{config.kind}' baseline does not apply to {task.kind} "
                         f"task '{task.name}'")
    if config.kind == "majority":
        counts = Counter(r["answer"] for r in train if r.get("answer") is not None)
        # ties broken by choice order, so the result does not depend on row order
        label = max(task.labels, key=lambda label: (counts[label], -task.labels.index(label)))
        return {"kind": "majority", "label": label, "counts": dict(counts)}
    return {"kind": "lead", "words": config.lead_words}


def outputs(fitted: dict[str, Any], records: Sequence[dict[str, Any]]) -> list[str]:
    """The baseline's raw output for each record."""
    if fitted["kind"] == "majority":
        return [fitted["label"]] * len(records)
    return [lead(r["text"], fitted["words"]) for r in records]


def lead(text: str, words: int | None) -> str:
    """The first sentence of `text`, or its first `words` words."""
    text = " ".join(text.split())
    if words is not None:
        return " ".join(text.split(" ")[:words])
    return _SENTENCE_END.split(text, maxsplit=1)[0]
