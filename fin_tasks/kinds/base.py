"""What every kind of task is: one object that says how a task of that kind is prepared,
trained on, predicted, validated, scored and ranked. The stages ask the task's kind; none of
them branches on a kind's name, so a new kind is one new module (see `fin_tasks.kinds`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # type hints only: kinds import nothing heavier than numpy at load
    from fin_tasks.config import EvaluateConfig
    from fin_tasks.tasks import Task

Scorer = Callable[["Task", Sequence[dict[str, Any]], Sequence[dict[str, Any]], "EvaluateConfig"],
                  dict[str, Any]]
"""Metrics of one prediction file: (task, gold records, prediction rows, settings), the two
sequences in the same order."""


@dataclass(frozen=True)
class Kind:
    """A kind of task (classification, multiple choice, summarization, corpus, ...)."""

    name: str
    ranking: str
    """The metric that ranks runs (leaderboard, `submit`'s choice); it gets an interval."""
    columns: tuple[str, ...]
    """Metrics the leaderboard shows for this kind, in order."""
    score: Scorer
    """How one prediction file is scored against its gold records."""
    prediction: Literal["label", "text", "loss"]
    """What a prediction row carries beside its raw `output`: a label from the task's label
    set (or "missing"), free text (the output itself), or the text's log-likelihood
    (`nll` over `tokens`). A causal LM predicts by generating (or scoring the labels), by
    generating, or by scoring the text."""
    training: Literal["answer", "text"] = "answer"
    """What a causal LM learns: the answer after the prompt, or every token of the text."""
    higher_is_better: bool = True
    """Direction of `ranking`."""
    baselines: tuple[str, ...] = ()
    """Baseline model kinds that apply (`majority`, `lead`)."""
    labeled: bool = True
    """Whether its rows carry an answer: a split without answers is unlabeled (an official
    test set) and is neither learned from nor scored. A corpus's rows are all text."""
    generic: bool = False
    """Whether params can define a task of this kind from `columns` and an `instruction`
    alone (`type: <kind>`), as for classification and summarization."""
    max_new_tokens: int = 20
    """Generation budget of a generic task of this kind."""
    submittable: bool = True
    """Whether `submit` can bundle a task of this kind."""

    def sort_key(self, score: float) -> float:
        """A key that sorts scores best first."""
        return -score if self.higher_is_better else score
