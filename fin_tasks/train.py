"""The `train` stage: LoRA (QLoRA on a quantized base) or full fine-tuning of one model on
one task, resumable from checkpoints.

Causal LMs learn the answer tokens of instruction records (loss on the answer only), or, with
a label head (`heads.py`), the label from their last real token's hidden state; encoders
learn a sequence-classification head. Batches are length-grouped and padded
dynamically; gradients accumulate; the learning rate warms up then decays.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fin_tasks import baselines, checkpoints, costs
from fin_tasks.artifacts import (atomic_dir, check_writable, package_versions, sha256_file,
                                 write_csv, write_json)
from fin_tasks.config import Hyper
from fin_tasks.encoding import Example, collate, encode
from fin_tasks.events import emit
from fin_tasks.heads import with_label_head
from fin_tasks.devices import (data_parallel, device_for, leave_data_parallel, numerics,
                               resolved_quantization, sum_gradients)
from fin_tasks.memory import peak_memory_bytes, reset_peak_memory
from fin_tasks.forward import (cache_argument, classifier_logits, forward_takes,
                               shared_prefix_cache, shared_prefix_length)
from fin_tasks.models import (base_identity, load_base, load_tokenizer, read_base_ref,
                              trainable_state, with_lora)
from fin_tasks.prompting import IGNORE
from fin_tasks.runs import (RunInputs, run_record, selected_on, selection_split,
                            training_records, write_loss_plots)
from fin_tasks.sources import BaseRef
from fin_tasks.weights import WEIGHTS_KEY, canonical_adapter_configs, weight_hashes

log = logging.getLogger(__name__)

CHECKPOINT = checkpoints.STATE


# ---------------------------------------------------------------- batching


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool) -> list[list[int]]:
    """Micro-batches of example indices for one epoch, reproducible from (seed, epoch).

    With length grouping, a shuffled pool of 64 batches is sorted by length and cut
    into batches, whose order is shuffled again: little padding, still random.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    if group_by_length:
        pool = batch_size * 64
        order = [i for start in range(0, len(order), pool)
                 for i in sorted(order[start:start + pool], key=lambda i: -lengths[i])]
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# ---------------------------------------------------------------- loss and evaluation


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed loss of a batch and the number of terms in it (answer tokens or examples).

    A causal LM computes its output layer only at the positions whose next token is learned
    (the answer's, in instruction tuning): the same loss without the vocabulary-wide logits
    of every prompt token."""
    labels = batch["labels"]
    if labels.dim() == 1:  # a classifier (encoder or label head): one class per example
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"), \
            labels.numel()
    targets = labels[:, 1:]
    learned = (targets != IGNORE).any(0).nonzero().squeeze(-1)  # positions p predicting p+1
    shared = _shared_prefix(model, batch, learned)
    if shared:
        logits = _logits_after_prefix(model, batch, shared, learned)
        targets = targets[:, learned]
    elif len(learned) < targets.shape[1] and _selects_logits(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=learned).logits
        targets = targets[:, learned]
    else:
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
        ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def _shared_prefix(model: Any, batch: dict[str, torch.Tensor], learned: torch.Tensor) -> int:
    """Length of the prompt prefix that every row of a causal LM's batch shares and that no
    learned position needs logits from (an instruction, a system prompt), when computing it
    once is exact: 0 when there is no such prefix worth it, or while dropout is active (each
    row would draw its own mask over it)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if not len(learned) or not _selects_logits(model) or (
            model.training and _has_dropout(model)):
        return 0
    starts = torch.zeros(len(ids), dtype=torch.long, device=ids.device)  # right padding
    return shared_prefix_length(ids, mask, starts, int(learned[0]))  # up to the first logit


def _logits_after_prefix(model: Any, batch: dict[str, torch.Tensor], prefix: int,
                         learned: torch.Tensor) -> torch.Tensor:
    """Logits at the `learned` positions, the shared prefix run once (one row) and its
    key/value cache broadcast to every row: causal attention makes the prefix's states the
    same in every row, so this is the plain forward's result at a fraction of the tokens
    (gradients flow through the broadcast into the prefix's computation)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, width = ids.shape
    cache = shared_prefix_cache(model, ids[:1, :prefix], rows)
    positions = torch.arange(prefix, width, device=ids.device)[None].expand(rows, -1)
    return model(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions,
                 use_cache=True, logits_to_keep=learned - prefix,
                 **{cache_argument(model): cache}).logits


def _has_dropout(model: Any) -> bool:
    """Whether any dropout layer of the model drops anything (LoRA dropout included)."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def _selects_logits(model: Any) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do)."""
    return forward_takes(model, "logits_to_keep")


@torch.no_grad()
def evaluate_loss(model: Any, examples: Sequence[Example], batch_size: int, pad_id: int,
                  device: torch.device) -> dict[str, float]:
    """Mean validation loss; for classifiers also accuracy and weighted F1 of the head."""
    from sklearn.metrics import accuracy_score, f1_score

    model.eval()
    try:
        if isinstance(examples[0].labels, int):  # a classifier: prediction's own batched path
            logits = classifier_logits(model, examples, batch_size, pad_id, device)
            gold = [e.labels for e in examples]
            predicted = logits.argmax(-1).tolist()
            loss = float(torch.nn.functional.cross_entropy(logits, torch.tensor(gold)))
            return {"valid_loss": loss, "valid_accuracy": accuracy_score(gold, predicted),
                    "valid_f1_weighted": f1_score(gold, predicted, average="weighted")}
        total, count = 0.0, 0
        order = sorted(range(len(examples)), key=lambda i: examples[i].tokens)
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start:start + batch_size]], pad_id,
                            device)
            loss, terms = loss_sum(model, batch)
            total, count = total + float(loss), count + terms
        return {"valid_loss": total / max(count, 1)}
    finally:
        model.train()


