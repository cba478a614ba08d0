"""Benchmark EDTSum generation with a real LLM, SmolLM2-135M-Instruct zero-shot.

On the real 12-article EDTSum sample of `configs/cpu-llms.yaml`, with the base as `predict`
loads it (4-bit NF4, dequantized once at load), times greedy summaries (a) one article at a
time, (b) batched and capped in padded tokens (`predict.batch_tokens` 4096, the default) and
(c) batched without the cap, checks that every path writes the same summaries, and scores
(a) with ROUGE. Prints one table; `--json PATH` also writes the figures.

Builds what it needs under bench-out/edtsum-smollm2 (unless bench/train_real.py already
converted the base):
    python bench/predict_edtsum_smollm2.py [--batch-size 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, offline, real_inputs

MODEL, TASK = "smollm2", "edtsum"
WORK = ROOT / "bench-out" / "edtsum-smollm2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    offline()
    from fin_tasks.artifacts import read_jsonl

    params, prepared, base = real_inputs("configs/cpu-llms.yaml", TASK, MODEL, WORK)
    records = read_jsonl(prepared / "valid.jsonl")
    rows, load_s = measure(params, base, records, args.batch_size)
    report(params, rows, records, load_s, args.batch_size, args.json)


def measure(params, base: Path, records: list[dict], batch_size: int) -> tuple[dict, float]:
    """Each path's seconds and summaries, from one loaded model."""
    from fin_tasks.models import BaseRef, load_tokenizer
    from fin_tasks.predict import generate, load_variant
    from fin_tasks.prompting import render_prompt
    from fin_tasks.tasks import task_from_config

    config = params.models[MODEL]
    task = task_from_config(TASK, params.tasks[TASK])
    tokenizer = load_tokenizer(BaseRef(str(base)))
    prompts = [render_prompt(r, tokenizer, config.chat_template) for r in records]
    started = time.perf_counter()
    model = load_variant("base", config, task.labels, base, base, dequantize=True).eval()
    load_s = time.perf_counter() - started
    tokens = task.max_new_tokens
    paths = {"(a) one by one": lambda: generate(model, tokenizer, prompts, tokens, 1),
             "(b) batched, capped at 4096 padded tokens":
                 lambda: generate(model, tokenizer, prompts, tokens, batch_size, 4096),
             "(c) batched, uncapped":
                 lambda: generate(model, tokenizer, prompts, tokens, batch_size, None)}
    rows = {}
    for name, call in paths.items():
        started = time.perf_counter()
        outputs = call()
        rows[name] = {"seconds": round(time.perf_counter() - started, 2), "outputs": outputs}
    return rows, load_s


def report(params, rows: dict[str, dict], records: list[dict], load_s: float,
           batch_size: int, json_path: str | None) -> None:
    from fin_tasks.tasks import task_from_config

    task = task_from_config(TASK, params.tasks[TASK])
    single = "(a) one by one"
    scored = task.kind.score(task, records, [{"output": o} for o in rows[single]["outputs"]],
                             params.evaluate.model_copy(update={"bootstrap": 0,
                                                                "bertscore_model": None}))
    print(f"\n{len(records)} EDTSum sample articles, SmolLM2-135M-Instruct zero-shot (4-bit "
          f"NF4, dequantized at load in {load_s:.0f} s), batch {batch_size}, "
          f"{task.max_new_tokens} new tokens at most; ROUGE-1 of (a) {scored['rouge1']:.3f}\n")
    print("| path | seconds | articles/s | vs (a) | same summaries as (a) |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        same = sum(a == b for a, b in zip(row["outputs"], rows[single]["outputs"]))
        print(f"| {name} | {row['seconds']:.1f} | {len(records) / row['seconds']:.3f} | "
              f"{rows[single]['seconds'] / row['seconds']:.2f}x | {same}/{len(records)} |")
    figures = {"articles": len(records),
               "edtsum_batched_vs_single_smollm2":
                   rows[single]["seconds"] / rows["(b) batched, capped at 4096 padded tokens"]
                   ["seconds"],
               "edtsum_uncapped_vs_single_smollm2":
                   rows[single]["seconds"] / rows["(c) batched, uncapped"]["seconds"],
               "rouge1_single": scored["rouge1"]}
    print("\n" + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
