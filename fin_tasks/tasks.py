"""Tasks as data: each benchmark is one small description, not a branch in the code.

A description knows how to find its fields in raw rows, how to render the prompt
(the organizers' `query`), its label set or target, its record format, and its kind
(`fin_tasks.kinds`: how it is predicted, scored and ranked). A new built-in task of an
existing kind is one function here, named in `BUILTIN`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fin_tasks import kinds
from fin_tasks.kinds import Kind

if TYPE_CHECKING:  # config validates task types against this module
    from fin_tasks.config import TaskConfig

FINARG_INSTRUCTION = (
    "Analyze sentences from earnings conference calls and identify their argumentative "
    "function. Each sentence is either a premise, offering evidence or reasoning, or a claim, "
    "asserting a conclusion or viewpoint. Return only premise or claim."
)
EDTSUM_INSTRUCTION = (
    "You are given a text that consists of multiple sentences. Your task is to perform "
    "abstractive summarization on this text. Use your understanding of the content to express "
    "the main ideas and crucial details in a shorter, coherent, and natural sounding text."
)
FINEVAL_INSTRUCTION = "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。"

# The organizers' (PIXIU/FinBen) query layout; FinEval's own zero-shot layout.
PLAIN_TEMPLATE = "{instruction}\nText: {text}\nAnswer:"
CHOICE_TEMPLATE = "{instruction}\n\n{text}\n{options}\n答案："

# Digits, ASCII or full-width, and Chinese numerals written with digits' meaning.
_NUMERIC = re.compile(r"[0-9０-９]|[一二三四五六七八九十百千万亿]+[元%％]")


@dataclass(frozen=True)
class Task:
    """A benchmark task: where its fields are, how it is prompted, what it predicts."""

    name: str
    kind: Kind
    """How it is predicted, scored and ranked."""
    instruction: str
    template: str
    """Prompt layout; fields: instruction, text, options, subject."""
    id_field: str | None
    """Raw field with the row id (None: made from the split and line, e.g. `train-12`)."""
    text_field: str
    label_field: str | None
    """Raw field with the label, reference summary or answer letter (absent in unlabeled test)."""
    labels: tuple[str, ...] = ()
    """Choices in the organizers' order; empty for summarization."""
    gold_field: str | None = None
    """Raw field with the label's index, checked against the label when present."""
    option_fields: tuple[str, ...] = ()
    """Raw fields with the option texts of a multiple-choice question."""
    label_names: Mapping[str, str] = field(default_factory=dict)
    """Raw label value -> label name (e.g. "2" -> "positive")."""
    subject_from_file: bool = False
    """Subject taken from the file name (FinEval: `accounting_val.csv` -> accounting)."""
    max_new_tokens: int = 20
    """Greedy generation budget the organizers use for this task."""
    parser: str = "substring"
    """How a generated answer becomes a label: `substring` (the organizers' rule) or `letter`."""

    @property
    def required_fields(self) -> tuple[str, ...]:
        """Raw fields every row must carry (the label only in labeled splits)."""
        return tuple(name for name in (self.id_field, self.text_field, *self.option_fields)
                     if name is not None)

    def query(self, text: str, options: tuple[str, ...] = (), subject: str = "") -> str:
        """The prompt the organizers feed the model for one row."""
        lines = "\n".join(f"{letter}. {option}" for letter, option in zip(self.labels, options))
        instruction = self.instruction.format(subject=subject.replace("_", " "))
        return self.template.format(instruction=instruction, text=text, options=lines)


def has_numeric(*texts: str) -> bool:
    """Whether a question (or any of its options) involves numeric content."""
    return any(_NUMERIC.search(text) for text in texts)


def finarg_ecc(name: str, instruction: str | None = None) -> Task:
    """FinLLM Challenge 2024 Task 1: claim/premise classification (PIXIU record format)."""
    return Task(name=name, kind=kinds.get("classification"),
                instruction=instruction or FINARG_INSTRUCTION,
                template=PLAIN_TEMPLATE, id_field="id", text_field="text", label_field="answer",
                labels=("premise", "claim"), gold_field="gold", max_new_tokens=20)


def edtsum(name: str, instruction: str | None = None) -> Task:
    """FinLLM Challenge 2024 Task 2: EDTSum headline summarization."""
    return Task(name=name, kind=kinds.get("summarization"),
                instruction=instruction or EDTSUM_INSTRUCTION,
                template=PLAIN_TEMPLATE, id_field="id", text_field="text", label_field="answer",
                max_new_tokens=128)


def fineval(name: str, instruction: str | None = None) -> Task:
    """FinEval: Chinese 4-option multiple choice, one CSV per subject."""
    return Task(name=name, kind=kinds.get("multiple_choice"),
                instruction=instruction or FINEVAL_INSTRUCTION,
                template=CHOICE_TEMPLATE, id_field="id", text_field="question",
                label_field="answer", labels=("A", "B", "C", "D"),
                option_fields=("A", "B", "C", "D"), subject_from_file=True, max_new_tokens=5,
                parser="letter")


def corpus(name: str, instruction: str | None = None) -> Task:
    """Chunks of plain text (the `corpus` stage's output): learned on every token, scored by
    perplexity. The prompt is the text itself; there is no instruction and no answer."""
    return Task(name=name, kind=kinds.get("corpus"), instruction=instruction or "",
                template="{text}",
                id_field="id", text_field="text", label_field=None, max_new_tokens=0)


BUILTIN = {"finarg_ecc": finarg_ecc, "edtsum": edtsum, "fineval": fineval, "corpus": corpus}
"""Built-in task descriptions by `type`; any other type names a generic kind."""


def kind_of(type_name: str) -> Kind:
    """The kind of task a params `type` describes."""
    return BUILTIN[type_name]("").kind if type_name in BUILTIN else kinds.get(type_name)


def task_from_config(name: str, config: TaskConfig) -> Task:
    """The task a params entry describes: a built-in, or a generic one of the kind its
    `type` names, built from params."""
    if config.type in BUILTIN:
        return BUILTIN[config.type](name, config.instruction)
    columns = config.columns
    assert columns is not None and config.instruction is not None  # checked by TaskConfig
    return Task(
        name=name, kind=config.kind, instruction=config.instruction, template=PLAIN_TEMPLATE,
        id_field=columns.id, text_field=columns.text, label_field=columns.label,
        labels=tuple(config.labels or ()), label_names=dict(config.label_names or {}),
        max_new_tokens=config.kind.max_new_tokens,
    )
