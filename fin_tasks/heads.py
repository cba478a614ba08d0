"""Label-supervised fine-tuning of a causal LM: a linear head over a task's labels reads the
hidden state of each text's last real token (LS-LLaMA, arXiv 2310.01208), and learns from a
cross-entropy over the labels: no generation, no parsing, never "missing".

The body is loaded as any causal LM of the pipeline (4-bit or not, GGUF-converted or hub)
and either carries LoRA adapters trained with the head (`body: lora`) or stays frozen
(`body: frozen`, a linear probe: how much the LoRA adds). The head stays unquantized, in
float32, and is saved beside the adapter in one folder (`head/`) that `load_head` restores
exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fin_tasks.config import HeadConfig, ModelConfig
from fin_tasks.errors import ModelError
from fin_tasks.models import frozen_as_in_training, import_peft, with_lora
from fin_tasks.weights import check_trained_weights

HEAD_FILE = "head.safetensors"
HEAD_RECORD = "head.json"


@dataclass
class HeadOutput:
    """What a forward pass of a `LabelHead` returns (the `.logits` a classifier's has)."""

    logits: torch.Tensor
    """(rows, labels), float32."""


def last_real_token(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended position: correct with right or left padding, and
    when the pad token is the EOS token (the mask says what is padding, not the ids)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask).argmax(-1)


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so a left-padded row reads as unpadded."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class LabelHead(torch.nn.Module):
    """A causal LM's body (under its LoRA adapters, if any) and a linear head over labels."""

    def __init__(self, lm: Any, labels: Sequence[str], body: str) -> None:
        super().__init__()
        self.lm, self.labels, self.body = lm, tuple(labels), body
        config = _transformer(lm).config
        hidden = getattr(config, "hidden_size", None) or config.get_text_config().hidden_size
        device = next(lm.parameters()).device
        self.score = torch.nn.Linear(hidden, len(labels), dtype=torch.float32, device=device)
        torch.nn.init.normal_(self.score.weight, std=getattr(config, "initializer_range", 0.02))
        torch.nn.init.zeros_(self.score.bias)

    @property
    def config(self) -> Any:
        """The body's transformers config (read by callers as a model's)."""
        return _transformer(self.lm).config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                **_: Any) -> HeadOutput:
        """Label logits of each row, from its last real token's final hidden state."""
        decoder = _transformer(self.lm).get_decoder()
        frozen = not any(p.requires_grad for p in self.lm.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            states = decoder(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=positions_of(attention_mask),
                             use_cache=False).last_hidden_state
        pooled = states[torch.arange(len(states), device=states.device),
                        last_real_token(attention_mask).to(states.device)]
        # (a body spread over GPUs ends on another device than the head's)
        return HeadOutput(self.score(pooled.to(self.score.weight.device, torch.float32)))

    def save_pretrained(self, folder: str | Path, safe_serialization: bool = True) -> None:
        """The adapter (when the body has one), the head's weights and its record."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if hasattr(self.lm, "peft_config"):
            self.lm.save_pretrained(str(folder), safe_serialization=safe_serialization)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.score.state_dict().items()},
                  str(folder / HEAD_FILE))
        record = {"labels": list(self.labels), "body": self.body, "pooling": "last_real_token",
                  "hidden_size": self.score.in_features, "dtype": "float32"}
        (folder / HEAD_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _transformer(lm: Any) -> Any:
    """The transformers model under any peft wrapper."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def with_label_head(model: Any, config: ModelConfig, head: HeadConfig,
                    labels: Sequence[str]) -> LabelHead:
    """A freshly loaded causal LM made ready to train a label head: fresh LoRA adapters on
    its body, or its body frozen (a probe); the head initialised from the torch seed."""
    lm = with_lora(model, config) if head.body == "lora" else frozen_as_in_training(model, config)
    return LabelHead(lm, labels, head.body)


def load_head(model: Any, config: ModelConfig, folder: Path,
              labels: Sequence[str]) -> LabelHead:
    """A trained head (and its adapter) on a freshly loaded base, computing as in training."""
    from safetensors.torch import load_file

    check_trained_weights(folder)
    record = json.loads((folder / HEAD_RECORD).read_text(encoding="utf-8"))
    if tuple(record["labels"]) != tuple(labels):
        raise ModelError(f"{folder} holds a head over labels {record['labels']}, but the task's "
                         f"labels are {list(labels)}; retrain the run")
    lm = frozen_as_in_training(model, config)
    if (folder / "adapter_config.json").exists():
        import_peft()
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(folder))
    head = LabelHead(lm, labels, record["body"])
    head.score.load_state_dict(load_file(str(folder / HEAD_FILE)))
    return head.eval()

