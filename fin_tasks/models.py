"""Model loading: a base (quantized or not) onto its device, with LoRA, an adapter or a head.

The rest of the library receives a loaded model. QLoRA is a loading option (a quantized
base plus LoRA adapters), not a different trainer. `bitsandbytes` and `peft` are imported
here, lazily, only when asked for.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch

from fin_tasks.artifacts import sha256_file, sha256_folder
from fin_tasks.config import LoraSettings, ModelConfig, QuantConfig
from fin_tasks.devices import DTYPES, compute_dtype, device_for, resolved_quantization
from fin_tasks.errors import ModelError
from fin_tasks.sources import BaseRef, resolve_source

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"
QUANTIZED_DIR = "quantized"  # in a base folder: its weights stored ready-quantized
QUANTIZED_RECORD = "fin_tasks_quantization.json"  # the settings they were quantized with


def read_base_ref(base_dir: str | Path) -> BaseRef:
    """The base a `base` stage output stands for: the folder itself, or the source it names."""
    base_dir = Path(base_dir)
    pointer = base_dir / SOURCE_FILE
    if pointer.exists():
        data = json.loads(pointer.read_text(encoding="utf-8"))
        return resolve_source(data["source"], data.get("revision"))
    return BaseRef(str(base_dir))


def base_identity(ref: BaseRef, base_dir: str | Path) -> dict[str, Any]:
    """What identifies a base model: its reference, and a content hash of its `base` folder
    (the built weights and tokenizer, or the pointer naming a hub id and revision).
    Adapters can be combined only when this hash agrees."""
    return {"name_or_path": ref.name_or_path, "revision": ref.revision,
            "sha256": sha256_folder(base_dir, exclude=("base.json",))}


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


MIN_SHARED_PREFIX = 8  # tokens; below this, one more forward pass costs more than it saves


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


def bitsandbytes_config(quant: QuantConfig | None,
                        device: torch.device = torch.device("cpu")) -> Any:
    """A transformers BitsAndBytesConfig, after checking bitsandbytes can run here."""
    if quant is None:
        return None
    what = f"{quant.bits}-bit quantization" + (f" ({quant.quant_type})" if quant.bits == 4 else "")
    try:
        import bitsandbytes  # noqa: F401  (lazy: only a quantized load needs it)
    except ImportError as error:
        raise ModelError(f"{what} needs bitsandbytes, which cannot be imported here ({error}); "
                         "install it with `pip install 'fin-tasks[quant]'` or set "
                         "`quantization: null` for this model") from None
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True,
                                  llm_int8_skip_modules=list(quant.skip_modules) or None)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(quant, device),
        llm_int8_skip_modules=list(quant.skip_modules) or None)


def load_tokenizer(ref: BaseRef) -> Any:
    """The tokenizer of a base, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.name_or_path, revision=ref.revision)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load the tokenizer of model '{ref.name_or_path}' "
                         f"(revision {ref.revision or 'default'}): {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(config: ModelConfig, ref: BaseRef, labels: tuple[str, ...] = ()) -> Any:
    """Load a base model as configured (quantized or not) onto its device: from the base
    folder's ready-quantized copy when it was made with the same settings on this kind of
    device (seconds), else quantizing the weights as they load (minutes for a 0.5B model on
    a small CPU)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    device = device_for(config)
    quant = bitsandbytes_config(config.quantization, device)
    kwargs: dict[str, Any] = {"revision": ref.revision, "dtype": DTYPES[config.dtype]}
    if quant is not None:
        kwargs |= {"quantization_config": quant, "device_map": {"": str(device)}}
    ready = ready_quantized(config, ref)
    if ready is not None:  # its config carries the quantization settings
        ref, kwargs = ready, {key: v for key, v in kwargs.items() if key != "quantization_config"}
    try:
        if config.kind == "encoder":
            model = AutoModelForSequenceClassification.from_pretrained(
                ref.name_or_path, num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(ref.name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load model '{ref.name_or_path}' "
                         f"(revision {ref.revision or 'default'}): {error}") from error
    if quant is None:
        model.to(device)
        return model
    if device.type == "cpu":
        _keep_cpu_4bit_layout(model)
    if config.kind == "causal":
        compute_in(model, compute_dtype(config.quantization, device))
    return model


VOCAB_CHUNK = 16_384  # output-layer rows upcast at a time: 56 MiB of float32 for a 896-wide model
VOCAB_DTYPE = "fin_tasks_vocab_dtype"  # attribute of the two modules: the dtype they compute in


def compute_in(model: Any, dtype: torch.dtype) -> None:
    """Make a quantized causal LM compute in `dtype`, the dtype of its 4-bit matrix multiplies,
    whatever dtype its unquantized weights are stored in (bfloat16 storage halves the
    vocabulary matrices where a CPU computes in float32).

    The 4-bit layers dequantize to `dtype` (bitsandbytes would use the dtype the weights had
    when quantized: in the backward pass, in a merge, in `predict.dequantize`). The input
    embeddings and the output layer compute in the wider of their stored dtype and `dtype`
    (`vocab_computes_in` can widen it): the embeddings' output is cast to it, and the output
    layer upcasts its weight a block of rows at a time, in the forward and the backward pass,
    so no full-size copy is made or kept for the gradient. Where the stored dtype is `dtype`
    nothing changes."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            state.dtype = dtype
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embeddings is not None:
        embeddings.register_forward_hook(_cast_embeddings)
    if head is not None and head.bias is None and head.weight.is_floating_point() \
            and not hasattr(head.weight, "quant_state"):  # a quantized head computes itself
        head.forward = functools.partial(_vocab_linear, head)
    vocab_computes_in(model, dtype)


