"""Training speed on real LLMs: our `train` loop against transformers' `Trainer` + peft.

SmolLM2-135M-Instruct and Qwen2.5-Coder-0.5B-Instruct (the GGUF files from PyPI, converted
by the `base` stage), 4-bit NF4 with double quantization, LoRA r=16 on every linear layer,
real Task 1 train rows in the chat template; the same seed, rows, micro-batch (8),
accumulation (2), learning rate, schedule and LoRA dropout on both sides, one after the
other in this process:

- ours: `fin_tasks.train`'s loop: length-grouped micro-batches, the output layer only at
  learned positions, and the prompt prefix a micro-batch shares (system prompt and
  instruction) computed once; that last one only while no dropout is active, so the
  default here is LoRA dropout 0 on both sides (`--dropout 0.05` measures with it);
- reference: `Trainer` on the same peft model, shuffled, `DataCollatorForSeq2Seq` dynamic
  padding, every logit computed.

Prints real (non-padding) tokens/s of each and their ratio, the wall time, and the
validation loss of both after training (the same 64 valid rows, our `evaluate_loss`).
`--json PATH` writes `train_speedup_<model>` and both sides' figures.

    python bench/train_real.py [--models smollm2 qwen2.5-coder-0.5b] [--steps 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from common import ROOT, SHARED, offline

offline()
DATA = SHARED / "finarg_ecc"

import torch  # noqa: E402

from fin_tasks.artifacts import read_jsonl  # noqa: E402
from train_reference import Counting  # noqa: E402

MICRO_BATCH, ACCUMULATE, VALID_ROWS = 8, 2, 64
KEYS = {"smollm2": "smollm2", "qwen2.5-coder-0.5b": "qwen", "gemma3-270m": "gemma"}


def setup(name: str, rows: int, dropout: float, work: Path) -> tuple[Any, ...]:
    """Params, base folder, tokenizer, and the encoded train and valid examples."""
    from fin_tasks.base import build_base
    from fin_tasks.config import parse_params
    from fin_tasks.models import load_tokenizer, read_base_ref
    from fin_tasks.prepare import prepare_task
    from fin_tasks.tasks import task_from_config
    from fin_tasks.encoding import encode

    model = yaml.safe_load((ROOT / "configs/cpu-llms.yaml").read_text())["models"][name]
    model["lora"]["dropout"] = dropout
    params = parse_params({
        "tasks": {"finarg_ecc": {"type": "finarg_ecc", "data": str(DATA), "splits": {
            "train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}}},
        "models": {name: model},
        "train": {"defaults": {"epochs": 1, "micro_batch_size": MICRO_BATCH,
                               "grad_accum": ACCUMULATE, "lr": 4e-4, "schedule": "cosine",
                               "warmup_ratio": 0.05, "max_length": 256, "seed": 13,
                               "checkpoint_every": 100_000, "log_every": 1000},
                  "runs": {"bench": {"model": name, "task": "finarg_ecc"}}}})
    prepared = work / "prepare" / "finarg_ecc"
    if not (prepared / "manifest.json").exists():
        prepare_task("finarg_ecc", params.tasks["finarg_ecc"], params.prepare, prepared)
    if not (work / "base" / name / "base.json").exists():
        build_base(name, params.models[name], work / "prepare", work / "base" / name)
    tokenizer = load_tokenizer(read_base_ref(work / "base" / name))
    config, task = params.models[name], task_from_config("finarg_ecc",
                                                          params.tasks["finarg_ecc"])
    train_set = encode(read_jsonl(prepared / "train.jsonl")[:rows], tokenizer, config, 256,
                       task)
    valid_set = encode(read_jsonl(prepared / "valid.jsonl")[:VALID_ROWS], tokenizer, config,
                       256, task)
    return params, work / "base" / name, tokenizer, train_set, valid_set


def fresh_model(params: Any, name: str, base_dir: Path) -> Any:
    from fin_tasks.models import load_base, read_base_ref, with_lora

    torch.manual_seed(13)
    config = params.models[name]
    model = with_lora(load_base(config, read_base_ref(base_dir)), config)
    model.train()
    return model


def valid_loss(model: Any, valid_set: list, tokenizer: Any) -> float:
    from fin_tasks.train import evaluate_loss

    return evaluate_loss(model, valid_set, 16, tokenizer.pad_token_id,
                         torch.device("cpu"))["valid_loss"]


def ours(params: Any, name: str, base_dir: Path, tokenizer: Any, train_set: list,
         valid_set: list) -> dict:
    from fin_tasks.train import Progress, _Loop

    model = fresh_model(params, name, base_dir)
    loop = _Loop(model, params.train.hyper("bench"), train_set, [], tokenizer.pad_token_id,
                 torch.device("cpu"))
    started = time.perf_counter()
    loop.run(Progress(), Path("/tmp/unused-checkpoints"), None)
    seconds = time.perf_counter() - started
    return {"tokens_per_s": sum(e.tokens for e in train_set) / seconds, "seconds": seconds,
            "valid_loss": valid_loss(model, valid_set, tokenizer)}


def reference(params: Any, name: str, base_dir: Path, tokenizer: Any, train_set: list,
              valid_set: list) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    hyper = params.train.hyper("bench")
    model = fresh_model(params, name, base_dir)
    collator = Counting(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * e.tokens, "labels": e.labels}
            for e in train_set]
    steps = len(train_set) // (MICRO_BATCH * ACCUMULATE)
    arguments = TrainingArguments(
        output_dir="/tmp/bench-trainer", per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=ACCUMULATE, max_steps=steps, learning_rate=hyper.lr,
        warmup_steps=round(hyper.warmup_ratio * steps), lr_scheduler_type="cosine",
        weight_decay=0.0, max_grad_norm=1.0, seed=hyper.seed, use_cpu=True, report_to=[],
        save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=arguments, train_dataset=rows, data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"tokens_per_s": collator.real / seconds, "seconds": seconds,
            "padded": 1 - collator.real / collator.slots,
            "valid_loss": valid_loss(model, valid_set, tokenizer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen2.5-coder-0.5b"])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (16 rows each)")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout, both sides")
    parser.add_argument("--work", default="bench-out/train-real")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs the real Task 1 data")
    torch.set_num_threads(os.cpu_count() or 1)
    figures: dict[str, Any] = {"steps": args.steps, "lora_dropout": args.dropout}
    print("\n| model | ours tokens/s | Trainer+peft tokens/s | speedup | ours / Trainer wall s "
          "| valid loss ours / Trainer |\n|---|---|---|---|---|---|")
    for name in args.models:
        params, base_dir, tokenizer, train_set, valid_set = setup(
            name, args.steps * MICRO_BATCH * ACCUMULATE, args.dropout, Path(args.work))
        inputs = (params, name, base_dir, tokenizer, train_set, valid_set)
        a, b = ours(*inputs), reference(*inputs)
        speedup = a["tokens_per_s"] / b["tokens_per_s"]
        figures[f"train_speedup_{KEYS.get(name, name)}"] = round(speedup, 3)
        figures[name] = {"ours": a, "trainer_peft": b}
        print(f"| {name} | {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | "
              f"{speedup:.2f}x | {a['seconds']:.0f} / "
              f"{b['seconds']:.0f} | {a['valid_loss']:.4f} / {b['valid_loss']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
