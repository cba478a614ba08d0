"""The `prepare` stage: raw rows in, validated train/valid/test splits and a manifest out."""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fin_tasks.artifacts import atomic_dir, package_versions, sha256_file, sha256_tree, write_jsonl
from fin_tasks.artifacts import write_json
from fin_tasks.config import PrepareConfig, TaskConfig
from fin_tasks.errors import DataError
from fin_tasks.readers import HUB_PREFIX, RawRow, read_rows, split_location
from fin_tasks.schemas import records_schema, validate_rows
from fin_tasks.tasks import Task, has_numeric, task_from_config

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_VALUE_KINDS = {int: "number", float: "number", bool: "boolean", list: "array", dict: "object",
               type(None): "null"}
_SUBJECT_SUFFIX = re.compile(r"_(dev|val|valid|test|train)$")


def prepare_task(name: str, config: TaskConfig, settings: PrepareConfig,
                 out_dir: str | Path) -> dict[str, Any]:
    """Prepare one task into `out_dir` (written atomically); returns its manifest."""
    task = task_from_config(name, config)
    frames: dict[str, pd.DataFrame] = {}
    origin: dict[str, str] = {}
    for split in SPLITS:
        file = getattr(config.splits, split)
        if file is not None:
            frames[split] = load_split(task, split_location(config.data, file), config.revision,
                                       split)
            origin[split] = split_location(config.data, file)
    for split, fraction in (("test", settings.test_fraction), ("valid", settings.valid_fraction)):
        if split not in frames:
            frames["train"], frames[split] = carve(frames["train"], fraction, settings.seed,
                                                   stratify=bool(task.labels),
                                                   unlabeled=not task.kind.labeled)
            origin[split] = f"carved from train ({fraction:.0%}, seed {settings.seed})"
    frames = {split: frames[split] for split in SPLITS}
    leakage, dropped = check_leakage(frames, settings.on_leakage)
    for split, count in (config.sample or {}).items():
        if count < len(frames[split]):
            origin[split] += (f"; seeded subset of {count} of {len(frames[split])} rows "
                              f"(seed {settings.seed})")
            frames[split] = subsample(task, frames[split], count, settings.seed)
    records = {split: to_records(task, frame) for split, frame in frames.items()}
    for split, rows in records.items():
        records_schema(task, _labeled(frames[split])).validate(
            pd.DataFrame(rows).astype({"gold": "Int64"} if task.labels else {}))
    manifest = _manifest(task, config, settings, frames, origin, leakage, dropped)
    with atomic_dir(out_dir) as scratch:
        for split, rows in records.items():
            write_jsonl(scratch / f"{split}.jsonl", rows)
        manifest["outputs"] = {f"{split}.jsonl": sha256_file(scratch / f"{split}.jsonl")
                               for split in records}
        write_json(scratch / "manifest.json", manifest)
    log.info("prepared %s: %s", name,
             ", ".join(f"{s} {len(f)}" for s, f in frames.items()))
    return manifest


def load_split(task: Task, location: str, revision: str | None = None,
               split: str = "train") -> pd.DataFrame:
    """Read and validate one split into canonical rows (id, text, answer, ...)."""
    rows = read_rows(location, task.required_fields, revision)
    frame = pd.DataFrame([_canonical(task, row, split, position)
                          for position, row in enumerate(rows, start=1)])
    labeled = frame["answer"].notna()
    if labeled.any() and not labeled.all():
        bad = frame[~labeled].iloc[0]
        raise DataError(bad["_source"], int(bad["_line"]), task.label_field, "missing label",
                        "a label on every row, since other rows of this split have one",
                        unit=bad["_unit"])
    return validate_rows(frame, task, labeled=bool(labeled.all()))


