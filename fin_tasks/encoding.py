"""Records into model inputs, one way for `train` and `predict`: an `Example` per record
(token ids and what is learned), encoded as each model kind trains on each kind of task,
and batches padded on the right to their longest row.

Prompts are rendered by `prompting` (the chat template's turns); this module turns them,
or a classifier's text, or a corpus's windows, into tokens and tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fin_tasks.config import HeadConfig, ModelConfig
from fin_tasks.prompting import (ANSWER_TOKENS, IGNORE, encode_example, encode_texts,
                                 head_text, keep_ends)
from fin_tasks.tasks import Task


@dataclass(frozen=True)
class Example:
    """One tokenized training example."""

    input_ids: list[int]
    labels: list[int] | int
    """Per-token labels (causal; IGNORE on the prompt) or a class index (encoder)."""

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


def encode_causal(records: Sequence[dict[str, Any]], tokenizer: Any, max_length: int,
                  use_chat_template: bool = True, max_new_tokens: int = ANSWER_TOKENS,
                  ) -> list[Example]:
    """Prompt, then answer and its closing token(s), rendered as the chat template does (see
    `prompting.encode_example`); labels only on the answer."""
    return [Example(*encode_example(record, tokenizer, max_length, use_chat_template,
                                    max_new_tokens)) for record in records]


def encode_encoder(records: Sequence[dict[str, Any]], tokenizer: Any,
                   max_length: int) -> list[Example]:
    """Text tokens and the gold class index (IGNORE for an unlabeled record)."""
    encoded = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)
    return [Example(ids, IGNORE if r.get("gold") is None else int(r["gold"]))
            for ids, r in zip(encoded["input_ids"], records)]


def encode_head(records: Sequence[dict[str, Any]], tokenizer: Any, head: HeadConfig,
                max_length: int) -> list[Example]:
    """A label head's input (its template filled in, a BOS where the tokenizer puts one),
    cut to `max_length` keeping both ends, and the gold class index (IGNORE when unlabeled).
    Training and prediction both encode through here."""
    rows = encode_texts(tokenizer, [head_text(r, tokenizer, head.template, head.chat_template)
                                    for r in records])
    return [Example(keep_ends(ids, max_length), IGNORE if r.get("gold") is None
                    else int(r["gold"])) for ids, r in zip(rows, records)]


def encode_corpus(records: Sequence[dict[str, Any]], tokenizer: Any,
                  max_length: int) -> list[Example]:
    """Continual pre-training: every token of each text (plus EOS) is learned; a text longer
    than `max_length` tokens becomes consecutive windows, so no text is lost."""
    examples = []
    for record in records:
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        ids = ids + [tokenizer.eos_token_id]
        for start in range(0, len(ids), max_length):
            window = ids[start:start + max_length]
            if len(window) > 1:  # one token predicts nothing
                examples.append(Example(window, list(window)))
    return examples


def encode(records: Sequence[dict[str, Any]], tokenizer: Any, config: ModelConfig,
           max_length: int, task: Task | None = None,
           head: HeadConfig | None = None) -> list[Example]:
    """Tokenize records the way this model kind trains on this task (with a label head
    when the run has one)."""
    if head is not None:
        return encode_head(records, tokenizer, head, max_length)
    if config.model_kind.own_head:
        return encode_encoder(records, tokenizer, max_length)
    if task is not None and task.kind.training == "text":
        return encode_corpus(records, tokenizer, max_length)
    return encode_causal(records, tokenizer, max_length, config.chat_template,
                         task.max_new_tokens if task is not None else ANSWER_TOKENS)


def collate(examples: Sequence[Example], pad_id: int, device: torch.device,
            ) -> dict[str, torch.Tensor]:
    """Pad a batch on the right to its longest example (dynamic padding)."""
    width = max(e.tokens for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    causal = isinstance(examples[0].labels, list)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long) if causal \
        else torch.tensor([e.labels for e in examples], dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : example.tokens] = torch.tensor(example.input_ids)
        mask[row, : example.tokens] = 1
        if causal:
            labels[row, : example.tokens] = torch.tensor(example.labels)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device)}
