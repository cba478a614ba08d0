"""A small Llama-style causal LM built from a config, with a byte-level BPE tokenizer
trained on the prepared data, saved as an ordinary model folder (safetensors), so the
demo and the tests take exactly the path a 7B hub model takes, 4-bit included."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fin_tasks.config import TinyConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (any UTF-8 text encodes) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(texts, trainer)
    pad, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=pad, bos_token=bos,
                                   eos_token=eos, model_max_length=1_000_000)


def _same_weights_on_every_cpu(model: Any, seed: int, std: float) -> None:
    """Draw the weight matrices again from numpy's generator: torch's CPU `normal_` takes
    vectorized paths that differ between AVX2 and AVX-512 in the last bits, and the base stage
    must write the same bytes on both (norms keep their ones)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                drawn = rng.normal(0.0, std, tuple(parameter.shape)).astype(np.float32)
                parameter.copy_(torch.from_numpy(drawn))


def build_tiny(config: TinyConfig, texts: Iterable[str], out_dir: str | Path) -> None:
    """Write a randomly initialised tiny Llama and its tokenizer into `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(texts, config.vocab_size)
    model_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config)
    _same_weights_on_every_cpu(model, config.seed, model_config.initializer_range)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    log.info("tiny model: %d parameters, vocabulary %d, saved to %s",
             sum(p.numel() for p in model.parameters()), len(tokenizer), out_dir)
