"""Classification (FinLLM Task 1, Financial PhraseBank, any labeled set): one label of a fixed
set per text, parsed from a generated answer as the organizers do ("missing" when none is
found) or chosen by scoring each label. Ranked by weighted F1."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fin_tasks.kinds.base import Kind
from fin_tasks.metrics import classification_ci, classification_metrics

if TYPE_CHECKING:
    from fin_tasks.config import EvaluateConfig
    from fin_tasks.tasks import Task

log = logging.getLogger(__name__)


def score(task: Task, gold: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
          settings: EvaluateConfig) -> dict[str, Any]:
    """Accuracy, weighted and macro F1, MCC, missing rate, a collapse flag, and an interval
    for the ranking metric."""
    golds = [g["answer"] for g in gold]
    preds = [r["label"] for r in rows]
    result: dict[str, Any] = classification_metrics(golds, preds) | {"rows": len(rows)}
    answered = {p for p in preds if p in task.labels}
    # a model that answers one class whatever the input (or nothing) ranks by chance alone
    result["single_class"] = len(answered) <= 1 and len(set(golds)) > 1
    if result["single_class"]:
        log.warning("%s: every prediction is %s: the model collapsed to one class; its "
                    "score is a majority-class score", task.name,
                    f"'{answered.pop()}'" if answered else "missing")
    ranking = task.kind.ranking
    result[f"{ranking}_ci95"] = classification_ci(golds, preds, ranking, settings.bootstrap,
                                                  settings.seed)
    return result


KIND = Kind(
    name="classification", ranking="f1_weighted", score=score, prediction="label",
    columns=("accuracy", "f1_weighted", "f1_macro", "mcc", "missing_rate"),
    baselines=("majority",), generic=True, max_new_tokens=20,
)
