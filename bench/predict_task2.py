"""Benchmark Task 2 (EDTSum) prediction: per-example against batched length-sorted generation.

Builds the tiny Llama, tunes it with QLoRA on the demo EDTSum train split for a few steps,
then summarizes the real EDTSum records in ../shared/data/edtsum/sample.jsonl (12 articles
of about 600 words; `--repeat` repeats them for steadier timings) (a) one by one and
(b) in length-sorted, left-padded batches, each scored by the `evaluate` stage (ROUGE).

    python bench/predict_task2.py [--repeat 4] [--steps 60] [--out bench-out/predict2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import ROOT, SHARED, offline, prepare_and_train, timed_predictions, tiny_qlora

SAMPLE = SHARED / "edtsum" / "sample.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/predict2")
    parser.add_argument("--repeat", type=int, default=4, help="copies of the 12 articles")
    parser.add_argument("--steps", type=int, default=60, help="QLoRA steps before timing")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    offline()
    if not SAMPLE.exists():
        sys.exit(f"{SAMPLE} not found: this benchmark needs the real EDTSum sample")
    from fin_tasks.artifacts import read_jsonl

    out = Path(args.out)
    raw = tiny_qlora({"edtsum": {"type": "edtsum", "data": str(ROOT / "data/demo/edtsum"),
                                 "splits": {"train": "train.jsonl", "test": "test.jsonl"}}},
                     args.steps, micro_batch_size=8, max_length=512)
    sample = read_jsonl(SAMPLE)  # already in the organizers' record layout
    valid = [r | {"id": f"{r['id']}-{k}"} for k in range(args.repeat) for r in sample]
    prepared = prepare_and_train(raw, out, valid=valid)
    rows = timed_predictions(raw, [("(a) generate, one by one", "generate", 1),
                                   ("(b) generate, batched by length", "generate",
                                    args.batch_size)], prepared, out)
    first = rows[0][1]["examples_per_s"]
    print(f"\n{len(valid)} EDTSum articles ({len(sample)} real ones x {args.repeat}), tiny Llama "
          f"(4-bit NF4 + LoRA, {args.steps} steps), up to 128 new tokens\n")
    print("| mode | seconds | examples/s | speed-up vs (a) | ROUGE-1 | words per summary |")
    print("|---|---|---|---|---|---|")
    for name, timing, metrics in rows:
        print(f"| {name} | {timing['seconds']:.2f} | {timing['examples_per_s']:.2f} | "
              f"{timing['examples_per_s'] / first:.1f}x | {metrics['rouge1']:.4f} | "
              f"{metrics['words_mean']:.1f} |")


if __name__ == "__main__":
    main()
