"""Peak memory of LoRA training on real LLMs: 4-bit NF4 (QLoRA) against bf16 weights.

For each model (SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct by default), each
mode runs in its own process (peak RSS is per process): load the `base` stage's model as the
mode says (4-bit from a ready-quantized copy made for that mode, or the bf16 safetensors),
add LoRA r=16 on every linear layer, reset the peak, and train one micro-batch of real Task 1
rows (forward and backward). The modes:

- `nf4-f32-vocab`: 4-bit weights computing in float32 (the compute dtype on a CPU without
  native bf16), every unquantized weight (embeddings, output layer, norms) in float32, as
  before `compute_in`;
- `nf4`: the 4-bit model as `configs/cpu-llms.yaml` has it: the same, its vocabulary
  matrices stored in bf16 (`dtype: bfloat16`) and upcast as they compute;
- `nf4-bf16`: 4-bit weights computing in bf16 with bf16 unquantized weights, the QLoRA recipe
  as run on a GPU: the same compute dtype as `bf16`, so only the weights differ;
- `bf16`: LoRA on the bf16 model.

bf16 compute is emulated on a CPU without native bf16 (15-20x slower), hence one small
micro-batch. Prints a table per model; `--json PATH` writes `rss_4bit_over_bf16_<model>`
(`nf4-bf16` over `bf16`, like for like) and `rss_<mode>_over_bf16_<model>` for every mode.

    python bench/memory_real.py [--models smollm2 qwen2.5-coder-0.5b] [--rows 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from common import ROOT, SHARED, offline

KEYS = {"smollm2": "smollm2", "qwen2.5-coder-0.5b": "qwen", "gemma3-270m": "gemma"}
QUANT = {"bits": 4, "quant_type": "nf4", "double_quant": True}
MODES = {
    "nf4-f32-vocab": {"dtype": "float32"},
    "nf4": {},
    "nf4-bf16": {"dtype": "bfloat16", "quantization": QUANT | {"compute_dtype": "bfloat16"}},
    "bf16": {"dtype": "bfloat16", "quantization": None},
}


def mode_params(model: str, mode: str) -> object:
    """Params of one task (real Task 1 train) and the model as the mode sets it."""
    from fin_tasks.config import parse_params

    entry = yaml.safe_load((ROOT / "configs/cpu-llms.yaml").read_text())["models"][model]
    return parse_params({"tasks": {"finarg_ecc": {"type": "finarg_ecc",
                                                  "data": str(SHARED / "finarg_ecc"),
                                                  "splits": {"train": "train.jsonl"}}},
                         "models": {model: entry | MODES[mode]}})


def mode_base(args: argparse.Namespace) -> Path:
    """The mode's base folder: the `base` stage's files, and for a 4-bit mode its own
    ready-quantized copy (the one `base` stores is for the config's settings only)."""
    source = Path(args.base) / args.model
    if args.mode == "bf16":
        return source
    folder = ROOT / "bench-out/memory-real" / args.model / args.mode
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not (folder / path.name).exists():
            (folder / path.name).symlink_to(path)
    return folder


def child(args: argparse.Namespace) -> None:
    """One mode, in this process: make its ready copy (`--prepare`), or load, add LoRA,
    reset the peak and train one micro-batch; print figures as JSON."""
    offline()
    import torch

    from fin_tasks.artifacts import read_jsonl
    from fin_tasks.encoding import collate, encode
    from fin_tasks.memory import peak_memory_bytes, reset_peak_memory
    from fin_tasks.models import (load_base, load_tokenizer, read_base_ref, ready_quantized,
                                  save_quantized, with_lora)
    from fin_tasks.tasks import task_from_config
    from fin_tasks.train import loss_sum

    params, folder, cpu = mode_params(args.model, args.mode), mode_base(args), torch.device("cpu")
    config, ref = params.models[args.model], read_base_ref(folder)
    if args.prepare:
        if config.quantization is not None and ready_quantized(config, ref) is None:
            save_quantized(config, folder)
        return
    started = time.perf_counter()
    lora = with_lora(load_base(config, ref), config)
    loaded, load_s = peak_memory_bytes(cpu), time.perf_counter() - started
    tokenizer = load_tokenizer(ref)
    task = task_from_config("finarg_ecc", params.tasks["finarg_ecc"])
    rows = read_jsonl(SHARED / "finarg_ecc" / "train.jsonl")[:args.rows]
    batch = collate(encode(rows, tokenizer, config, 256, task), tokenizer.pad_token_id, cpu)
    reset_peak_memory(cpu)
    before, started = peak_memory_bytes(cpu), time.perf_counter()
    loss, _ = loss_sum(lora, batch)
    loss.backward()
    print(json.dumps({"mode": args.mode, "peak_rss_bytes": peak_memory_bytes(cpu),
                      "rss_before_bytes": before, "load_peak_rss_bytes": loaded,
                      "load_s": round(load_s, 1),
                      "step_s": round(time.perf_counter() - started, 1),
                      "tokens": int(batch["attention_mask"].sum()), "loss": loss.item()}))


def run_child(args: argparse.Namespace, model: str, mode: str, *extra: str) -> dict:
    """Run one mode in a fresh process; its JSON line, if it prints one."""
    out = subprocess.run([sys.executable, __file__, "--base", args.base, "--rows",
                          str(args.rows), "--model", model, "--mode", mode, *extra],
                         check=True, capture_output=True, text=True).stdout
    lines = out.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen2.5-coder-0.5b"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--base", default=str(ROOT / "bench-out/train-real/base"),
                        help="the folder of the `base` stage's model folders (default: the "
                        "one bench/train_real.py builds)")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--json")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        return child(args)
    figures: dict = {}
    for model in args.models:
        results = {}
        for mode in args.modes:
            run_child(args, model, mode, "--prepare")
            results[mode] = run_child(args, model, mode)
        print(f"\n{model}, LoRA r=16 on every linear layer, one micro-batch of {args.rows} "
              f"Task 1 rows ({results[args.modes[0]]['tokens']} tokens)\n\n| mode "
              "| peak RSS in training | RSS before the step | vs bf16 | load s | step s | loss |"
              "\n|---|---|---|---|---|---|---|")
        key, bf16 = KEYS.get(model, model), results.get("bf16", {}).get("peak_rss_bytes")
        for mode, r in results.items():
            ratio = r["peak_rss_bytes"] / bf16 if bf16 else float("nan")
            figures[f"rss_{mode.replace('-', '_')}_over_bf16_{key}"] = round(ratio, 3)
            print(f"| {mode} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
                  f"{r['rss_before_bytes'] / 2**30:.2f} GiB | {ratio:.2f} | {r['load_s']} | "
                  f"{r['step_s']} | {r['loss']:.4f} |")
        if "rss_nf4_bf16_over_bf16_" + key in figures:
            figures[f"rss_4bit_over_bf16_{key}"] = figures["rss_nf4_bf16_over_bf16_" + key]
        figures[model] = results
    print("\n" + "\n".join(f"{k} {v}" for k, v in figures.items() if k.startswith("rss_")))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
