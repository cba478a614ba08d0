"""Batched against one-by-one prediction of a real LLM: how often the label agrees, and whether
every disagreement is a near-tie (rounding, not a masking or position bug).

For the first `--rows` rows of a prepared valid split, with a trained run's variant as
`predict` loads it (its compute dtype as the machine resolves `auto`: bf16 on a CPU with
AVX512-BF16), compares
- generation, batched (length-sorted, left-padded, a shared prefix run once) and one prompt
  at a time: same label? Where the texts first differ, the gap between the two best next
  tokens' logits, from a plain forward pass over the prompt and the common part;
- choice scoring, batched and one at a time: same label? The margin between the best two
  labels' scores, beside the largest difference of any score between the two paths (the
  paths' numeric noise): a flipped label whose margin is within that noise is a near-tie.

    python bench/agreement.py --params params.yaml --out-dir outputs --run smollm2-finarg_ecc \
        --records PATH/valid.jsonl [--rows 200] [--variant adapter] [--dequantize]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--records", required=True, help="prepared valid.jsonl")
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--variant", default="adapter")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dequantize", action="store_true")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    offline()
    import torch

    from fin_tasks.artifacts import read_jsonl
    from fin_tasks.config import load_params
    from fin_tasks.layout import Layout
    from fin_tasks.devices import resolved_quantization
    from fin_tasks.models import BaseRef, load_tokenizer
    from fin_tasks.predict import generate, load_variant, score_choices
    from fin_tasks.predictions import parse
    from fin_tasks.prompting import (answer_ending, answer_separator, encode_texts,
                                     prompt_budget, render_prompt)
    from fin_tasks.runs import resolve_run

    params = load_params(args.params)
    run = resolve_run(params, args.run)
    layout = Layout(Path(args.out_dir))
    config, task = run.model, run.task
    model = load_variant(args.variant, config, task.labels, layout.base(run.entry.model),
                         layout.trained(args.run), dequantize=args.dequantize).eval()
    tokenizer = load_tokenizer(BaseRef(str(layout.trained(args.run) / "tokenizer")))
    records = read_jsonl(Path(args.records))[: args.rows]
    prompts = [render_prompt(r, tokenizer, config.chat_template) for r in records]
    budget = prompt_budget(run.hyper.max_length, task.max_new_tokens)
    dtype = (resolved_quantization(config) or {}).get("compute_dtype", str(config.dtype))
    print(f"{len(prompts)} rows, {args.run} ({args.variant}), compute {dtype}, "
          f"dequantize {args.dequantize}, batch {args.batch_size}")

    batched = generate(model, tokenizer, prompts, task.max_new_tokens, args.batch_size,
                       None, budget)
    single = [generate(model, tokenizer, [p], task.max_new_tokens, 1, None, budget)[0]
              for p in prompts]
    label_differs = [i for i in range(len(prompts))
                     if parse(task, batched[i]) != parse(task, single[i])]
    gaps = []
    for i in label_differs:
        a = tokenizer(batched[i], add_special_tokens=False)["input_ids"]
        b = tokenizer(single[i], add_special_tokens=False)["input_ids"]
        common = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        ids = encode_texts(tokenizer, [prompts[i]])[0] + b[:common]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        top = logits.topk(2).values
        gaps.append(round(float(top[0] - top[1]), 4))
    separator = answer_separator(tokenizer, config.chat_template)
    ending = answer_ending(tokenizer, config.chat_template)
    scored_batched = score_choices(model, tokenizer, prompts, task.labels, args.batch_size,
                                   separator, None, ending, budget)
    scored_single = [score_choices(model, tokenizer, [p], task.labels, 1, separator, None,
                                   ending, budget)[0] for p in prompts]
    noise = max(abs(x - y) for a, b in zip(scored_batched, scored_single) for x, y in zip(a, b))
    flips = []
    for i, (a, b) in enumerate(zip(scored_batched, scored_single)):
        if max(range(len(a)), key=a.__getitem__) != max(range(len(b)), key=b.__getitem__):
            ranked = sorted(b, reverse=True)
            flips.append({"row": i, "margin": round(ranked[0] - ranked[1], 5)})
    figures = {
        "rows": len(prompts), "compute_dtype": dtype, "dequantize": args.dequantize,
        "generate_same_label": 1 - len(label_differs) / len(prompts),
        "generate_same_text": sum(x == y for x, y in zip(batched, single)) / len(prompts),
        "generate_gaps_at_divergence": gaps,
        "score_same_label": 1 - len(flips) / len(prompts),
        "score_largest_difference": round(noise, 5), "score_flips": flips,
        "score_flips_within_noise": all(f["margin"] <= 2 * noise for f in flips),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
