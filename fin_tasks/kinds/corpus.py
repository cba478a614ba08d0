"""A corpus (continual pre-training, NumLLM module 1): chunks of plain text, learned on every
token and scored by held-out perplexity (lower is better)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fin_tasks.kinds.base import Kind
from fin_tasks.metrics import bootstrap_ci, perplexity

if TYPE_CHECKING:
    from fin_tasks.config import EvaluateConfig
    from fin_tasks.tasks import Task


def score(task: Task, gold: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]],
          settings: EvaluateConfig) -> dict[str, Any]:
    """Perplexity over all predicted tokens (exp of the mean token loss), with an interval."""
    pairs = [(r["nll"], r["tokens"]) for r in rows]
    tokens = sum(t for _, t in pairs)
    return {"perplexity": perplexity(pairs), "loss": sum(n for n, _ in pairs) / max(tokens, 1),
            "tokens": tokens, "rows": len(rows),
            "perplexity_ci95": bootstrap_ci(pairs, perplexity, settings.bootstrap, settings.seed)}


KIND = Kind(
    name="corpus", ranking="perplexity", higher_is_better=False, score=score,
    prediction="loss", training="text", columns=("perplexity", "loss", "tokens"),
    labeled=False, max_new_tokens=0, submittable=False,
)
