"""Benchmark the `predict` stage on the real Task 1 valid set with the tiny causal LM.

Builds the tiny Llama (tokenizer trained on the Task 1 train split), fine-tunes it with
QLoRA (4-bit NF4) for a few steps so that it answers with a label and stops, then times
(a) per-example greedy generation, (b) batched length-sorted generation and (c) choice
scoring in one forward pass, each scored by the `evaluate` stage. Prints one table.

    python bench/predict_task1.py [--rows 969] [--steps 120] [--out bench-out/predict1]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "finarg_ecc"
sys.path.insert(0, str(ROOT))
for key, value in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"
                   }.items():
    os.environ.setdefault(key, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/predict1")
    parser.add_argument("--rows", type=int, default=969, help="valid rows to predict")
    parser.add_argument("--steps", type=int, default=120, help="QLoRA steps before timing")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs the real Task 1 data")

    from fin_tasks.artifacts import read_jsonl, write_jsonl
    from fin_tasks.base import build_base
    from fin_tasks.config import parse_params
    from fin_tasks.evaluate import evaluate_run
    from fin_tasks.predict import predict_run
    from fin_tasks.prepare import prepare_task
    from fin_tasks.train import train

    out = Path(args.out)
    raw = {
        "tasks": {"finarg_ecc": {"type": "finarg_ecc", "data": str(DATA), "splits": {
            "train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}}},
        "models": {"tiny": {"kind": "causal", "source": "tiny", "tiny": {},
                            "quantization": {"bits": 4, "compute_dtype": "float32"},
                            "lora": {"r": 8, "alpha": 16}}},
        "train": {"defaults": {"max_steps": args.steps, "micro_batch_size": 16, "lr": 3e-3,
                               "max_length": 256, "eval_every": 10_000,
                               "checkpoint_every": 10_000},
                  "runs": {"tiny": {"model": "tiny", "task": "finarg_ecc"}}},
        "evaluate": {"bootstrap": 0, "bertscore_model": None},
    }
    params = parse_params(raw)
    prepared = out / "prepare" / "finarg_ecc"
    prepare_task("finarg_ecc", params.tasks["finarg_ecc"], params.prepare, prepared)
    valid = read_jsonl(prepared / "valid.jsonl")[: args.rows]
    write_jsonl(prepared / "valid.jsonl", valid)
    build_base("tiny", params, out / "prepare", out / "base")
    train("tiny", params, prepared, out / "base", out / "train",
          checkpoint_root=out / "checkpoints")
    rows = []
    for name, mode, batch in (("(a) generate, one by one", "generate", 1),
                              ("(b) generate, batched by length", "generate", args.batch_size),
                              ("(c) score choices, one forward", "score", args.batch_size)):
        raw["predict"] = {"mode": mode, "batch_size": batch, "variants": ["adapter"],
                          "splits": ["valid"]}
        params = parse_params(raw)
        folder = out / f"predict-{mode}-{batch}"
        info = predict_run("tiny", params, prepared, out / "base", out / "train", folder)
        scored = evaluate_run("tiny", params, prepared, folder, out / f"eval-{mode}-{batch}")
        timing = info["variants"]["adapter"]["valid"]
        rows.append((name, timing, scored["metrics"]["adapter"]["valid"]))
    first = rows[0][1]["examples_per_s"]
    print(f"\n{len(valid)} Task 1 valid rows, tiny Llama (4-bit NF4 + LoRA, {args.steps} steps)\n")
    print("| mode | seconds | examples/s | speed-up vs (a) | weighted F1 | missing |")
    print("|---|---|---|---|---|---|")
    for name, timing, metrics in rows:
        print(f"| {name} | {timing['seconds']:.1f} | {timing['examples_per_s']:.1f} | "
              f"{timing['examples_per_s'] / first:.1f}x | {metrics['f1_weighted']:.4f} | "
              f"{metrics['missing_rate']:.3f} |")


if __name__ == "__main__":
    main()
