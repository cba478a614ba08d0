"""Model loading: a base (quantized or not) onto its device, with LoRA, an adapter or a head.

The rest of the library receives a loaded model. QLoRA is a loading option (a quantized
base plus LoRA adapters), not a different trainer. `bitsandbytes` and `peft` are imported
here, lazily, only when asked for.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fin_tasks.artifacts import sha256_folder
from fin_tasks.config import LoraSettings, ModelConfig, QuantConfig
from fin_tasks.devices import DTYPES, compute_dtype, device_for
from fin_tasks.errors import ModelError
from fin_tasks.modelkinds import model_kind
from fin_tasks.sources import BaseRef, resolve_source
from fin_tasks.vocab import compute_in, vocab_computes_in
from fin_tasks.weights import check_trained_weights

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
    Adapters can be combined only when this hash agrees. A package's weights are named by
    their source (`package:<module>`), not by their folder in this machine's venv."""
    pointer = Path(base_dir) / SOURCE_FILE
    name = ref.name_or_path
    if Path(name).is_absolute() and pointer.exists():
        name = json.loads(pointer.read_text(encoding="utf-8"))["source"]
    return {"name_or_path": name, "revision": ref.revision,
            "sha256": sha256_folder(base_dir, exclude=("base.json",))}


# bitsandbytes, when imported on a CPU with AVX512-BF16, asks the `kernels` package for an
# optional 4-bit matmul kernel from the Hugging Face hub. Offline that fails and says so twice
# (kernels' "Skipping publisher trust check ... offline mode", bitsandbytes' "Failed to load
# CPU gemm_4bit_forward"), once per process, and bitsandbytes' own CPU kernel runs instead.
HUB_KERNEL_LOGGERS = ("kernels", "bitsandbytes.backends.cpu.ops")


@contextlib.contextmanager
def _hub_kernel_notices_quiet() -> Iterator[None]:
    """Those two loggers at ERROR for the one import that triggers them, then as they were."""
    loggers = [logging.getLogger(name) for name in HUB_KERNEL_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def import_peft() -> None:
    """Import peft (and with it bitsandbytes, which peft loads when installed) with those
    notices quiet; later `from peft import ...` lines then find it loaded."""
    with _hub_kernel_notices_quiet():
        import peft  # noqa: F401


def bitsandbytes_config(quant: QuantConfig | None,
                        device: torch.device = torch.device("cpu")) -> Any:
    """A transformers BitsAndBytesConfig, after checking bitsandbytes can run here."""
    if quant is None:
        return None
    what = f"{quant.bits}-bit quantization" + (f" ({quant.quant_type})" if quant.bits == 4 else "")
    try:
        with _hub_kernel_notices_quiet():
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
        if config.model_kind.own_head:
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
    if config.model_kind.causal:
        compute_in(model, compute_dtype(config.quantization, device))
    return model


def quantization_record(config: ModelConfig) -> dict[str, Any] | None:
    """The settings that decide a quantized model's stored weights: the quantization (its
    compute dtype apart: that is set at load, see `compute_in`), the dtype of the weights left
    unquantized (a ready copy keeps the dtype it was stored in) and the device kind."""
    if config.quantization is None:
        return None
    return config.quantization.model_dump(mode="json", exclude={"compute_dtype"}) | {
        "dtype": config.dtype, "device": device_for(config).type}


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
    if not config.model_kind.causal or config.quantization is None or \
            config.quantization.bits != 4:
        return None
    # stored with one compute dtype whatever `auto` gives here, so that the base stage writes
    # the same bytes on CPUs with and without bf16; each load sets its own (`compute_in`)
    stored = config.model_copy(update={"quantization": config.quantization.model_copy(
        update={"compute_dtype": "float32"})})
    model = load_base(stored, BaseRef(str(folder)))
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
    import_peft()
    from peft import LoraConfig, TaskType

    target = settings.target_modules
    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=target if isinstance(target, str) else list(target),
        layers_to_transform=list(settings.layers_to_transform)
        if settings.layers_to_transform else None,
        use_dora=settings.use_dora, use_rslora=settings.use_rslora,
        task_type=getattr(TaskType, model_kind(kind).peft_task_type))


def with_lora(model: Any, config: ModelConfig) -> Any:
    """Wrap a base in fresh LoRA adapters (the base frozen); a no-op for full fine-tuning."""
    if config.lora is None:
        return model
    import_peft()
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
    import_peft()
    from peft import PeftModel

    check_trained_weights(Path(adapter_dir))
    return PeftModel.from_pretrained(model, str(adapter_dir))


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train (adapters and heads, or all for full tuning)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