def vocab_computes_in(model: Any, dtype: torch.dtype) -> None:
    """Set the dtype the vocabulary matrices compute in (at least their stored one)."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            setattr(module, VOCAB_DTYPE, dtype)


def _vocab_dtype(module: torch.nn.Module) -> torch.dtype:
    return torch.promote_types(module.weight.dtype, getattr(module, VOCAB_DTYPE))


def _cast_embeddings(module: torch.nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.to(_vocab_dtype(module))


def _vocab_linear(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The output layer's logits computed in its vocabulary dtype."""
    dtype, weight = _vocab_dtype(head), head.weight
    hidden = hidden.to(dtype)
    if weight.dtype == dtype:
        return torch.nn.functional.linear(hidden, weight)
    if weight.requires_grad and torch.is_grad_enabled():
        return torch.nn.functional.linear(hidden, weight.to(dtype))
    return _UpcastLinear.apply(hidden, weight)


class _UpcastLinear(torch.autograd.Function):
    """`hidden @ weight.T` in hidden's dtype for a frozen weight stored in another dtype,
    upcasting `VOCAB_CHUNK` rows at a time in both passes: saves the stored weight only."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        out = hidden.new_empty(*hidden.shape[:-1], len(weight))  # no second copy of the logits
        for start in range(0, len(weight), VOCAB_CHUNK):
            rows = weight[start:start + VOCAB_CHUNK]
            out[..., start:start + len(rows)] = hidden @ rows.to(hidden.dtype).T
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        parts = zip(grad.split(VOCAB_CHUNK, dim=-1), weight.split(VOCAB_CHUNK))
        return sum(part @ rows.to(grad.dtype) for part, rows in parts), None


def upcast_vocab(model: Any) -> Any:
    """For inference: the vocabulary matrices that `compute_in` set up, converted once to the
    dtype they compute in, rather than upcast on every forward pass (generation makes one
    per new token; SmolLM2 spent a quarter of its time on it). Other models are unchanged."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and hasattr(module, VOCAB_DTYPE):
            module.weight.data = module.weight.data.to(_vocab_dtype(module))
    return model


def quantization_record(config: ModelConfig) -> dict[str, Any] | None:
    """The settings that decide a quantized model's weights and kernels here: the resolved
    quantization, the dtype of the weights left unquantized (a ready copy keeps the dtype it
    was stored in) and the device kind."""
    resolved = resolved_quantization(config)
    return None if resolved is None else resolved | {"dtype": config.dtype,
                                                      "device": device_for(config).type}


def ready_quantized(config: ModelConfig, ref: BaseRef) -> BaseRef | None:
    """The ready-quantized copy in a base folder, if it matches this entry's settings here."""
    folder = Path(ref.name_or_path) / QUANTIZED_DIR
    record = folder / QUANTIZED_RECORD
    if config.quantization is None or not record.is_file():
        return None
    if json.loads(record.read_text(encoding="utf-8")) != quantization_record(config):
        log.info("%s was quantized with other settings; quantizing at load", folder)
        return None
    return BaseRef(str(folder))


def save_quantized(config: ModelConfig, folder: Path) -> dict[str, Any] | None:
    """Store the 4-bit weights of the causal LM in `folder` in `folder/quantized/` (the
    bitsandbytes serialization), so later stages load them instead of quantizing again.
    Returns the record of the settings used, or None when nothing is stored."""
    if config.kind != "causal" or config.quantization is None or config.quantization.bits != 4:
        return None
    model = load_base(config, BaseRef(str(folder)))
    model.save_pretrained(folder / QUANTIZED_DIR, safe_serialization=True)
    record = quantization_record(config)
    (folder / QUANTIZED_DIR / QUANTIZED_RECORD).write_text(json.dumps(record, indent=2) + "\n",
                                                           encoding="utf-8")
    return record


