"""Summarization (EDTSum headlines): free text against a reference, ranked by ROUGE-1, with
ROUGE-2/L, BERTScore F1 and length statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fin_tasks.kinds.base import Kind
from fin_tasks.metrics import bertscore_f1, bootstrap_ci, rouge_scores

if TYPE_CHECKING:
    from fin_tasks.config import EvaluateConfig
    from fin_tasks.tasks import Task


def score(task: Task, gold: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
          settings: EvaluateConfig) -> dict[str, Any]:
    """ROUGE (the organizers' rouge-score settings), BERTScore when configured, lengths."""
    references, candidates = [g["answer"] for g in gold], [r["output"] for r in rows]
    scores = rouge_scores(references, candidates)
    result: dict[str, Any] = {key: float(np.mean(values)) for key, values in scores.items()}
    result["rouge1_ci95"] = bootstrap_ci(scores["rouge1"], np.mean, settings.bootstrap,
                                         settings.seed)
    if settings.bertscore_model:
        from fin_tasks.sources import resolve_source

        model = resolve_source(settings.bertscore_model).name_or_path
        result["bertscore_f1"] = float(np.mean(bertscore_f1(
            references, candidates, model, settings.bertscore_layer,
            settings.bertscore_batch_size)))
        result["bertscore_model"] = settings.bertscore_model
    lengths = [len(c.split()) for c in candidates]
    result |= {"rows": len(rows), "words_mean": float(np.mean(lengths)),
               "words_reference_mean": float(np.mean([len(r.split()) for r in references])),
               "empty_outputs": int(sum(1 for c in candidates if not c.strip()))}
    return result


KIND = Kind(
    name="summarization", ranking="rouge1", score=score, prediction="text",
    columns=("rouge1", "rouge2", "rougeL", "bertscore_f1", "words_mean"),
    baselines=("lead",), generic=True, max_new_tokens=128,
)
