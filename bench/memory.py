"""Memory of a Llama-shaped base of about 1.1B parameters (random weights, built from a
config: no download) loaded in fp32, bf16 and 4-bit NF4 with double quantization, each in
its own process so that peak resident memory is per mode. Also prints bytes per parameter
of the quantized linear layers alone and of the whole model (embeddings, norms and the
output head stay in higher precision).

    python bench/memory.py [--out bench-out/memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
         "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
         "max_position_embeddings": 2048, "tie_word_embeddings": False}


def build(folder: Path) -> None:
    """Random weights in bf16 safetensors (about 2.2 GB), made once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)
    model.save_pretrained(folder)


def measure(folder: Path, mode: str) -> dict:
    """Load in one mode, run one forward pass, report memory (in this process).

    Peak RSS of the 4-bit load includes the bf16 checkpoint pages read while quantizing;
    the RSS after a forward pass is the steady state (weights, runtime, activations)."""
    import torch

    from fin_tasks.config import ModelConfig
    from fin_tasks.models import BaseRef, load_base

    before = _rss()
    quant = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    config = ModelConfig(kind="causal", source=str(folder),
                         dtype="float32" if mode == "fp32" else "bfloat16",
                         quantization=quant if mode == "nf4" else None)
    model = load_base(config, BaseRef(str(folder)))
    after_load = _rss()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 32000, (1, 64)))
    after_forward = _rss()
    # bf16 weights are mapped straight from the safetensors file (file pages, not owned
    # memory): copy every tensor into memory of its own, as on a GPU, then measure what
    # the process owns
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    import gc

    gc.collect()
    _trim()
    anon = _anon()
    linear_params = linear_bytes = 0
    for module in model.modules():
        if type(module).__name__ in ("Linear4bit", "Linear") and module is not model.lm_head:
            linear_params += module.in_features * module.out_features
            linear_bytes += _module_bytes(module)
    total_params = sum(p.numel() for p in model.parameters()) if mode != "nf4" else \
        sum(p.numel() for n, p in model.named_parameters() if p.dtype != torch.uint8) \
        + linear_params
    total_bytes = sum(_module_bytes(m) for m in model.modules() if not list(m.children()))
    return {"mode": mode, "params": total_params, "rss_before_load": before,
            "rss_after_load": after_load, "rss_after_forward": after_forward, "peak_rss": _peak(),
            "anon_after_forward": anon,
            "linear_bytes_per_param": linear_bytes / linear_params,
            "model_bytes_per_param": total_bytes / total_params}


def _module_bytes(module) -> int:
    """Bytes a leaf module holds: parameters, buffers and 4-bit quantization state."""
    size = sum(t.numel() * t.element_size() for t in module.parameters(recurse=False))
    size += sum(t.numel() * t.element_size() for t in module.buffers(recurse=False))
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is not None:
        for tensor in (state.absmax, state.code, getattr(state.state2, "absmax", None),
                       getattr(state.state2, "code", None)):
            if tensor is not None:
                size += tensor.numel() * tensor.element_size()
    return size


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _anon() -> int:
    """Anonymous resident memory (what the process owns; excludes the checkpoint's file pages,
    which the kernel can drop at will)."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def _trim() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise), so RSS shows live data."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/memory")
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.out) / "llama-1.1b-random"
    if args.mode:
        print(json.dumps(measure(folder, args.mode)))
        return
    build(folder)
    rows = []
    for mode in ("fp32", "bf16", "nf4"):
        done = subprocess.run([sys.executable, __file__, "--out", args.out, "--mode", mode],
                              check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    gib = 2**30
    print(f"\nLlama-shaped model, {rows[0]['params'] / 1e9:.2f}B parameters, random weights\n")
    print("| mode | peak RSS | RSS after a forward pass | owned (anonymous) memory "
          "| bytes/param, quantized linears | bytes/param, whole model |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['peak_rss'] / gib:.2f} GiB | "
              f"{r['rss_after_forward'] / gib:.2f} GiB | {r['anon_after_forward'] / gib:.2f} GiB | "
              f"{r['linear_bytes_per_param']:.3f} | {r['model_bytes_per_param']:.3f} |")
    print("\nPeak and after-forward RSS count the checkpoint's memory-mapped file pages too; "
          "owned memory is RssAnon once every weight is copied out of the mapping, after "
          "malloc_trim: what the loaded model (and the runtime) keep.")


if __name__ == "__main__":
    main()
