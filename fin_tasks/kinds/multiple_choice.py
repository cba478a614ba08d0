"""Multiple choice (FinEval): one option letter per question, ranked by accuracy, reported
overall, per subject, and for questions with and without numeric content apart (NumLLM)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fin_tasks.kinds import classification
from fin_tasks.kinds.base import Kind

if TYPE_CHECKING:
    from fin_tasks.config import EvaluateConfig
    from fin_tasks.tasks import Task


def score(task: Task, gold: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
          settings: EvaluateConfig) -> dict[str, Any]:
    """The classification metrics plus accuracy by subject and by numeric content."""
    result = classification.score(task, gold, rows, settings)
    correct = np.array([g["answer"] == r["label"] for g, r in zip(gold, rows)])
    numeric = np.array([bool(g.get("numeric")) for g in gold])
    subjects = np.array([g.get("subject", "") for g in gold])
    return result | {
        "accuracy_numeric": float(correct[numeric].mean()) if numeric.any() else None,
        "rows_numeric": int(numeric.sum()),
        "accuracy_non_numeric": float(correct[~numeric].mean()) if (~numeric).any() else None,
        "rows_non_numeric": int((~numeric).sum()),
        "accuracy_by_subject": {s: float(correct[subjects == s].mean())
                                for s in sorted(set(subjects))},
    }


KIND = Kind(
    name="multiple_choice", ranking="accuracy", score=score, prediction="label",
    columns=("accuracy", "accuracy_numeric", "accuracy_non_numeric", "missing_rate"),
    baselines=("majority",), max_new_tokens=5,
)
