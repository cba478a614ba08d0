"""Benchmark Task 1 prediction with a real LLM, SmolLM2-135M-Instruct in 4-bit NF4.

On the first `--rows` rows of the real Task 1 valid split, with the QLoRA adapter of
`configs/cpu-llms.yaml` when it has been trained (else the zero-shot base), times
(a) greedy generation one prompt at a time, (b) batched length-sorted generation and
(c) choice scoring in one forward pass, each from the 4-bit base as loaded for training and
from the same base dequantized once at load (`predict.dequantize`). Checks that each
faster path gives what the plain one gives. Prints one table; `--json PATH` also writes the
figures (examples/s, ratios) for comparison across commits.

Needs the prepared task and the converted base (about a minute):
    P="--params configs/cpu-llms.yaml --out-dir outputs-cpu"
    fin-tasks prepare $P --task finarg_ecc && fin-tasks base $P --model smollm2
    python bench/predict_smollm2.py [--rows 64] [--batch-size 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import ROOT, offline

MODEL, RUN, TASK = "smollm2", "smollm2-finarg_ecc", "finarg_ecc"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(ROOT / "outputs-cpu"),
                        help="outputs of configs/cpu-llms.yaml")
    parser.add_argument("--rows", type=int, default=64, help="valid rows to predict")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--profile", action="store_true",
                        help="instead, profile (a) and (c) on the 4-bit base with the torch "
                        "profiler: where each path's time goes")
    args = parser.parse_args()
    offline()
    from fin_tasks.artifacts import read_jsonl
    from fin_tasks.config import load_params
    from fin_tasks.layout import Layout

    layout = Layout(Path(args.out_dir))
    params = load_params(ROOT / "configs/cpu-llms.yaml")
    valid = layout.prepared(TASK) / "valid.jsonl"
    if not valid.exists() or not (layout.base(MODEL) / "base.json").exists():
        sys.exit(f"{valid} or {layout.base(MODEL)} missing: build them first (see --help)")
    records = read_jsonl(valid)[: args.rows]
    adapter = layout.trained(RUN) / "adapter"
    variant = "adapter" if adapter.exists() else "base"
    if args.profile:
        return profile(params, layout, records[: args.batch_size], variant, args.batch_size)
    rows = measure(params, layout, records, variant, args.batch_size)
    report(rows, len(records), variant, args.batch_size, args.json)


def _paths(params, layout, records, variant: str, batch_size: int) -> tuple[dict, list[str]]:
    """The three prediction paths as calls on a loaded model, and the prompts."""
    from fin_tasks.models import BaseRef, load_tokenizer
    from fin_tasks.predict import generate, score_choices
    from fin_tasks.prompting import answer_separator, render_prompt
    from fin_tasks.tasks import task_from_config

    config = params.models[MODEL]
    task = task_from_config(TASK, params.tasks[TASK])
    folder = layout.trained(RUN) if variant == "adapter" else layout.base(MODEL)
    tokenizer = load_tokenizer(BaseRef(str(folder / "tokenizer" if variant == "adapter"
                                           else folder)))
    prompts = [render_prompt(r, tokenizer, config.chat_template) for r in records]
    separator = answer_separator(tokenizer, config.chat_template)
    return {"(a) generate, one by one": lambda m: generate(m, tokenizer, prompts,
                                                           task.max_new_tokens, 1),
            "(b) generate, batched": lambda m: generate(m, tokenizer, prompts,
                                                        task.max_new_tokens, batch_size),
            "(c) score choices": lambda m: score_choices(m, tokenizer, prompts, task.labels,
                                                         batch_size, separator)}, prompts


GROUPS = {"4-bit matmul (dequantize + mm)": ("bitsandbytes::gemm_4bit", "bitsandbytes::dequant",
                                             "aten::mm", "aten::addmm", "aten::linear",
                                             "aten::matmul"),
          "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
          "element-wise and norms": ("aten::mul", "aten::add", "aten::silu", "aten::pow",
                                     "aten::mean", "aten::rsqrt", "aten::neg", "aten::cat",
                                     "aten::copy_", "aten::to", "aten::_to_copy")}


def profile(params, layout, records, variant: str, batch_size: int) -> None:
    """(a) and (c) on one batch of rows under the torch profiler: seconds, forward calls,
    and the share of operator time in each group (the 4-bit matrix multiplies, attention,
    element-wise work), then the top operators."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from fin_tasks.predict import load_variant

    config = params.models[MODEL]
    calls, prompts = _paths(params, layout, records, variant, batch_size)
    model = load_variant(variant, config, (), layout.base(MODEL), layout.trained(RUN)).eval()
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    for name in ("(a) generate, one by one", "(c) score choices"):
        forwards[0], started = 0, time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
            calls[name](model)
        seconds = time.perf_counter() - started
        events = profiler.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        shares = {group: sum(e.self_cpu_time_total for e in events
                             if e.key.startswith(prefixes)) / total
                  for group, prefixes in GROUPS.items()}
        print(f"\n{name}: {len(prompts)} rows, {seconds:.1f} s ({seconds / len(prompts):.3f} "
              f"s a row, profiled), {forwards[0]} forward calls\n")
        print(", ".join(f"{group} {share:.0%}" for group, share in shares.items()))
        print(events.table(sort_by="self_cpu_time_total", row_limit=8))


