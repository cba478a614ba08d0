"""What the benchmark scripts share: paths, the offline environment, timed predictions."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def offline() -> None:
    """Import the project from this checkout; no hub, no telemetry, quiet libraries."""
    sys.path.insert(0, str(ROOT))
    for key, value in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def tiny_qlora(task: dict, steps: int, micro_batch_size: int, max_length: int) -> dict:
    """Params of one task and the tiny 4-bit Llama with LoRA, trained `steps` steps."""
    name = next(iter(task))
    return {
        "tasks": task,
        "models": {"tiny": {"kind": "causal", "source": "tiny", "tiny": {},
                            "quantization": {"bits": 4, "compute_dtype": "float32"},
                            "lora": {"r": 8, "alpha": 16}}},
        "train": {"defaults": {"max_steps": steps, "micro_batch_size": micro_batch_size,
                               "lr": 3e-3, "max_length": max_length, "eval_every": 10_000,
                               "checkpoint_every": 10_000},
                  "runs": {"tiny": {"model": "tiny", "task": name}}},
        "evaluate": {"bootstrap": 0, "bertscore_model": None},
    }


def timed_predictions(raw: dict, modes: list[tuple[str, str, int]], prepared: Path,
                      out: Path) -> list[tuple[str, dict, dict]]:
    """For each (label, mode, batch size): predict valid with the trained adapter, score it
    with the `evaluate` stage; (label, timing, metrics) rows."""
    from fin_tasks.config import parse_params
    from fin_tasks.evaluate import evaluate_run
    from fin_tasks.runs import resolve_run
    from fin_tasks.predict import predict_run

    rows = []
    for label, mode, batch in modes:
        raw["predict"] = {"mode": mode, "batch_size": batch, "variants": ["adapter"],
                          "splits": ["valid"]}
        params = parse_params(raw)
        folder = out / f"predict-{mode}-{batch}"
        run = resolve_run(params, "tiny")
        info = predict_run(run, prepared, out / "base", out / "train", folder)
        scored = evaluate_run(run, prepared, folder, out / f"eval-{mode}-{batch}")
        rows.append((label, info["variants"]["adapter"]["valid"],
                     scored["metrics"]["adapter"]["valid"]))
    return rows


def prepare_and_train(raw: dict, out: Path, valid: list[dict[str, Any]] | None = None,
                      rows: int | None = None) -> Path:
    """Prepare the task, replace (or cut) its valid split, build the tiny base, train it."""
    from fin_tasks.artifacts import read_jsonl, write_jsonl
    from fin_tasks.base import build_base
    from fin_tasks.config import parse_params
    from fin_tasks.prepare import prepare_task
    from fin_tasks.runs import resolve_run
    from fin_tasks.train import train

    params = parse_params(raw)
    name = next(iter(params.tasks))
    prepared = out / "prepare" / name
    prepare_task(name, params.tasks[name], params.prepare, prepared)
    valid = valid if valid is not None else read_jsonl(prepared / "valid.jsonl")[:rows]
    write_jsonl(prepared / "valid.jsonl", valid)
    build_base("tiny", params.models["tiny"], out / "prepare", out / "base",
               tuple(params.tasks))
    train(resolve_run(params, "tiny"), prepared, out / "base", out / "train",
          checkpoint_root=out / "checkpoints")
    return prepared


def real_inputs(config: str, task: str, model: str, work: Path) -> tuple[Any, Path, Path]:
    """A config's params, its task prepared under `work` and the model's converted base (the
    copy bench/train_real.py built when there is one, else built under `work`): what the
    real-LLM prediction benchmarks start from."""
    from fin_tasks.base import build_base
    from fin_tasks.config import load_params
    from fin_tasks.prepare import prepare_task

    params = load_params(ROOT / config)
    prepared = work / "prepare" / task
    if not (prepared / "manifest.json").exists():
        prepare_task(task, params.tasks[task], params.prepare, prepared)
    built = ROOT / "bench-out" / "train-real" / "base" / model
    base = built if (built / "base.json").exists() else work / "base" / model
    if not (base / "base.json").exists():
        build_base(model, params.models[model], work / "prepare", base)
    return params, prepared, base
