"""QLoRA training throughput on a GPU: a 7B Llama-shaped model with random weights (built from
a config, saved once as safetensors: no download), loaded through fin_tasks' own loading code
in 4-bit NF4 and, where it fits, in bf16, trained with LoRA by fin_tasks' own loop on
synthetic token batches. Prints tokens per second, peak GPU memory and model FLOPs
utilisation (achieved model FLOP/s over the bf16 matrix-multiply peak measured here).

    python bench/gpu_train.py [--batch 4] [--seq 1024] [--steps 8] [--out /tmp/gpu-bench]
    python bench/gpu_train.py --tiny            # the same code on a tiny shape (CPU is fine)

Offline: needs torch, transformers, peft and bitsandbytes installed (bring a bitsandbytes
wheel to a machine without internet: `pip install bitsandbytes-*.whl`).
Model FLOPs per token of LoRA training on a frozen base: 4 x linear parameters (forward, and
gradients with respect to activations; none for the frozen weights) plus attention
12 x layers x sequence x width; the LoRA matrices' own FLOPs are left out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SHAPES = {
    "7b": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
           "max_position_embeddings": 4096},
    "tiny": {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "max_position_embeddings": 512},
}


def build(folder: Path, shape: dict) -> None:
    """Random bf16 weights saved as safetensors, once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False,
                                             dtype=torch.bfloat16)).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()


def matmul_peak(device: torch.device, size: int, seconds: float = 3.0) -> float:
    """Measured bf16 (float32 on CPU) matrix-multiply FLOP/s."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10):
            a @ b
        _sync(device)
        count += 10
    return 2 * size**3 * count / (time.perf_counter() - started)


def run(folder: Path, shape: dict, quantized: bool, args: argparse.Namespace) -> dict:
    """Train LoRA for `args.steps` steps (after 2 warm-up steps) with fin_tasks' loop."""
    from fin_tasks.config import Hyper, ModelConfig
    from fin_tasks.devices import device_for
    from fin_tasks.models import BaseRef, load_base, with_lora
    from fin_tasks.encoding import Example
    from fin_tasks.train import Progress, _Loop

    gpu = torch.cuda.is_available()
    compute = "bfloat16" if gpu else "float32"
    config = ModelConfig(kind="causal", source=str(folder), gpu=True, dtype=compute,
                         quantization={"bits": 4, "quant_type": "nf4", "double_quant": True,
                                       "compute_dtype": compute} if quantized else None,
                         lora={"r": 16, "alpha": 32, "dropout": 0.0,
                               "target_modules": "all-linear"})
    device = device_for(config)
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = with_lora(load_base(config, BaseRef(str(folder))), config)
    model.train()
    generator = torch.Generator().manual_seed(0)
    examples = [Example(ids, ids) for ids in torch.randint(
        3, shape["vocab_size"], (args.batch * (args.steps + 2), args.seq),
        generator=generator).tolist()]
    hyper = Hyper(epochs=1, micro_batch_size=args.batch, lr=1e-4, warmup_ratio=0.0,
                  max_length=args.seq + 1, group_by_length=False, checkpoint_every=10**6,
                  log_every=10**6)
    loop = _Loop(model, hyper, examples, [], 0, device)
    progress = Progress()
    loop.total_steps = 2
    loop.run(progress, Path("/tmp/unused"), None)  # warm-up: kernels, allocator, autotuning
    _sync(device)
    loop.total_steps = 2 + args.steps
    started = time.perf_counter()
    loop.run(progress, Path("/tmp/unused"), None)
    _sync(device)
    seconds = time.perf_counter() - started
    tokens = args.steps * args.batch * args.seq
    linear = sum(m.in_features * m.out_features for n, m in model.named_modules()
                 if type(m).__name__ in ("Linear", "Linear4bit") and "lora_" not in n)
    per_token = 4 * linear + 12 * shape["num_hidden_layers"] * args.seq * shape["hidden_size"]
    peak = torch.cuda.max_memory_allocated(device) if gpu else None
    del model, loop
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return {"mode": "4-bit NF4 + LoRA r16" if quantized else f"{compute} + LoRA r16",
            "tokens_per_s": tokens / seconds, "flops_per_s": per_token * tokens / seconds,
            "peak_gib": peak / 2**30 if peak is not None else None, "seconds": seconds}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape (checks the script)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="/tmp/gpu-bench")
    parser.add_argument("--skip-bf16", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.batch, args.seq, args.steps = 2, 64, 3
    shape = SHAPES["tiny" if args.tiny else "7b"]
    folder = Path(args.out) / ("llama-tiny" if args.tiny else "llama-7b") / "random"
    build(folder, shape)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = matmul_peak(device, 8192 if device.type == "cuda" else 1024)
    rows = [run(folder, shape, True, args)]
    if not args.skip_bf16:
        try:
            rows.append(run(folder, shape, False, args))
        except torch.OutOfMemoryError:
            rows.append({"mode": "bf16 + LoRA r16", "error": "out of GPU memory"})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{'7B' if not args.tiny else 'tiny'} Llama-shaped model, random weights, "
          f"{args.batch} x {args.seq} tokens per step, {args.steps} timed steps, on {name}; "
          f"measured {'bf16' if device.type == 'cuda' else 'fp32'} matmul peak "
          f"{peak / 1e12:.1f} TFLOP/s\n")
    print("| mode | tokens/s | peak GPU memory | model TFLOP/s | MFU |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['error']} | | | |")
            continue
        memory = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "-"
        print(f"| {r['mode']} | {r['tokens_per_s']:.0f} | {memory} | "
              f"{r['flops_per_s'] / 1e12:.2f} | {100 * r['flops_per_s'] / peak:.1f}% |")
    print(json.dumps({"device": name, "peak_flops": peak, "rows": rows}))


if __name__ == "__main__":
    main()