def _canonical(task: Task, row: RawRow, split: str, position: int) -> dict[str, Any]:
    """One raw row in canonical form, keeping where it came from.

    Without an id column, a row's id is its 1-based position in its split, whatever the
    file's layout (a one-line JSON array holds every row on line 1)."""
    fields = row.fields
    _check_field_types(task, row)
    answer = fields.get(task.label_field) if task.label_field else None
    if answer is not None and not (isinstance(answer, float) and np.isnan(answer)):
        answer = str(answer).strip()
        answer = task.label_names.get(answer, answer)
    else:
        answer = None
    if answer is not None and task.gold_field in fields and answer in task.labels:
        gold = fields[task.gold_field]
        if gold != task.labels.index(answer):
            raise DataError(row.source, row.line, task.gold_field,
                            f"gold {gold!r} disagrees with label '{answer}'",
                            f"gold {task.labels.index(answer)} (the label's index in "
                            f"{list(task.labels)})", unit=row.unit)
    row_id = str(fields[task.id_field]) if task.id_field else f"{split}-{position}"
    canonical = {"id": row_id, "text": fields[task.text_field],
                 "answer": answer, "_source": row.source, "_line": row.line, "_unit": row.unit}
    if task.option_fields:
        canonical["options"] = tuple(str(fields[name]) for name in task.option_fields)
        canonical["subject"] = _subject(row.source) if task.subject_from_file else ""
        if task.subject_from_file:
            canonical["id"] = f"{canonical['subject']}-{canonical['id']}"
    return canonical


def _check_field_types(task: Task, row: RawRow) -> None:
    """Text must be a string (a number there is a wrong column, not text); ids and options
    may also be integers; no field may hold a NUL byte (a sign of a corrupt or binary file)."""
    for name in task.required_fields:
        value = row.fields[name]
        allowed = (str,) if name == task.text_field else (str, int)
        if not isinstance(value, allowed) or isinstance(value, bool):
            kind = _VALUE_KINDS.get(type(value), type(value).__name__)
            raise DataError(row.source, row.line, name, f"a {kind}",
                            "a string" if name == task.text_field else "a string or an integer",
                            unit=row.unit)
    for name, value in row.fields.items():
        if isinstance(value, str) and "\x00" in value:
            raise DataError(row.source, row.line, name,
                            f"a NUL byte at character {value.index(chr(0)) + 1}",
                            "text without NUL bytes (is the file corrupt or binary?)",
                            unit=row.unit)


def _subject(source: str) -> str:
    """FinEval subject from a file name: `accounting_val.csv` -> `accounting`."""
    return _SUBJECT_SUFFIX.sub("", Path(source).stem)


def _labeled(frame: pd.DataFrame) -> bool:
    return bool(frame["answer"].notna().all())