# ---------------------------------------------------------------- the run


@dataclass
class Progress:
    """Everything a checkpoint must restore for an exact resume."""

    step: int = 0
    tokens: int = 0
    examples: int = 0
    elapsed: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    stale_evals: int = 0
    stopped_early: bool = False


def train(run: RunInputs, prepared_dir: str | Path, base_dir: str | Path,
          out_dir: str | Path, checkpoint_root: str | Path = ".checkpoints",
          on_step: Callable[[int], None] | None = None,
          plots_dir: str | Path | None = None,
          checkpoint_store: str | None = None) -> dict[str, Any]:
    """Train one run and write its adapter (or weights) and records into `out_dir`.

    Checkpoints go to `checkpoint_root/<run>-<fingerprint>` (see `fin_tasks.checkpoints`),
    keyed by the run's settings, data, base and resolved numerics, so a rerun of the same run
    resumes and a changed one starts afresh; with `checkpoint_store` each is also copied
    there, and a run whose machine was lost resumes from it on another.
    `on_step(step)` is called after every optimizer step (tests use it to interrupt a run).
    `plots_dir` receives train_loss.csv and valid_loss.csv for `dvc plots`.
    Each optimizer step is also an `events` progress event, for the orchestrator.
    """
    prepared_dir, base_dir = Path(prepared_dir), Path(base_dir)
    check_writable(out_dir)  # before the training that would fill it
    if run.model.model_kind.baseline:
        return baselines.train_baseline(run, prepared_dir, out_dir, plots_dir)
    if run.entry.zero_shot:
        metrics = _zero_shot(run, prepared_dir, base_dir, out_dir)
        write_loss_plots(plots_dir, [], [])
        return metrics
    device = device_for(run.model)
    reset_peak_memory(device)  # this run's peak, loading included
    rank, world = data_parallel(device)
    ref = read_base_ref(base_dir)
    identity = base_identity(ref, base_dir)  # the base hashed once: fingerprint and record
    parts = _fingerprint_parts(run, prepared_dir, identity["sha256"], world)
    checkpoint_dir = checkpoints.folder(checkpoint_root, run.name, parts)
    _seed_everything(run.hyper.seed)
    loop, tokenizer = _prepared_loop(run, prepared_dir, ref, device, rank, world)
    loop.on_checkpoint = functools.partial(_record_checkpoint, checkpoint_dir, run.name, parts,
                                           checkpoint_store)
    progress = _resume(loop, checkpoint_dir, checkpoint_root, run.name, parts, checkpoint_store)
    loop.run(progress, checkpoint_dir, on_step)
    if rank != 0:  # data parallel: every process holds the same weights; the first writes
        leave_data_parallel(world, device)
        return {"run": run.name, "rank": rank, "steps": progress.step}
    record = run_record(run, prepared_dir) | {
        "hyper": run.hyper.model_dump(mode="json"),
        "quantization": resolved_quantization(run.model), "numerics": parts["numerics"],
        "base": identity, "fingerprint": checkpoints.fingerprint(parts),
        "packages": package_versions()}
    metrics = _save(run, loop, progress, tokenizer, out_dir, record)
    checkpoints.drop(checkpoint_dir, checkpoint_store)
    write_loss_plots(plots_dir, loop.history, loop.valid_history)
    leave_data_parallel(world, device)
    return metrics


