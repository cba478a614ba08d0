"""Benchmark the `predict` stage on the real Task 1 valid set with the tiny causal LM.

Builds the tiny Llama (tokenizer trained on the Task 1 train split), fine-tunes it with
QLoRA (4-bit NF4) for a few steps so that it answers with a label and stops, then times
(a) per-example greedy generation, (b) batched length-sorted generation and (c) choice
scoring in one forward pass, each scored by the `evaluate` stage. Prints one table.

    python bench/predict_task1.py [--rows 969] [--steps 120] [--out bench-out/predict1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import SHARED, offline, prepare_and_train, timed_predictions, tiny_qlora

DATA = SHARED / "finarg_ecc"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/predict1")
    parser.add_argument("--rows", type=int, default=969, help="valid rows to predict")
    parser.add_argument("--steps", type=int, default=120, help="QLoRA steps before timing")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--profile", action="store_true",
                        help="also profile (a) and (c) with the torch profiler")
    args = parser.parse_args()
    offline()
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs the real Task 1 data")
    out = Path(args.out)
    raw = tiny_qlora({"finarg_ecc": {"type": "finarg_ecc", "data": str(DATA), "splits": {
        "train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}}},
        args.steps, micro_batch_size=16, max_length=256)
    prepared = prepare_and_train(raw, out, rows=args.rows)
    rows = timed_predictions(raw, [("(a) generate, one by one", "generate", 1),
                                   ("(b) generate, batched by length", "generate",
                                    args.batch_size),
                                   ("(c) score choices, one forward", "score", args.batch_size)],
                             prepared, out)
    if args.profile:
        profile_modes(raw, prepared, out, args.batch_size)
    first = rows[0][1]["examples_per_s"]
    print(f"\n{rows[0][2]['rows']} Task 1 valid rows, tiny Llama (4-bit NF4 + LoRA, "
          f"{args.steps} steps)\n")
    print("| mode | seconds | examples/s | speed-up vs (a) | weighted F1 | missing |")
    print("|---|---|---|---|---|---|")
    for name, timing, metrics in rows:
        print(f"| {name} | {timing['seconds']:.1f} | {timing['examples_per_s']:.1f} | "
              f"{timing['examples_per_s'] / first:.1f}x | {metrics['f1_weighted']:.4f} | "
              f"{metrics['missing_rate']:.3f} |")


def profile_modes(raw: dict, prepared: Path, out: Path, batch_size: int) -> None:
    """Where (a) and (c) spend their time, on the first 160 valid rows: top operators."""
    from torch.profiler import ProfilerActivity, profile

    from fin_tasks.artifacts import read_jsonl
    from fin_tasks.config import parse_params
    from fin_tasks.models import BaseRef, load_tokenizer
    from fin_tasks.predict import generate, load_variant, score_choices

    params = parse_params(raw)
    config = params.models["tiny"]
    model = load_variant("adapter", config, ("premise", "claim"), out / "base", out / "train")
    tokenizer = load_tokenizer(BaseRef(str(out / "train" / "tokenizer")))
    prompts = [r["query"] for r in read_jsonl(prepared / "valid.jsonl")[:160]]
    for name, call in (("(a) generate, one by one",
                        lambda: generate(model, tokenizer, prompts, 20, 1)),
                       ("(c) score choices",
                        lambda: score_choices(model, tokenizer, prompts, ["premise", "claim"],
                                              batch_size))):
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            call()
        print(f"\n{name}: torch profiler, 160 rows\n")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
