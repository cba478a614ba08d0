"""Trained weights are what training wrote: their sha256, recorded in train_config.json, is
checked before any later stage loads them."""

from __future__ import annotations

import json
from pathlib import Path

from fin_tasks.artifacts import sha256_file
from fin_tasks.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"


def canonical_adapter_configs(folder: Path, base_name: str) -> None:
    """Write every adapter_config.json under `folder` (and the model card peft writes beside
    it) the same way on every run and machine: lists in sorted order (peft keeps
    `target_modules` as a set, saved in the order of each process's string hashing), and an
    absolute base path (a package's folder in this machine's venv) as `base_name`."""
    for path in sorted(folder.rglob(ADAPTER_CONFIG)):
        config = json.loads(path.read_text(encoding="utf-8"))
        for key in ("target_modules", "modules_to_save"):
            if isinstance(config.get(key), list):
                config[key] = sorted(config[key])
        recorded = config.get("base_model_name_or_path")
        card = path.with_name("README.md")
        if recorded and Path(recorded).is_absolute():
            config["base_model_name_or_path"] = base_name
            if card.exists():
                card.write_text(card.read_text(encoding="utf-8").replace(recorded, base_name),
                                encoding="utf-8")
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