def _prepared_loop(run: RunInputs, prepared_dir: Path, ref: BaseRef, device: torch.device,
                   rank: int, world: int) -> tuple[_Loop, Any]:
    """The run's model (LoRA or a label head on its base), its encoded splits and its loop."""
    config, task, head = run.model, run.task, run.entry.head
    tokenizer = load_tokenizer(ref)
    base = load_base(config, ref, task.labels)
    model = with_label_head(base, config, head, task.labels) if head else with_lora(base, config)
    if config.model_kind.own_head:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.train()
    train_set, valid_set = (encode(records, tokenizer, config, run.hyper.max_length, task, head)
                            for records in _learning_splits(run, prepared_dir))
    loop = _Loop(model, run.hyper, train_set, valid_set, tokenizer.pad_token_id, device, rank,
                 world)
    return loop, tokenizer


def _learning_splits(run: RunInputs, prepared_dir: Path
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(records to learn from, records to validate on): train and valid, or with a
    `selection_fraction` train split in two, valid left unseen until evaluation."""
    train_records = training_records(prepared_dir / "train.jsonl", run.task)
    if run.hyper.selection_fraction:
        return selection_split(train_records, run.hyper.selection_fraction, run.hyper.seed)
    return train_records, training_records(prepared_dir / "valid.jsonl", run.task)


def _resume(loop: _Loop, checkpoint_dir: Path, root: str | Path, run: str,
            parts: dict[str, Any], store: str | None) -> Progress:
    """Where the loop starts: the store's checkpoint when it is ahead of the local one, the
    local one, or step 0 (saying why when a checkpoint of other settings exists)."""
    if store:
        checkpoints.pull(checkpoint_dir, store)
    if not (checkpoint_dir / CHECKPOINT).exists():
        reason = checkpoints.why_fresh(root, run, parts)
        if reason:
            log.warning("%s", reason)
    return loop.resume(checkpoint_dir)


def _record_checkpoint(checkpoint_dir: Path, run: str, parts: dict[str, Any],
                       store: str | None, step: int) -> None:
    """After each checkpoint: its record beside it, and a copy in the shared store."""
    checkpoints.write_record(checkpoint_dir, run, step, parts)
    if store:
        checkpoints.push(checkpoint_dir, store)


def _zero_shot(run: RunInputs, prepared_dir: Path, base_dir: Path,
               out_dir: str | Path) -> dict[str, Any]:
    """A zero-shot run trains nothing: it records its base and keeps its tokenizer."""
    ref = read_base_ref(base_dir)
    metrics = run.names | {"steps": 0, "best_valid": None, "zero_shot": True,
                           **numerics(run.model)}
    with atomic_dir(out_dir) as scratch:
        load_tokenizer(ref).save_pretrained(scratch / "tokenizer")
        write_json(scratch / "metrics.json", metrics)
        write_json(scratch / "train_config.json", run_record(run, prepared_dir) | {
            "quantization": resolved_quantization(run.model), "numerics": numerics(run.model),
            "base": base_identity(ref, base_dir), "packages": package_versions()})
    log.info("zero-shot %s: nothing to train; %s answers as it is", run.name, run.entry.model)
    return metrics | {"tokens_per_s": None}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fingerprint_parts(run: RunInputs, prepared_dir: Path, base_sha256: str,
                       world: int = 1) -> dict[str, Any]:
    """What shapes a run's numbers, part by part: its settings, data, base and the numerics
    this machine resolves (see `fin_tasks.checkpoints`)."""
    settings = json.dumps({"hyper": run.hyper.model_dump(), "processes": world,
                           "head": run.entry.head and run.entry.head.model_dump(),
                           "model": run.model.model_dump(mode="json"),
                           "task": run.task_config.model_dump(mode="json")}, sort_keys=True)
    data = hashlib.sha256("".join(sha256_file(path) for path in
                                  sorted(prepared_dir.glob("*.jsonl"))).encode())
    return {"settings": hashlib.sha256(settings.encode()).hexdigest(),
            "data": data.hexdigest(), "base": base_sha256, "numerics": numerics(run.model)}


class _Loop:
    """The optimisation loop of one run: a stream of micro-batches across epochs."""

    def __init__(self, model: Any, hyper: Hyper, train_set: list[Example],
                 valid_set: list[Example], pad_id: int, device: torch.device,
                 rank: int = 0, world: int = 1) -> None:
        if not train_set:
            raise ValueError("the train split has no labeled rows")
        self.model, self.hyper, self.device, self.pad_id = model, hyper, device, pad_id
        self.train_set, self.valid_set = train_set, valid_set
        self.lengths = [e.tokens for e in train_set]
        self.rank, self.world = rank, world
        # one optimizer step takes grad_accum micro-batches per process: the processes of a
        # data-parallel run share each window of grad_accum * world micro-batches
        self.accumulate = hyper.grad_accum * world
        self.batches_per_epoch = math.ceil(len(train_set) / hyper.micro_batch_size)
        steps_per_epoch = math.ceil(self.batches_per_epoch / self.accumulate)
        self.total_steps = hyper.max_steps or max(1, math.ceil(hyper.epochs * steps_per_epoch))
        self.optimizer = _optimizer(model, hyper)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            "constant_with_warmup" if hyper.schedule == "constant" else hyper.schedule,
            self.optimizer, num_warmup_steps=round(hyper.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps)
        self.history: list[dict[str, Any]] = []
        self.valid_history: list[dict[str, Any]] = []
        self.best_state: dict[str, torch.Tensor] | None = None
        self._epoch_cache: dict[int, list[list[int]]] = {}
        self.higher_is_better = isinstance(train_set[0].labels, int)  # a classifier's F1
        self.on_checkpoint: Callable[[int], None] | None = None

    def micro_batch(self, index: int) -> list[Example]:
        """The index-th micro-batch of the stream (epochs follow each other)."""
        epoch, position = divmod(index, self.batches_per_epoch)
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: epoch_batches(
                self.lengths, self.hyper.micro_batch_size, self.hyper.seed, epoch,
                self.hyper.group_by_length)}
        return [self.train_set[i] for i in self._epoch_cache[epoch][position]]

    def run(self, progress: Progress, checkpoint_dir: Path,
            on_step: Callable[[int], None] | None) -> None:
        """Optimizer steps from `progress.step` to the end (or an early stop)."""
        # A bar on a terminal; in logs (non-TTY) the periodic log line carries the ETA.
        bar = tqdm(total=self.total_steps, initial=progress.step, desc="train", unit="step",
                   dynamic_ncols=True, disable=None if self.rank == 0 else True)
        while progress.step < self.total_steps and not progress.stopped_early:
            self._log(progress, self._step(progress), bar)
            if self._eval_due(progress.step):
                self._evaluate(progress)
            if progress.step % self.hyper.checkpoint_every == 0 and \
                    progress.step < self.total_steps and self.rank == 0:
                self.checkpoint(progress, checkpoint_dir)
            if on_step is not None:
                on_step(progress.step)
        bar.close()

    def _step(self, progress: Progress) -> float:
        """One optimizer step over the next window of micro-batches, this process taking its
        share of them; the window's mean loss (over every process)."""
        started = time.perf_counter()
        accumulate = self.accumulate
        window = [self.micro_batch(progress.step * accumulate + k) for k in range(accumulate)]
        terms = sum(_terms(batch) for batch in window)  # of the whole window, all processes
        total = 0.0
        for examples in window[self.rank::self.world]:
            loss, _ = loss_sum(self.model, collate(examples, self.pad_id, self.device))
            (loss / terms).backward()
            total += loss.item()
        if self.world > 1:
            sum_gradients(_trainable(self.model))
            total = self._sum(total)
        progress.tokens += sum(e.tokens for batch in window for e in batch)
        progress.examples += sum(len(batch) for batch in window)
        torch.nn.utils.clip_grad_norm_(_trainable(self.model), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.elapsed += time.perf_counter() - started
        return total / terms

    def _sum(self, value: float) -> float:
        """A number added up over the processes of a data-parallel run."""
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def _log(self, progress: Progress, loss: float, bar: tqdm) -> None:
        lr = self.scheduler.get_last_lr()[0]
        epoch = progress.step * self.accumulate / self.batches_per_epoch
        self.history.append({"step": progress.step, "epoch": round(epoch, 4),
                             "train_loss": round(loss, 6), "lr": lr})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if self.rank == 0:
            emit("progress", step=progress.step, total=self.total_steps)
        if progress.step % self.hyper.log_every == 0 or progress.step == self.total_steps:
            eta = progress.elapsed / progress.step * (self.total_steps - progress.step)
            log.info("step %d/%d epoch %.2f loss %.4f lr %.2e eta %s", progress.step,
                     self.total_steps, epoch, loss, lr, _clock(eta))

    def _eval_due(self, step: int) -> bool:
        if not self.valid_set:
            return False
        if step == self.total_steps:
            return True
        if self.hyper.eval_every:
            return step % self.hyper.eval_every == 0
        per_epoch = self.batches_per_epoch / self.accumulate
        return math.floor(step / per_epoch) > math.floor((step - 1) / per_epoch)

    def _evaluate(self, progress: Progress) -> None:
        metrics = evaluate_loss(self.model, self.valid_set, self.hyper.micro_batch_size * 2,
                                self.pad_id, self.device)
        key = "valid_f1_weighted" if self.higher_is_better else "valid_loss"
        value = metrics[key]
        self.valid_history.append({"step": progress.step} | {k: round(v, 6)
                                                             for k, v in metrics.items()})
        log.info("step %d validation: %s", progress.step,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        delta = self.hyper.early_stopping_min_delta
        better = progress.best_value is None or (
            value > progress.best_value + delta if self.higher_is_better
            else value < progress.best_value - delta)
        if better:
            progress.best_value, progress.best_step, progress.stale_evals = value, progress.step, 0
            self.best_state = trainable_state(self.model)
            return
        progress.stale_evals += 1
        patience = self.hyper.early_stopping_patience
        if patience is not None and progress.stale_evals >= patience:
            log.info("early stop at step %d: %s did not improve for %d evaluations",
                     progress.step, key, patience)
            progress.stopped_early = True

    def checkpoint(self, progress: Progress, checkpoint_dir: Path) -> None:
        """Save everything needed to resume exactly at `progress.step`."""
        state = {
            "progress": progress.__dict__ | {},
            "trainable": trainable_state(self.model),
            "best_state": self.best_state,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history, "valid_history": self.valid_history,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        scratch = checkpoint_dir / f".{CHECKPOINT}.tmp"
        torch.save(state, scratch)
        scratch.replace(checkpoint_dir / CHECKPOINT)
        log.info("checkpoint at step %d -> %s", progress.step, checkpoint_dir)
        if self.on_checkpoint is not None:
            self.on_checkpoint(progress.step)

    def resume(self, checkpoint_dir: Path) -> Progress:
        """Restore the last checkpoint of this exact run, if there is one."""
        path = checkpoint_dir / CHECKPOINT
        if not path.exists():
            return Progress()
        # our own file, written by checkpoint() above (optimizer state, RNG states)
        state = torch.load(path, map_location=self.device, weights_only=False)
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                parameters[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.best_state = state["best_state"]
        self.history, self.valid_history = state["history"], state["valid_history"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        progress = Progress(**state["progress"])
        log.info("resuming from step %d (%s)", progress.step, path)
        return progress


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def _terms(examples: Sequence[Example]) -> int:
    """Loss terms in a micro-batch: answer tokens (causal) or examples (a classifier)."""
    if isinstance(examples[0].labels, int):
        return len(examples)
    # the first token is never predicted, so a label there is not a term
    return sum(sum(1 for label in e.labels[1:] if label != IGNORE) for e in examples)


def _trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _optimizer(model: Any, hyper: Hyper) -> torch.optim.Optimizer:
    """AdamW (fused where torch has the kernel); a classification head may take its own
    learning rate."""
    head, body = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            is_head = any(part in name for part in ("classifier", "score"))
            (head if is_head and hyper.head_lr else body).append(parameter)
    groups = [{"params": body, "lr": hyper.lr}]
    if head:
        groups.append({"params": head, "lr": hyper.head_lr})
    try:  # one fused kernel per step instead of a dozen element-wise passes per tensor
        return torch.optim.AdamW(groups, weight_decay=hyper.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not take
        return torch.optim.AdamW(groups, weight_decay=hyper.weight_decay)


def weights_folder(run: RunInputs) -> str:
    """The folder of a run's trained weights: `head` (a label head, with its adapter),
    `adapter` (LoRA) or `model` (every weight)."""
    if run.entry.head is not None:
        return "head"
    return "adapter" if run.model.lora else "model"


def _save(run: RunInputs, loop: _Loop, progress: Progress, tokenizer: Any,
          out_dir: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write weights (the best step's when `select_best`), tokenizer, the run's record
    (train_config.json, with the weights' hashes), history and metrics."""
    model = loop.model
    if loop.hyper.select_best and loop.best_state is not None:
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in loop.best_state.items():
                parameters[name].copy_(value)
    metrics = {
        **run.names, "steps": progress.step, "stopped_early": progress.stopped_early,
        "best_step": progress.best_step, "best_valid": progress.best_value,
        "train_examples": len(loop.train_set), "train_tokens": progress.tokens,
        "final_train_loss": loop.history[-1]["train_loss"] if loop.history else None,
        "selected_on": selected_on(loop.hyper) if loop.valid_set else None,
        **record["numerics"],
    }
    spent = {  # this machine's figures: recorded apart, never in a DVC output
        "wall_s": round(progress.elapsed, 3),
        "tokens_per_s": round(progress.tokens / max(progress.elapsed, 1e-9), 2),
        "examples_per_s": round(progress.examples / max(progress.elapsed, 1e-9), 3),
        "peak_memory_bytes": peak_memory_bytes(loop.device)}
    weights = weights_folder(run)
    with atomic_dir(out_dir) as scratch:
        model.save_pretrained(scratch / weights, safe_serialization=True)
        canonical_adapter_configs(scratch / weights, run.model.source or run.entry.model)
        tokenizer.save_pretrained(scratch / "tokenizer")
        for name, rows in (("history.csv", loop.history), ("valid.csv", loop.valid_history)):
            write_csv(scratch / name, rows, list(rows[0]) if rows else ["step"])
        write_json(scratch / "metrics.json", metrics)
        write_json(scratch / "train_config.json", record | {
            WEIGHTS_KEY: {weights: weight_hashes(scratch / weights)}})
    costs.record("train", run.name, spent)
    log.info("trained %s: %d steps, %.1f tokens/s, peak memory %.0f MiB -> %s", run.name,
             progress.step, spent["tokens_per_s"], spent["peak_memory_bytes"] / 2**20, out_dir)
    return metrics | spent
