"""The NumLLM table: FinEval accuracy of the base, base + each module and the merged model,
overall and for numeric and non-numeric questions apart, each with a seeded bootstrap 95%
interval, from the files `predict --merge` and `evaluate --merge` wrote.

    python bench/numllm_table.py [--out-dir outputs-numllm-qwen] [--merge numllm]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(ROOT / "outputs-numllm-qwen"))
    parser.add_argument("--merge", default="numllm")
    parser.add_argument("--task", default="fineval")
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    offline()
    from fin_tasks.artifacts import read_jsonl
    from fin_tasks.layout import Layout
    from fin_tasks.metrics import bootstrap_ci

    layout = Layout(Path(args.out_dir))
    gold = {r["id"]: r for r in read_jsonl(layout.prepared(args.task) / "test.jsonl")}
    evaluation = layout.read_evaluation(args.merge)
    print(f"{len(gold)} questions ({sum(r['numeric'] for r in gold.values())} numeric); "
          f"merge check: {json.dumps(evaluation.get('merge_check'))}\n")
    print("| variant | accuracy (95% CI) | numeric (95% CI) | non-numeric (95% CI) | missing |")
    print("|---|---|---|---|---|")
    for variant in evaluation["metrics"]:
        rows = read_jsonl(layout.predictions(args.merge) / variant / "test.jsonl")
        hits = [(gold[r["id"]]["numeric"], r["label"] == gold[r["id"]]["answer"]) for r in rows]
        cells = []
        for part in (hits, [h for h in hits if h[0]], [h for h in hits if not h[0]]):
            accuracy = sum(ok for _, ok in part) / len(part)
            low, high = bootstrap_ci(part, lambda s: sum(ok for _, ok in s) / len(s),
                                     args.resamples, 13)
            cells.append(f"{accuracy:.3f} ({low:.3f}-{high:.3f}, n={len(part)})")
        missing = sum(r["label"] == "missing" for r in rows) / len(rows)
        print(f"| {variant} | {' | '.join(cells)} | {missing:.3f} |")


if __name__ == "__main__":
    main()