def measure(params, layout, records, variant: str, batch_size: int) -> dict[str, dict]:
    """Each path's seconds, examples/s and labels, for the 4-bit and the dequantized base."""
    from fin_tasks.predict import load_variant
    from fin_tasks.predictions import parse
    from fin_tasks.tasks import task_from_config

    config = params.models[MODEL]
    task = task_from_config(TASK, params.tasks[TASK])
    paths, prompts = _paths(params, layout, records, variant, batch_size)
    rows = {}
    for dequantize in (False, True):
        started = time.perf_counter()
        model = load_variant(variant, config, task.labels, layout.base(MODEL),
                             layout.trained(RUN), dequantize=dequantize).eval()
        load_s = time.perf_counter() - started
        for name, call in paths.items():
            started = time.perf_counter()
            outputs = call(model)
            seconds = time.perf_counter() - started
            labels = ([task.labels[max(range(len(s)), key=s.__getitem__)] for s in outputs]
                      if name.startswith("(c)") else [parse(task, text) for text in outputs])
            rows[f"{name}, {'dequantized' if dequantize else '4-bit'}"] = {
                "seconds": round(seconds, 2), "examples_per_s": len(prompts) / seconds,
                "load_s": round(load_s, 1), "labels": labels, "outputs": outputs}
        del model
    return rows


def report(rows: dict[str, dict], count: int, variant: str, batch_size: int,
           json_path: str | None) -> None:
    def speed(key: str) -> float:
        return rows[key]["examples_per_s"]

    def same(a: str, b: str, field: str) -> float:
        return sum(x == y for x, y in zip(rows[a][field], rows[b][field])) / count

    single = "(a) generate, one by one, 4-bit"
    print(f"\n{count} Task 1 valid rows, SmolLM2-135M-Instruct ({variant} variant), "
          f"batch {batch_size}\n")
    print("| path | seconds | examples/s | vs (a) 4-bit | labels as (a) 4-bit |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.1f} | {row['examples_per_s']:.2f} | "
              f"{row['examples_per_s'] / speed(single):.1f}x | "
              f"{same(name, single, 'labels'):.3f} |")
    figures = {
        "rows": count, "variant": variant,
        "batched_vs_single": speed("(b) generate, batched, 4-bit") / speed(single),
        "choice_vs_generate": speed("(c) score choices, 4-bit") / speed(single),
        "dequantized_vs_4bit_generate": (speed("(b) generate, batched, dequantized")
                                         / speed("(b) generate, batched, 4-bit")),
        "dequantized_vs_4bit_score": (speed("(c) score choices, dequantized")
                                      / speed("(c) score choices, 4-bit")),
        "same_outputs_dequantized_generate": same("(b) generate, batched, 4-bit",
                                                  "(b) generate, batched, dequantized",
                                                  "outputs"),
        "same_outputs_batched_single": same("(b) generate, batched, 4-bit", single, "outputs"),
        "examples_per_s": {name: round(row["examples_per_s"], 3) for name, row in rows.items()},
    }
    print("\n" + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()
                           if isinstance(v, float)))
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
