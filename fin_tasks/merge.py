"""The `merge` stage: LoRA adapters merged into their base, checked, saved as a plain model.

NumLLM merges a continual pre-training adapter and a choice-tuning adapter into one model.
A 4-bit base is first dequantized to its compute dtype: merging an update into 4-bit weights
rounds most of it away. Methods: `sequential` (each adapter's merge_and_unload in turn) and
peft's `add_weighted_adapter` combinations (linear, cat, svd, ties, dare_ties) followed by
one merge. After every merge the merged model's logits on a fixed probe batch are compared
with the same base carrying the adapters unmerged (each update scaled by its weight): exact
methods must agree within `tolerance`; approximate ones report their error (and fail above
`max_error` when it is set). A merge that fails its check writes nothing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fin_tasks.artifacts import atomic_dir, package_versions, read_jsonl, sha256_file, write_json
from fin_tasks.config import EXACT_MERGES, MergeConfig, ModelConfig
from fin_tasks.errors import ModelError
from fin_tasks.models import (BaseRef, base_identity, dequantized, import_peft, load_base,
                              load_tokenizer, read_base_ref)
from fin_tasks.prompting import render_prompt
from fin_tasks.runs import MergeInputs
from fin_tasks.weights import check_trained_weights

log = logging.getLogger(__name__)


def check_same_base(name: str, runs: Sequence[str], train_root: Path, base_dir: Path,
                    ) -> dict[str, Any]:
    """The identity of the base every adapter was trained on; an error if they differ."""
    current = base_identity(read_base_ref(base_dir), base_dir)
    for run in runs:
        trained_on = json.loads((train_root / run / "train_config.json")
                                .read_text(encoding="utf-8"))["base"]
        if trained_on.get("sha256") != current["sha256"]:
            raise ModelError(
                f"merge {name}: adapter '{run}' was trained on base "
                f"{trained_on['name_or_path']} (content {str(trained_on.get('sha256'))[:12]}), "
                f"not on {current['name_or_path']} (content {current['sha256'][:12]}); "
                "adapters trained on different bases cannot be merged into one. Retrain it "
                "on this base, or merge it separately.")
    return current


def probe_batch(tokenizer: Any, records: Sequence[dict[str, Any]], config: ModelConfig,
                max_tokens: int = 256) -> dict[str, torch.Tensor]:
    """Fixed prompts (right-padded) on which merged and unmerged models are compared."""
    prompts = [render_prompt(r, tokenizer, config.chat_template) for r in records]
    encoded = tokenizer(prompts, padding=True, truncation=True, max_length=max_tokens,
                        return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@torch.no_grad()
def probe_logits(model: Any, probe: dict[str, torch.Tensor]) -> torch.Tensor:
    """Float32 logits at the probe's real (non-padding) positions, shape (tokens, vocab)."""
    model.eval()
    device = next(model.parameters()).device
    logits = model(**{k: v.to(device) for k, v in probe.items()}).logits.float().cpu()
    return logits[probe["attention_mask"].bool()]


