"""Prediction: batched greedy generation, choice scoring, and classification heads.

Generation sorts prompts by length and pads on the left, so each batch wastes little and
every row's continuation starts at the same position. Choice scoring puts every choice of
every prompt in one batch and reads each choice's log-likelihood from one forward pass:
it never yields "missing".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fin_tasks.config import HeadConfig, ModelConfig, PredictConfig
from fin_tasks.encoding import Example, collate, encode_corpus, encode_encoder, encode_head
from fin_tasks.errors import ModelError
from fin_tasks.heads import load_head
from fin_tasks.forward import (cache_argument, classifier_logits, returned_cache,
                               shared_prefix_cache, shared_prefix_length)
from fin_tasks.models import (BaseRef, dequantized, frozen_as_in_training, load_base,
                              load_tokenizer, read_base_ref, with_adapter)
from fin_tasks.predictions import (parse, predict_baseline, variants_for,
                                   write_predictions)
from fin_tasks.runs import MergeInputs, RunInputs
from fin_tasks.tasks import Task
from fin_tasks.vocab import upcast_vocab
from fin_tasks.weights import check_trained_weights
from fin_tasks.prompting import (IGNORE, answer_ending, answer_separator, encode_texts,
                                 end_of_turn_id, keep_ends, prompt_budget, render_prompt)

log = logging.getLogger(__name__)


def _length_order(sizes: Sequence[int]) -> list[int]:
    """Indices from longest to shortest (a batch's width is set by its first row)."""
    return sorted(range(len(sizes)), key=lambda i: -sizes[i])


def _batches(sizes: Sequence[int], batch_size: int, batch_tokens: int | None) -> list[list[int]]:
    """Indices grouped into batches from longest to shortest rows: at most `batch_size` rows
    and, with `batch_tokens`, at most that many padded tokens (rows times the batch's
    longest row; a longer row runs alone). Padding a 300-token prompt to a 2,400-token
    neighbour would cost eight times its compute, and attention grows with the square."""
    batches: list[list[int]] = []
    for i in _length_order(sizes):
        if batches and len(batches[-1]) < batch_size and (
                batch_tokens is None
                or (len(batches[-1]) + 1) * sizes[batches[-1][0]] <= batch_tokens):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = 16, batch_tokens: int | None = None,
             budget: int | None = None) -> list[str]:
    """Greedy continuations of `prompts` (new text only), in input order.

    Prompts longer than `budget` tokens (the training run's, `prompting.prompt_budget`)
    or than the model's context less the new tokens lose their middle, as in training.
    Batches are length-sorted, capped in rows and padded tokens (`_batches`) and
    left-padded; a row that reaches a stop token leaves the batch (its cache rows are
    dropped), so one long answer does not keep the others going."""
    budget = min(_context(model) - max_new_tokens, budget or 1 << 30)
    encoded = [keep_ends(ids, budget) for ids in _tokenize(tokenizer, prompts)]
    device = next(model.parameters()).device
    stops = _stop_ids(model, tokenizer)
    model.eval()
    outputs: dict[int, str] = {}
    for chunk in _batches([len(ids) for ids in encoded], batch_size, batch_tokens):
        ids, mask = _left_padded([encoded[i] for i in chunk], tokenizer.pad_token_id)
        for i, tokens in zip(chunk, greedy(model, ids.to(device), mask.to(device),
                                           max_new_tokens, stops)):
            outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return [outputs[i] for i in range(len(prompts))]


@torch.no_grad()
def greedy(model: Any, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
           stops: set[int]) -> list[list[int]]:
    """New tokens of each left-padded row by greedy decoding with a key/value cache, each row
    ending at its first stop token (kept) or after `max_new_tokens`; finished rows leave."""
    out, mask = _prefill(model, ids, mask)
    cache, lengths = returned_cache(out), mask.sum(-1)
    rows = list(range(len(ids)))  # the original row of each row still in the batch
    produced: list[list[int]] = [[] for _ in rows]
    tokens = _next_tokens(out.logits[:, -1])
    for step in range(max_new_tokens):
        keep = []
        for k, (row, token) in enumerate(zip(rows, tokens.tolist())):
            produced[row].append(token)
            if token not in stops and step + 1 < max_new_tokens:
                keep.append(k)
        if not keep:
            break
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(index)
            mask, lengths, tokens = mask[index], lengths[index], tokens[index]
            rows = [rows[k] for k in keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask,
                    position_ids=lengths[:, None], use_cache=True,
                    **{cache_argument(model): cache})
        lengths = lengths + 1
        tokens = _next_tokens(out.logits[:, -1])
    return produced


