"""The `base` stage: one folder per base model that `train` loads through one code path.

A `tiny` entry is built here (weights and tokenizer); a `gguf` entry is checked against its
pinned hash and converted once into a plain safetensors folder (weights, tokenizer, chat
template); any other entry becomes a small `source.json` naming the hub id, local folder or
package, plus its revision, so that DVC sees a change of base and retrains exactly the runs
that use it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fin_tasks.artifacts import atomic_dir, package_versions, write_json
from fin_tasks.config import ModelConfig
from fin_tasks.errors import ModelError

log = logging.getLogger(__name__)


def build_base(name: str, config: ModelConfig, prepared_root: str | Path,
               out_dir: str | Path, tasks: Sequence[str] = ()) -> dict[str, Any]:
    """Write the base folder of model `name` into `out_dir` (atomically): a built or
    converted model (with, for a 4-bit causal LM, its weights ready-quantized in
    `quantized/`), or a pointer to a hub id, folder or package. A tiny model's tokenizer
    learns from the train texts of its `tokenizer_tasks`, else of `tasks` (under
    `prepared_root`)."""
    with atomic_dir(out_dir) as scratch:
        if config.model_kind.baseline:
            info = {"model": name, "baseline": config.kind}
        elif config.tiny is not None:
            from fin_tasks.tiny import build_tiny

            tasks = config.tiny.tokenizer_tasks or tuple(tasks)
            if not tasks:
                raise ModelError(f"models.{name}.tiny: no tokenizer_tasks, and no task whose "
                                 "train texts its tokenizer could learn from")
            build_tiny(config.tiny, _train_texts(Path(prepared_root), tasks), scratch)
            info = {"model": name, "built": "tiny", "tokenizer_tasks": list(tasks)}
        elif config.gguf is not None:
            from fin_tasks.gguf import convert

            info = {"model": name, "built": "gguf", "origin": config.gguf.origin,
                    "license": config.gguf.license, "gguf_sha256": config.gguf.sha256,
                    "converted": convert(config.gguf, scratch)}
        else:
            from fin_tasks.models import SOURCE_FILE, resolve_source

            check_local_source(resolve_source(config.source, config.revision).name_or_path)
            info = {"model": name, "source": config.source, "revision": config.revision}
            write_json(scratch / SOURCE_FILE, info)
        if "built" in info:  # weights that live here are also stored ready-quantized
            from fin_tasks.models import save_quantized

            info["quantized"] = save_quantized(config, scratch)
        info |= {"config": config.model_dump(mode="json"),
                 "packages": package_versions(("fin-tasks", "torch", "transformers", "tokenizers"))}
        write_json(scratch / "base.json", info)
    log.info("base %s ready in %s", name, out_dir)
    return info


LOCAL_PREFIXES = ("/", "./", "../", "~")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")


def check_local_source(name_or_path: str) -> None:
    """A local model folder must hold a config, weights and a tokenizer (said here, at
    `base`, rather than as a hub or sentencepiece error later in `train`); a hub id passes."""
    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        if name_or_path.startswith(LOCAL_PREFIXES):
            raise ModelError(f"model folder {name_or_path} does not exist")
        return  # a hub id, resolved by transformers at load time
    if not folder.is_dir():
        raise ModelError(f"model source {name_or_path} is a file; expected a model folder "
                         "(config.json, weights, tokenizer)")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ModelError(f"model folder {folder} has no {', no '.join(missing)}; point "
                         "`source` at a saved model folder (save_pretrained of the model and "
                         "its tokenizer)")


def _train_texts(prepared_root: Path, tasks: tuple[str, ...]) -> Iterator[str]:
    """Prompt and answer texts of the prepared train splits (the tokenizer's corpus)."""
    for task in tasks:
        with (prepared_root / task / "train.jsonl").open(encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                yield record["query"] + " " + (record.get("answer") or "")
