"""Benchmark loading the real LLMs in 4-bit NF4: seconds from `from_pretrained` to the end of
the first forward pass, quantizing the float weights at load against loading the copy that
the `base` stage stores ready-quantized. Checks both give the same logits.

Needs the `base` outputs of configs/cpu-llms.yaml (the base stage stores the copy):
    fin-tasks base --params configs/cpu-llms.yaml --out-dir outputs-cpu
    python bench/load_4bit.py [--models smollm2 qwen2.5-coder-0.5b] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, offline

KEYS = {"smollm2": "smollm2", "qwen2.5-coder-0.5b": "qwen", "gemma3-270m": "gemma"}  # JSON


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=str(ROOT / "outputs-cpu"))
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen2.5-coder-0.5b"])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    offline()
    from fin_tasks.config import load_params
    from fin_tasks.layout import Layout
    from fin_tasks.models import QUANTIZED_DIR

    params, layout = load_params(ROOT / "configs/cpu-llms.yaml"), Layout(Path(args.out_dir))
    figures = {}
    print("| model | quantize at load | ready-quantized copy | speed-up | same logits |")
    print("|---|---|---|---|---|")
    for name in args.models:
        base = layout.base(name)
        if not (base / QUANTIZED_DIR).is_dir():
            sys.exit(f"{base / QUANTIZED_DIR} missing: rerun `fin-tasks base` (see --help)")
        with tempfile.TemporaryDirectory() as scratch:  # the same base without its copy
            plain = Path(scratch) / name
            shutil.copytree(base, plain, ignore=shutil.ignore_patterns(QUANTIZED_DIR))
            at_load, logits_at_load = timed_load(params.models[name], plain)
        ready, logits_ready = timed_load(params.models[name], base)
        same = bool((logits_at_load == logits_ready).all())
        print(f"| {name} | {at_load:.1f} s | {ready:.1f} s | {at_load / ready:.1f}x | {same} |")
        key = KEYS.get(name, name)
        figures |= {f"load_s_{key}_4bit_at_load": round(at_load, 2),
                    f"load_s_{key}_4bit": round(ready, 2), f"same_logits_{key}": same}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


def timed_load(config, folder: Path):
    """Seconds to load `folder` as configured and run one forward pass; the logits."""
    import torch

    from fin_tasks.models import BaseRef, load_base

    started = time.perf_counter()
    model = load_base(config, BaseRef(str(folder))).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])).logits
    return time.perf_counter() - started, logits


if __name__ == "__main__":
    main()