def _keep_cpu_4bit_layout(model: Any) -> None:
    """Keep bitsandbytes' CPU 4-bit weights in their quantized layout in every mode.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight on its first
    no-grad eval forward and unpacks it again (best effort) whenever a state dict is taken;
    each round trip perturbs the quantization constants and the packed kernel computes
    differently from the training path. One layout keeps the frozen base exactly frozen and
    a reloaded adapter bit-identical (tests/test_train.py checks both).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def dequantized(model: Any, config: ModelConfig) -> Any:
    """The same base with its bitsandbytes layers turned back into plain linear layers, in the
    compute dtype: the weights the quantized model actually computes with, ready to merge an
    adapter into (merging into 4-bit weights would round the update away)."""
    if config.quantization is None:
        return model
    dtype = compute_dtype(config.quantization, device_for(config))
    model = model.dequantize(dtype=dtype)
    return model.to(dtype)


def lora_config(settings: LoraSettings, kind: str) -> Any:
    """A peft LoraConfig from params."""
    from peft import LoraConfig, TaskType

    target = settings.target_modules
    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        layers_to_transform=list(settings.layers_to_transform)
        if settings.layers_to_transform else None,
        use_dora=settings.use_dora, use_rslora=settings.use_rslora,
        task_type=TaskType.SEQ_CLS if kind == "encoder" else TaskType.CAUSAL_LM)


def with_lora(model: Any, config: ModelConfig) -> Any:
    """Wrap a base in fresh LoRA adapters (the base frozen); a no-op for full fine-tuning."""
    if config.lora is None:
        return model
    from peft import get_peft_model

    if config.quantization is not None:
        _freeze_for_kbit_training(model)
    return get_peft_model(model, lora_config(config.lora, config.kind))


def frozen_as_in_training(model: Any, config: ModelConfig) -> Any:
    """A freshly loaded base frozen, with the dtypes training gives it: a quantized base's
    norms and biases in float32 and its vocabulary computing in float32
    (`_freeze_for_kbit_training`). Prediction loads a trained adapter or head onto this, so it
    computes what training computed."""
    if config.quantization is not None:
        _freeze_for_kbit_training(model)
    else:
        model.requires_grad_(False)
    return model


def _freeze_for_kbit_training(model: Any) -> None:
    """Freeze a quantized base and upcast its small half-precision weights (norms, biases) to
    float32, as peft's `prepare_model_for_kbit_training` does, except the vocabulary matrices:
    peft upcasts those too, doubling the largest unquantized weights (2 GiB more for a
    128K-vocabulary 8B model). They stay as stored and compute in float32, as peft's would:
    the same embeddings and logits, without a float32 copy of either."""
    vocabulary = {id(module.weight) for module in (model.get_input_embeddings(),
                                                   model.get_output_embeddings())
                  if module is not None}
    for param in model.parameters():
        param.requires_grad = False
        if (param.dtype in (torch.float16, torch.bfloat16) and id(param) not in vocabulary
                and type(param).__name__ != "Params4bit"):
            param.data = param.data.float()
    vocab_computes_in(model, torch.float32)


def with_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """Attach a saved adapter to a freshly loaded base, for inference (after checking the
    adapter is the one training wrote)."""
    from peft import PeftModel

    check_trained_weights(Path(adapter_dir))
    return PeftModel.from_pretrained(model, str(adapter_dir))


WEIGHTS_KEY = "weights"  # train_config.json: sha256 of every file training wrote as weights


def weight_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each file of a saved adapter or model folder, by name."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def check_trained_weights(folder: Path) -> None:
    """Refuse weights that differ from what `train` wrote (overwritten, truncated, swapped):
    train_config.json beside them records their hashes."""
    record = folder.parent / "train_config.json"
    if not record.exists():
        return
    expected = json.loads(record.read_text(encoding="utf-8")).get(WEIGHTS_KEY, {})
    for name, digest in expected.get(folder.name, {}).items():
        path = folder / name
        if not path.is_file():
            raise ModelError(f"{path} is missing: the trained weights are incomplete; rerun "
                             "`fin-tasks train` for this run (or `dvc checkout`)")
        if sha256_file(path) != digest:
            raise ModelError(f"{path} is not the file `train` wrote (sha256 {digest[:12]} "
                             f"recorded in {record}); it was overwritten or truncated since. "
                             "Restore it with `dvc checkout`, or retrain the run")


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train (adapters and heads, or all for full tuning)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


