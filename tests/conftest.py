"""Shared fixtures: offline environment, the project root, tiny raw files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1",
                   "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FINARG_CHOICES = ["premise", "claim"]


def finarg_record(number: int, label: str = "premise", text: str | None = None) -> dict:
    """One Task 1 record in the organizers' layout."""
    text = text if text is not None else f"Sentence number {number} about revenue."
    return {"id": f"r{number}", "query": f"Q\nText: {text}\nAnswer:", "answer": label,
            "text": text, "choices": FINARG_CHOICES, "gold": FINARG_CHOICES.index(label)}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def finarg_dir(tmp_path: Path) -> Path:
    """A ten-row Task 1 train file and a four-row unlabeled test file."""
    labels = ["premise", "claim"] * 5
    write_jsonl(tmp_path / "raw" / "train.jsonl",
                [finarg_record(n, label) for n, label in enumerate(labels)])
    test = [{k: v for k, v in finarg_record(100 + n).items() if k not in ("answer", "gold")}
            for n in range(4)]
    write_jsonl(tmp_path / "raw" / "test.jsonl", test)
    return tmp_path / "raw"
