"""Batched forward passes that training and prediction share: a classifier's logits, and a
prompt prefix that every row of a batch shares, run once (with the cache-API differences of
transformers releases kept here)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from fin_tasks.encoding import Example, collate

MIN_SHARED_PREFIX = 8  # tokens; below this, one more forward pass costs more than it saves


@torch.no_grad()
def classifier_logits(model: Any, examples: Sequence[Example], batch_size: int, pad_id: int,
                      device: torch.device) -> torch.Tensor:
    """Float32 logits of a classifier (an encoder's or a label head's), one row per example
    in input order; batches are length-sorted to pad little."""
    rows: list[torch.Tensor | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: examples[i].tokens)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([examples[i] for i in chunk], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, row in zip(chunk, logits.float().cpu()):
            rows[i] = row
    return torch.stack(rows)  # type: ignore[arg-type]


def shared_prefix_length(ids: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor,
                         most: int) -> int:
    """How many tokens every row holds alike from its own start (`starts`: 0 for right
    padding, the padding width for left padding), at most `most`: 0 for a single row or when
    fewer than MIN_SHARED_PREFIX would be shared."""
    if len(ids) < 2 or most < MIN_SHARED_PREFIX:
        return 0
    index = starts[:, None] + torch.arange(most, device=ids.device)[None]
    heads, real = ids.gather(1, index), mask.gather(1, index)
    length = int(((heads == heads[:1]) & (real == 1)).all(0).long().cumprod(0).sum())
    return length if length >= MIN_SHARED_PREFIX else 0


def forward_takes(model: Any, name: str) -> bool:
    """Whether a model's forward (under any peft wrapper) has a parameter called `name`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in _forward_parameters(type(base))


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    """Parameter names of a model class's forward (read once per class: the question comes
    with every micro-batch and every decoding step)."""
    import inspect

    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_argument(model: Any) -> str:
    """The keyword a causal LM's forward takes its key/value cache by: `cache` in recent
    transformers 5 releases, `past_key_values` in earlier ones (deprecated since, and removed
    in 5.40)."""
    return "cache" if forward_takes(model, "cache") else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The key/value cache a forward pass returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def shared_prefix_cache(model: Any, prefix: torch.Tensor, rows: int) -> Any:
    """The key/value cache of a prompt prefix (one row of token ids) computed once and
    broadcast to `rows` rows, without copies. Causal attention gives a prefix the same states
    whatever follows it, so every row may continue from it; under autograd, gradients flow
    back through the broadcast into the prefix's one computation."""
    cache = returned_cache(model(input_ids=prefix, use_cache=True, logits_to_keep=1))
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    return cache
