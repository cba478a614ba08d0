"""Benchmark FinEval prediction with a real Chinese-capable LLM, Qwen2.5-Coder-0.5B-Instruct.

On the first `--questions` questions of the seeded FinEval val sample of
`configs/numllm-qwen.yaml`, with the zero-shot base as `predict` loads it (4-bit NF4,
dequantized once at load: `predict.dequantize`), times (a) greedy generation one question at a
time, (b) batched generation and (c) choice scoring (the four options' log-likelihoods, the
shared prompt prefix computed once), and scores each against the answer key. Prints one
table; `--json PATH` also writes the figures (questions/s, ratios).

Builds what it needs under bench-out/fineval-qwen (the prepared sample; the converted base,
about two minutes, unless bench/train_real.py already built it):
    python bench/predict_fineval_qwen.py [--questions 48] [--batch-size 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import ROOT, offline, real_inputs

MODEL, TASK = "qwen2.5-coder-0.5b", "fineval"
WORK = ROOT / "bench-out" / "fineval-qwen"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    offline()
    from fin_tasks.artifacts import read_jsonl

    params, prepared, base = real_inputs("configs/numllm-qwen.yaml", TASK, MODEL, WORK)
    records = read_jsonl(prepared / "test.jsonl")[: args.questions]
    rows, load_s = measure(params, base, records, args.batch_size)
    report(rows, records, load_s, args.batch_size, args.json)


def measure(params, base: Path, records: list[dict], batch_size: int) -> tuple[dict, float]:
    """Each path's seconds, questions/s and answers, from one loaded model."""
    from fin_tasks.models import BaseRef, load_tokenizer
    from fin_tasks.predict import generate, load_variant, score_choices
    from fin_tasks.predictions import parse
    from fin_tasks.prompting import answer_separator, render_prompt
    from fin_tasks.tasks import task_from_config

    config = params.models[MODEL]
    task = task_from_config(TASK, params.tasks[TASK])
    tokenizer = load_tokenizer(BaseRef(str(base)))
    prompts = [render_prompt(r, tokenizer, config.chat_template) for r in records]
    separator = answer_separator(tokenizer, config.chat_template)
    started = time.perf_counter()
    model = load_variant("base", config, task.labels, base, base, dequantize=True).eval()
    load_s = time.perf_counter() - started
    paths = {"(a) generate, one by one": lambda: generate(model, tokenizer, prompts,
                                                          task.max_new_tokens, 1),
             "(b) generate, batched": lambda: generate(model, tokenizer, prompts,
                                                       task.max_new_tokens, batch_size, 4096),
             "(c) score choices": lambda: score_choices(model, tokenizer, prompts, task.labels,
                                                        batch_size, separator, 4096)}
    rows = {}
    for name, call in paths.items():
        started = time.perf_counter()
        outputs = call()
        seconds = time.perf_counter() - started
        answers = ([task.labels[max(range(len(s)), key=s.__getitem__)] for s in outputs]
                   if name.startswith("(c)") else [parse(task, text) for text in outputs])
        rows[name] = {"seconds": round(seconds, 2), "questions_per_s": len(prompts) / seconds,
                      "answers": answers}
    return rows, load_s


def report(rows: dict[str, dict], records: list[dict], load_s: float, batch_size: int,
           json_path: str | None) -> None:
    from fin_tasks.metrics import MISSING

    single = "(a) generate, one by one"
    gold = [r["answer"] for r in records]
    print(f"\n{len(records)} FinEval val questions, Qwen2.5-Coder-0.5B-Instruct zero-shot "
          f"(4-bit NF4, dequantized at load in {load_s:.0f} s), batch {batch_size}\n")
    print("| path | seconds | questions/s | vs (a) | accuracy | missing |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        answers = row["answers"]
        accuracy = sum(a == g for a, g in zip(answers, gold)) / len(gold)
        missing = sum(a in (None, MISSING) for a in answers) / len(gold)
        print(f"| {name} | {row['seconds']:.1f} | {row['questions_per_s']:.2f} | "
              f"{row['questions_per_s'] / rows[single]['questions_per_s']:.1f}x | "
              f"{accuracy:.3f} | {missing:.3f} |")
    figures = {
        "questions": len(records),
        "fineval_choice_qps_qwen": rows["(c) score choices"]["questions_per_s"],
        "fineval_choice_vs_generate_qwen": (rows["(c) score choices"]["questions_per_s"]
                                            / rows[single]["questions_per_s"]),
        "fineval_batched_vs_single_qwen": (rows["(b) generate, batched"]["questions_per_s"]
                                           / rows[single]["questions_per_s"]),
        "same_answers_batched_single": sum(
            a == b for a, b in zip(rows["(b) generate, batched"]["answers"],
                                   rows[single]["answers"])) / len(records),
    }
    print("\n" + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