def _prefill(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The forward pass over left-padded prompts, with the output layer at the last position
    only (the prompt's other logits are never read: for 12 EDTSum articles and a 49k
    vocabulary, gigabytes and most of the prefill's time). Returns the output and the
    attention mask its cache goes with (its row sums are the prompts' lengths).

    A prefix every prompt shares (a chat template's system prompt, the task's instruction)
    runs once, as one row; its key/value cache is broadcast to every row and the rest of
    each prompt follows it, left-padded after it (the mask has a hole there). Causal
    attention gives the prefix the same states in every row, so the logits are the plain
    pass's."""
    lengths = mask.sum(-1)
    shared = shared_prefix_length(ids, mask, ids.shape[1] - lengths, int(lengths.min()) - 1)
    if not shared:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions,
                     use_cache=True, logits_to_keep=1), mask
    rows, starts = len(ids), ids.shape[1] - mask.sum(-1)
    first = int(starts[0])
    cache = shared_prefix_cache(model, ids[:1, first:first + shared], rows)
    rest = torch.zeros_like(ids[:, : ids.shape[1] - shared])  # the prompts after the prefix
    rest_mask = torch.zeros_like(rest)
    for row in range(rows):  # each row keeps its left padding
        start = int(starts[row])
        rest[row, start:] = ids[row, start + shared:]
        rest_mask[row, start:] = 1
    full_mask = torch.cat([mask.new_ones((rows, shared)), rest_mask], dim=1)
    positions = shared + (rest_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=rest, attention_mask=full_mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    return out, full_mask


def _next_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The greedy choice of each row (checked: argmax of NaN logits picks token 0)."""
    return _next_logits_checked(logits).argmax(-1)


def _next_logits_checked(logits: torch.Tensor) -> torch.Tensor:
    """Next-token logits, refused when they are not numbers (an empty or arbitrary answer
    would pass for a prediction)."""
    if torch.isnan(logits).any():
        raise ModelError("the model produced NaN logits: its weights are broken (e.g. a "
                         "diverged training); nothing was written")
    return logits


def _tokenize(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many prompts in one call (the fast tokenizer works through them in
    Rust), with a BOS only where the prompt does not already start with one."""
    return encode_texts(tokenizer, list(texts))


def _context(model: Any) -> int:
    """The longest sequence the model takes (positions), or practically unbounded."""
    return int(getattr(model.config, "max_position_embeddings", None) or 1 << 30)


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    """Tokens that end an answer: the tokenizer's EOS, the model's generation EOS ids, and
    the end-of-turn token of the chat template."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return {i for i in [tokenizer.eos_token_id, end_of_turn_id(tokenizer), *ids]
            if i is not None}


@torch.no_grad()
def score_choices(model: Any, tokenizer: Any, prompts: Sequence[str], choices: Sequence[str],
                  batch_size: int = 16, separator: str = " ",
                  batch_tokens: int | None = None, ending: Sequence[int] = (),
                  budget: int | None = None) -> list[list[float]]:
    """Mean log-likelihood per token of each choice (as `separator` + choice + `ending`:
    " choice" after the organizers' `Answer:`, "choice" after a chat template's generation
    prompt; `ending` the answer's closing token, so that a label that is a prefix of another
    is not favoured) after each prompt, in input order. The mean, not the sum, keeps labels
    of different token lengths comparable.

    Each prompt runs once (left-padded, with explicit positions) and its key/value cache is
    shared by all its choices, whose few tokens then run in one small batch: the cost is
    about one forward pass per prompt, whatever the number of choices.
    """
    choice_ids = [tokenizer(separator + c, add_special_tokens=False)["input_ids"] + list(ending)
                  for c in choices]
    budget = min(_context(model) - max(len(c) for c in choice_ids), budget or 1 << 30)
    prompt_ids = [keep_ends(ids, budget) for ids in _tokenize(tokenizer, prompts)]
    device = next(model.parameters()).device
    model.eval()
    scores: dict[int, list[float]] = {}
    for chunk in _batches([len(ids) for ids in prompt_ids], batch_size, batch_tokens):
        ids, mask = _left_padded([prompt_ids[i] for i in chunk], tokenizer.pad_token_id)
        out, mask = _prefill(model, ids.to(device), mask.to(device))
        first = torch.log_softmax(_next_logits_checked(out.logits[:, -1]).float(), dim=-1).cpu()
        rest = _continuations(model, returned_cache(out), mask, choice_ids, tokenizer, device)
        for n, i in enumerate(chunk):
            scores[i] = [(float(first[n, c[0]]) + rest[n * len(choice_ids) + k]) / len(c)
                         for k, c in enumerate(choice_ids)]
    return [scores[i] for i in range(len(prompts))]


def _left_padded(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the left into one tensor, with their attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
    return ids, mask


def _continuations(model: Any, cache: Any, prompt_mask: torch.Tensor,
                   choice_ids: Sequence[list[int]], tokenizer: Any,
                   device: torch.device) -> list[float]:
    """Log-likelihood of every choice's tokens after its first, for every prompt x choice."""
    longest = max(len(c) for c in choice_ids)
    if longest == 1:
        return [0.0] * (len(prompt_mask) * len(choice_ids))
    count = len(choice_ids)
    cache.batch_repeat_interleave(count)
    tokens = torch.full((count, longest), tokenizer.pad_token_id, dtype=torch.long)
    valid = torch.zeros((count, longest), dtype=torch.long)
    for k, c in enumerate(choice_ids):
        tokens[k, : len(c)] = torch.tensor(c)
        valid[k, : len(c)] = 1
    tokens, valid = tokens.repeat(len(prompt_mask), 1), valid.repeat(len(prompt_mask), 1)
    lengths = prompt_mask.sum(-1).repeat_interleave(count)
    positions = lengths[:, None] + torch.arange(longest)[None, :]
    mask = torch.cat([prompt_mask.repeat_interleave(count, dim=0), valid], dim=1)
    logits = model(input_ids=tokens[:, :-1].to(device), attention_mask=mask[:, :-1].to(device),
                   position_ids=positions[:, :-1].to(device),
                   **{cache_argument(model): cache}).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    picked = logprobs.gather(-1, tokens[:, 1:, None])[..., 0] * valid[:, 1:]
    return picked.sum(-1).tolist()


@torch.no_grad()
def text_losses(model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int,
                batch_size: int = 16) -> list[tuple[float, int]]:
    """Summed negative log-likelihood (nats) and number of predicted tokens of each record's
    text, cut into windows of `max_length` tokens as in continual pre-training."""
    windows = [(n, e) for n, r in enumerate(records)
               for e in encode_corpus([r], tokenizer, max_length)]
    order = _length_order([e.tokens for _, e in windows])
    device = next(model.parameters()).device
    model.eval()
    totals = [[0.0, 0] for _ in records]
    for start in range(0, len(order), batch_size):
        chunk = [windows[i] for i in order[start:start + batch_size]]
        batch = collate([e for _, e in chunk], tokenizer.pad_token_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        for row, (n, _) in enumerate(chunk):
            totals[n][0] += float(nll[row].sum())
            totals[n][1] += int((labels[row] != IGNORE).sum())
    return [(total, count) for total, count in totals]


def classify(model: Any, examples: Sequence[Example], batch_size: int, pad_id: int,
             device: torch.device) -> list[list[float]]:
    """Class probabilities (softmax of a classification head's logits) of each example, in
    input order."""
    model.eval()
    logits = classifier_logits(model, examples, batch_size, pad_id, device)
    return torch.softmax(logits, -1).tolist()


def probabilities(scores: Sequence[float]) -> list[float]:
    """A softmax over one row's label scores (mean log-likelihoods), rounded to 6 places."""
    return [round(p, 6) for p in torch.softmax(torch.tensor(scores, dtype=torch.float64), -1)
            .tolist()]


# ---------------------------------------------------------------- the stage


def load_variant(variant: str, config: ModelConfig, labels: tuple[str, ...], base_dir: Path,
                 train_dir: Path, dequantize: bool = False) -> Any:
    """A model ready for inference: base, base + adapter, merged, fully tuned weights, or a
    label head on its base. `dequantize`: a 4-bit base computes from its dequantized weights
    (`PredictConfig`), except under a head, which computes as in training."""
    if variant == "full":
        check_trained_weights(train_dir / "model")
        return upcast_vocab(load_base(config, BaseRef(str(train_dir / "model")), labels))
    if variant == "head":
        return load_head(load_base(config, read_base_ref(base_dir), labels), config,
                         train_dir / "head", labels)
    if variant == "merged":
        base = dequantized(load_base(config, read_base_ref(base_dir), labels), config)
        return with_adapter(base, train_dir / "adapter").merge_and_unload()
    adapter_dir = None if variant == "base" else train_dir / "adapter"
    return _with_saved_adapter(config, base_dir, adapter_dir, labels, dequantize)


def outputs_for(task: Task, config: ModelConfig, model: Any, tokenizer: Any,
                records: Sequence[dict[str, Any]], settings: PredictConfig, max_length: int,
                head: HeadConfig | None = None, trained: bool = True) -> list[dict[str, Any]]:
    """Raw output and parsed label for each record, in input order, with the labels'
    probabilities for a classifier (for a corpus: the text's log-likelihood). Inputs are
    encoded and cut at the training run's `max_length` as in training; a run that trained
    nothing (`trained` false: zero-shot) cuts prompts only to the model's context."""
    if config.model_kind.predicts_by_head(head):
        examples = encode_head(records, tokenizer, head, max_length) if head is not None \
            else encode_encoder(records, tokenizer, max_length)
        return [_labelled(task, probs) for probs in classify(
            model, examples, settings.batch_size, tokenizer.pad_token_id,
            next(model.parameters()).device)]
    if task.kind.prediction == "loss":
        return [{"output": "", "label": None, "nll": round(nll, 4), "tokens": tokens}
                for nll, tokens in text_losses(model, tokenizer, records, max_length,
                                               settings.batch_size)]
    prompts = [render_prompt(r, tokenizer, config.chat_template) for r in records]
    budget = prompt_budget(max_length, task.max_new_tokens) if trained else None
    if task.kind.prediction != "label":
        return [{"output": text, "label": None} for text in generate(
            model, tokenizer, prompts, task.max_new_tokens, settings.batch_size,
            settings.batch_tokens, budget)]
    scores = score_choices(model, tokenizer, prompts, task.labels, settings.batch_size,
                           answer_separator(tokenizer, config.chat_template),
                           settings.batch_tokens, answer_ending(tokenizer, config.chat_template),
                           budget)
    if settings.mode == "score":
        return [_labelled(task, probabilities(row)) | {"scores": [round(x, 4) for x in row]}
                for row in scores]
    texts = generate(model, tokenizer, prompts, task.max_new_tokens, settings.batch_size,
                     settings.batch_tokens, budget)
    return [{"output": text, "label": parse(task, text), "probs": probabilities(row)}
            for text, row in zip(texts, scores)]


def _labelled(task: Task, probs: Sequence[float]) -> dict[str, Any]:
    """A classifier's row: the most probable label (the first on a tie) and every label's
    probability, in the task's label order."""
    best = task.labels[max(range(len(probs)), key=probs.__getitem__)]
    return {"output": best, "label": best, "probs": [round(p, 6) for p in probs]}


def predict_run(run: RunInputs, prepared_dir: str | Path, base_dir: str | Path,
                train_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Predict every configured split with every variant of one trained run."""
    config, task, settings = run.model, run.task, run.predict
    if config.model_kind.baseline:
        return predict_baseline(run, prepared_dir, train_dir, out_dir)
    base_dir, train_dir = Path(base_dir), Path(train_dir)
    predictors = {variant: partial(_predictor, variant, run, base_dir, train_dir)
                  for variant in variants_for(config, settings, run.entry.zero_shot,
                                              run.entry.head is not None)}
    return write_predictions(run.names, task, config, predictors, settings, prepared_dir, out_dir)


def predict_merge(merge: MergeInputs, prepared_dir: str | Path, base_dir: str | Path,
                  train_root: str | Path, merge_dir: str | Path,
                  out_dir: str | Path) -> dict[str, Any]:
    """Predict `evaluate_on` with the base alone, the base carrying each adapter (unmerged),
    and the merged model: the comparison a merge is judged by."""
    config, task, settings, max_length = merge.model, merge.task, merge.predict, merge.max_length
    base_dir, train_root, merge_dir = Path(base_dir), Path(train_root), Path(merge_dir)
    tokenizer_dir = merge_dir / "tokenizer"
    merged = config.model_copy(update={"quantization": config.quantization
                                       if merge.config.requantize else None})
    loaders: dict[str, Callable[[], Any]] = {
        "base": partial(_with_saved_adapter, config, base_dir, None, task.labels,
                        settings.dequantize)}
    for run in merge.config.adapters:
        loaders[f"+{run}"] = partial(_with_saved_adapter, config, base_dir,
                                     train_root / run / "adapter", task.labels,
                                     settings.dequantize)
    loaders["merged"] = lambda: upcast_vocab(frozen_as_in_training(
        load_base(merged, BaseRef(str(merge_dir / "model")), task.labels), merged))
    predictors = {variant: partial(_model_predictor, load, tokenizer_dir, task, config,
                                   settings, max_length)
                  for variant, load in loaders.items()}
    info = {"merge": merge.name, "model": merge.model_name, "task": merge.config.evaluate_on,
            "adapters": list(merge.config.adapters), "method": merge.config.method}
    return write_predictions(info, task, config, predictors, settings, prepared_dir, out_dir)


def _with_saved_adapter(config: ModelConfig, base_dir: Path, adapter_dir: Path | None,
                        labels: tuple[str, ...], dequantize: bool) -> Any:
    """The base (dequantized if asked), carrying the adapter in `adapter_dir` if one."""
    base = load_base(config, read_base_ref(base_dir), labels)
    base = dequantized(base, config) if dequantize \
        else upcast_vocab(frozen_as_in_training(base, config))
    return base if adapter_dir is None else with_adapter(base, adapter_dir)


def _predictor(variant: str, run: RunInputs, base_dir: Path, train_dir: Path,
               ) -> Callable[[Sequence[dict[str, Any]]], list[dict]]:
    """A function from records to outputs, with its model loaded once."""
    config, task, settings = run.model, run.task, run.predict
    return _model_predictor(partial(load_variant, variant, config, task.labels, base_dir,
                                    train_dir, settings.dequantize),
                            train_dir / "tokenizer", task, config, settings,
                            run.hyper.max_length, run.entry.head, not run.entry.zero_shot)


def _model_predictor(load: Callable[[], Any], tokenizer_dir: Path, task: Task,
                     config: ModelConfig, settings: PredictConfig, max_length: int,
                     head: HeadConfig | None = None, trained: bool = True,
                     ) -> Callable[[Sequence[dict[str, Any]]], list[dict]]:
    """A function from records to outputs, with the model `load` returns loaded once."""
    model = load()
    tokenizer = load_tokenizer(BaseRef(str(tokenizer_dir)))
    if config.model_kind.own_head:
        model.config.pad_token_id = tokenizer.pad_token_id
    return lambda records: outputs_for(task, config, model, tokenizer, records, settings,
                                       max_length, head, trained)
