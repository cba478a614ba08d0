"""Kinds of model entry (`models.<name>.kind` in params), one object each: what the stages
ask of a model, instead of branching on its kind's name.

- `causal`: an instruction LLM that answers by generating (or by scoring each label); it may
  be built tiny or converted from GGUF, stored 4-bit, carry a label head, run zero-shot and
  merge adapters;
- `encoder`: predicts labels from a sequence-classification head of its own;
- `majority`, `lead`: baselines, fitted without torch or weights.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelKind:
    """What one kind of model entry is and can do."""

    name: str
    baseline: bool = False
    """Fitted without torch or weights: no base to build, no training loop, no GPU."""
    causal: bool = False
    """A causal LM: generates and scores text, quantizes to 4-bit, can carry a label head."""
    own_head: bool = False
    """Predicts from a classification head of its own, which exists only once trained."""

    @property
    def peft_task_type(self) -> str:
        """The peft task type of its LoRA adapters."""
        return "SEQ_CLS" if self.own_head else "CAUSAL_LM"

    def predicts_by_head(self, head: object | None) -> bool:
        """Whether a run of this kind predicts from a classification head: its own, or a
        label head (`train.runs.<run>.head`) on a causal LM."""
        return self.own_head or head is not None


MODEL_KINDS = {kind.name: kind for kind in (
    ModelKind("causal", causal=True), ModelKind("encoder", own_head=True),
    ModelKind("majority", baseline=True), ModelKind("lead", baseline=True))}


def model_kind(name: str) -> ModelKind:
    """The kind called `name` (params restrict `kind` to these names)."""
    return MODEL_KINDS[name]