def carve(frame: pd.DataFrame, fraction: float, seed: int, stratify: bool,
          unlabeled: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off `fraction` of rows (per label when stratified), reproducibly for a seed.
    Only a corpus (`unlabeled`: plain text has no labels) may be carved without labels."""
    if not unlabeled and not _labeled(frame):
        raise DataError(frame["_source"].iloc[0], None, None,
                        "cannot carve a split from unlabeled rows", "a labeled train split")
    rng = np.random.default_rng(seed)
    groups = frame.groupby("answer").indices if stratify else {"": np.arange(len(frame))}
    target = max(1, round(len(frame) * fraction))
    if target >= len(frame):
        raise DataError(frame["_source"].iloc[0], None, None,
                        f"{len(frame)} rows are too few to carve a {fraction:.0%} split",
                        "at least two rows, or the split given explicitly")
    quotas = _allocate(target, {key: len(rows) for key, rows in groups.items()})
    taken: list[int] = []
    for key, positions in sorted(groups.items()):
        taken.extend(rng.permutation(positions)[:quotas[key]].tolist())
    mask = np.zeros(len(frame), dtype=bool)
    mask[taken] = True
    return frame[~mask], frame[mask]


def subsample(task: Task, frame: pd.DataFrame, count: int, seed: int) -> pd.DataFrame:
    """`count` rows of `frame`, seeded, stratified by label (classification), by numeric
    content (multiple choice) or not at all, in their original order."""
    if task.option_fields:
        keys = pd.Series([has_numeric(t, *o) for t, o in zip(frame["text"], frame["options"])],
                         index=frame.index).astype(str)
    elif task.labels and _labeled(frame):
        keys = frame["answer"]
    else:
        keys = pd.Series("", index=frame.index)
    groups = {key: np.flatnonzero((keys == key).to_numpy()) for key in sorted(set(keys))}
    quotas = _allocate(count, {key: len(rows) for key, rows in groups.items()})
    rng = np.random.default_rng([seed, count])
    taken = sorted(i for key, rows in groups.items()
                   for i in rng.permutation(rows)[:quotas[key]].tolist())
    return frame.iloc[taken]


def _allocate(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Share `total` among groups in proportion to their sizes (largest remainder)."""
    count = sum(sizes.values())
    exact = {key: total * size / count for key, size in sizes.items()}
    quotas = {key: int(value) for key, value in exact.items()}
    by_remainder = sorted(sizes, key=lambda key: (quotas[key] - exact[key], key))
    for key in by_remainder[: total - sum(quotas.values())]:
        quotas[key] += 1
    return quotas


def check_leakage(frames: dict[str, pd.DataFrame], policy: str,
                  ) -> tuple[dict[str, Any], dict[str, int]]:
    """Exact-duplicate texts shared by train and valid/test: report, fail or drop from train."""
    train = frames["train"]
    key = train["text"].str.strip()
    report: dict[str, Any] = {}
    dropped: Counter[str] = Counter()
    for split in ("valid", "test"):
        shared = key.isin(set(frames[split]["text"].str.strip()))
        report[f"train_{split}"] = {"rows": int(shared.sum()),
                                    "train_ids": train.loc[shared, "id"].head(20).tolist()}
        if not shared.any():
            continue
        first = train[shared].iloc[0]
        message = (f"{int(shared.sum())} train text(s) also appear in {split}, "
                   f"first: '{first['text'][:60]}'")
        if policy == "error":
            raise DataError(first["_source"], int(first["_line"]), "text", message,
                            "no exact-duplicate text shared between splits "
                            "(or prepare.on_leakage: warn/drop)", unit=first["_unit"])
        if policy == "drop":
            dropped[f"text also in {split}"] += int(shared.sum())
            train, key = train[~shared], key[~shared]
        log.warning("%s (on_leakage=%s)", message, policy)
    frames["train"] = train
    return report, dict(dropped)


def to_records(task: Task, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Canonical rows in the organizers' record layout (query, answer, choices, gold)."""
    records = []
    for row in frame.to_dict("records"):
        options = tuple(row.get("options") or ())
        record: dict[str, Any] = {
            "id": row["id"],
            "query": task.query(row["text"], options, row.get("subject", "")),
            "answer": row["answer"],
            "text": row["text"],
        }
        if task.labels:
            record["choices"] = list(task.labels)
            record["gold"] = None if row["answer"] is None else task.labels.index(row["answer"])
        if task.option_fields:
            record |= {"options": list(options), "subject": row["subject"],
                       "numeric": has_numeric(row["text"], *options)}
        records.append(record)
    return records


def _manifest(task: Task, config: TaskConfig, settings: PrepareConfig,
              frames: dict[str, pd.DataFrame], origin: dict[str, str],
              leakage: dict[str, Any], dropped: dict[str, int]) -> dict[str, Any]:
    """What the stage produced and from what: counts, hashes, config, versions."""
    splits = {}
    for split, frame in frames.items():
        counts = Counter(frame["answer"].dropna())
        duplicated = frame["text"].str.strip().duplicated(keep=False)
        splits[split] = {
            "rows": len(frame),
            "labeled": _labeled(frame),
            "labels": dict(sorted(counts.items())) if task.labels else {},
            "origin": origin[split],
            "duplicate_text_rows": int(duplicated.sum()),
        }
        if task.option_fields:
            numeric = [has_numeric(t, *o) for t, o in zip(frame["text"], frame["options"])]
            splits[split]["numeric_rows"] = int(sum(numeric))
    return {
        "task": task.name,
        "type": config.type,
        "kind": task.kind.name,
        "splits": splits,
        "dropped": {"rows": sum(dropped.values()), "reasons": dropped},
        "leakage": leakage,
        "sources": _source_hashes(config),
        "config": {"task": config.model_dump(mode="json"),
                   "prepare": settings.model_dump(mode="json")},
        "packages": package_versions(("fin-tasks", "pandas", "pandera", "datasets")),
    }


def _source_hashes(config: TaskConfig) -> dict[str, str]:
    """Content hashes of the raw inputs (a hub source is identified by its revision)."""
    if config.data.startswith(HUB_PREFIX):
        return {config.data: f"revision {config.revision or 'latest (unpinned)'}"}
    hashes: dict[str, str] = {}
    for split in SPLITS:
        file = getattr(config.splits, split)
        if file is not None:
            hashes |= sha256_tree(Path(config.data) / file)
    return hashes
