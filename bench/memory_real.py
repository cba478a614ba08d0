"""Peak memory of LoRA training on a real LLM: 4-bit NF4 (QLoRA) against bf16 weights.

Each mode runs in its own process (peak RSS is per process): load the `base` stage's
Qwen2.5-Coder-0.5B-Instruct (4-bit from its ready-quantized copy, or its bf16 safetensors),
add LoRA r=16 on every linear layer, and train one micro-batch of real Task 1 rows (forward
and backward). Prints each mode's peak RSS and the ratio; `--json PATH` writes
`rss_4bit_over_bf16_<model>`. bf16 is emulated on a CPU without native bf16 (slow), so the
batch is small: the figures are about the weights, not the activations.

    python bench/memory_real.py [--model qwen2.5-coder-0.5b] [--rows 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import ROOT, SHARED, offline

KEYS = {"smollm2": "smollm2", "qwen2.5-coder-0.5b": "qwen", "gemma3-270m": "gemma"}


def child(args: argparse.Namespace) -> None:
    """One mode, in this process: load, add LoRA, one training micro-batch; print figures."""
    offline()
    import torch

    from fin_tasks.artifacts import read_jsonl
    from fin_tasks.config import parse_params
    from fin_tasks.models import load_base, load_tokenizer, read_base_ref, with_lora
    from fin_tasks.tasks import task_from_config
    from fin_tasks.encoding import collate, encode
    from fin_tasks.train import loss_sum

    model = yaml.safe_load((ROOT / "configs/cpu-llms.yaml").read_text())["models"][args.model]
    if args.mode == "bf16":
        model |= {"quantization": None, "dtype": "bfloat16"}
    elif args.dtype:
        model["dtype"] = args.dtype
    params = parse_params({"tasks": {"finarg_ecc": {"type": "finarg_ecc",
                                                    "data": str(SHARED / "finarg_ecc"),
                                                    "splits": {"train": "train.jsonl"}}},
                           "models": {args.model: model}})
    config, ref = params.models[args.model], read_base_ref(args.base)
    started = time.perf_counter()
    lora = with_lora(load_base(config, ref), config)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokenizer = load_tokenizer(ref)
    task = task_from_config("finarg_ecc", params.tasks["finarg_ecc"])
    rows = read_jsonl(SHARED / "finarg_ecc" / "train.jsonl")[:args.rows]
    batch = collate(encode(rows, tokenizer, config, 256, task), tokenizer.pad_token_id,
                    torch.device("cpu"))
    loss, _ = loss_sum(lora, batch)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"mode": args.mode, "peak_rss_bytes": peak, "rss_after_load_bytes": loaded,
                      "seconds": round(time.perf_counter() - started, 1),
                      "tokens": int(batch["attention_mask"].sum())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--base", help="its `base` stage folder (default: "
                        "bench-out/train-real/base/<model>, as bench/train_real.py builds it)")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="4-bit mode: dtype of the weights left unquantized (embeddings, "
                        "norms, output layer; default: the config's, float32)")
    parser.add_argument("--json")
    parser.add_argument("--mode", choices=["nf4", "bf16"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.base = args.base or str(ROOT / "bench-out/train-real/base" / args.model)
    if args.mode:
        return child(args)
    results = {}
    for mode in ("nf4", "bf16"):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--base",
                              args.base, "--rows", str(args.rows), "--mode", mode]
                             + (["--dtype", args.dtype] if args.dtype else []),
                             check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    ratio = results["nf4"]["peak_rss_bytes"] / results["bf16"]["peak_rss_bytes"]
    print(f"\n{args.model}, LoRA r=16 on every linear layer, one micro-batch of {args.rows} "
          f"Task 1 rows\n\n| mode | peak RSS | RSS after load | seconds |\n|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
              f"{r['rss_after_load_bytes'] / 2**30:.2f} GiB | {r['seconds']} |")
    print(f"\nrss_4bit_over_bf16_{KEYS.get(args.model, args.model)} {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {f"rss_4bit_over_bf16_{KEYS.get(args.model, args.model)}": round(ratio, 3)}
            | results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