def _lora_layers(model: Any) -> list[Any]:
    import_peft()
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def unmerged_logits(model: Any, names: Sequence[str], weights: Sequence[float],
                    probe: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the base with every adapter active at once, each update scaled by its
    weight: what a merge is meant to compute (W + sum_i w_i * scale_i * B_i A_i)."""
    layers = _lora_layers(model)
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        for adapter, weight in zip(names, weights):
            if adapter in layer.scaling:
                layer.scaling[adapter] *= weight
    model.base_model.set_adapter(list(names))
    try:
        return probe_logits(model, probe)
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.update(scaling)


def combine(model: Any, names: Sequence[str], adapter_dirs: Sequence[Path],
            merge: MergeConfig) -> Any:
    """The plain model after merging (peft layers gone), by the configured method."""
    import_peft()
    from peft import PeftModel

    weights = merge.adapter_weights
    if merge.method == "sequential":
        plain = model.unload()  # the base, untouched: nothing was merged yet
        for adapter_dir, weight in zip(adapter_dirs, weights):
            wrapped = PeftModel.from_pretrained(plain, str(adapter_dir))
            for layer in _lora_layers(wrapped):
                layer.scaling["default"] *= weight
            plain = wrapped.merge_and_unload()
        return plain
    torch.manual_seed(0)  # dare_ties drops values at random
    try:
        model.add_weighted_adapter(list(names), list(weights), "merged",
                                   combination_type=merge.method, svd_rank=merge.svd_rank,
                                   density=merge.density)
    except ValueError as error:
        raise ModelError(f"merge method '{merge.method}' cannot combine these adapters: "
                         f"{error}") from None
    model.base_model.set_adapter("merged")
    return model.merge_and_unload(adapter_names=["merged"])


def merge_adapters(inputs: MergeInputs, base_dir: str | Path, train_root: str | Path,
                   probe_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Merge, check and save one `merge` entry into `out_dir` (atomically); its record."""
    import_peft()
    from peft import PeftModel

    name, merge, config = inputs.name, inputs.config, inputs.model
    runs, weights = merge.adapters, merge.adapter_weights
    base_dir, train_root = Path(base_dir), Path(train_root)
    identity = check_same_base(name, runs, train_root, base_dir)
    adapter_dirs = [train_root / run / "adapter" for run in runs]
    for adapter_dir in adapter_dirs:
        check_trained_weights(adapter_dir)
    tokenizer = load_tokenizer(BaseRef(str(train_root / runs[0] / "tokenizer")))
    probe = probe_batch(tokenizer, read_jsonl(Path(probe_dir) / "valid.jsonl")[:merge.probe_rows],
                        config)
    # merge into the weights the quantized base computes with, not into 4-bit codes
    base = dequantized(load_base(config, read_base_ref(base_dir)), config)
    base_logits = probe_logits(base, probe)
    names = [f"a{i}" for i in range(len(runs))]
    model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name=names[0])
    for adapter, adapter_dir in zip(names[1:], adapter_dirs[1:]):
        model.load_adapter(str(adapter_dir), adapter_name=adapter)
    reference = unmerged_logits(model, names, weights, probe)
    merged = combine(model, names, adapter_dirs, merge)
    check = _check(merge, probe_logits(merged, probe), reference, base_logits)
    if not check["passed"]:
        raise ModelError(f"merge {name} ({merge.method}) failed its check: merged logits differ "
                         f"from the unmerged adapters by up to {check['max_abs_diff']:.3g} "
                         f"(limit {check['limit']:.3g}); nothing was written")
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config  # plain weights now: load without bitsandbytes
    record = {"merge": name, "method": merge.method, "adapters": list(runs),
              "weights": list(weights), "density": merge.density, "svd_rank": merge.svd_rank,
              "dtype": str(next(merged.parameters()).dtype).removeprefix("torch."),
              "base": identity, "check": check,
              "adapter_files": {run: sha256_file(d / "adapter_model.safetensors")
                                for run, d in zip(runs, adapter_dirs)},
              "packages": package_versions()}
    with atomic_dir(out_dir) as scratch:
        merged.save_pretrained(scratch / "model", safe_serialization=True)
        tokenizer.save_pretrained(scratch / "tokenizer")
        write_json(scratch / "merge.json", record)
    log.info("merged %s (%s): max logit difference %.3g vs unmerged (adapters move logits by "
             "up to %.3g) -> %s", name, merge.method, check["max_abs_diff"],
             check["adapter_effect_max"], out_dir)
    return record


def _check(merge: MergeConfig, merged: torch.Tensor, reference: torch.Tensor,
           base: torch.Tensor) -> dict[str, Any]:
    """How far the merged logits are from the unmerged ones, beside how far the adapters move
    the base's logits at all (a check is only meaningful when the latter is not tiny)."""
    diff = (merged - reference).abs()
    exact = merge.method in EXACT_MERGES
    limit = merge.tolerance if exact else merge.max_error
    max_diff = float(diff.max())
    return {"exact_method": exact, "limit": limit, "max_abs_diff": max_diff,
            "mean_abs_diff": float(diff.mean()),
            "adapter_effect_max": float((reference - base).abs().max()),
            "adapter_effect_mean": float((reference - base).abs().mean()),
            "probe_tokens": int(reference.shape[0]),
            "passed": limit is None or max_diff <= limit}
