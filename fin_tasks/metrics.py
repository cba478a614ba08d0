"""Scoring exactly as the FinLLM Challenge organizers do (PIXIU `src/tasks/flare.py`).

Classification: the generated text is stripped and lower-cased; the first choice (in the
order of `choices`) found in it as a substring is the prediction, else "missing".
Weighted and macro F1 are sklearn's over the gold labels only (`labels=set(golds)`), so a
"missing" prediction counts against its gold class; MCC maps "missing" to its own class.
Summarization: ROUGE-1/2/L F-measure from rouge-score without stemming.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

MISSING = "missing"


def parse_choice(text: str, choices: Sequence[str]) -> str:
    """The organizers' parser: first choice found in the lower-cased output, else "missing"."""
    output = text.strip().lower()
    for choice in choices:
        if choice.lower() in output:
            return choice
    return MISSING


def parse_letter(text: str, choices: Sequence[str]) -> str:
    """Multiple choice (FinEval): the first option letter standing alone in the output
    (not inside a word such as "ANSWER"), else "missing"."""
    letters = "|".join(re.escape(c) for c in choices)
    match = re.search(rf"(?<![A-Z])({letters})(?![A-Z])", text.strip().upper())
    return match.group(1) if match else MISSING


PARSERS = {"substring": parse_choice, "letter": parse_letter}


def classification_metrics(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """Accuracy, weighted F1 (the ranking metric), macro F1, MCC and missing rate."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    labels = sorted(set(golds))
    gold_array, pred_array = np.array(golds), np.array(preds)
    index = {label: i for i, label in enumerate(labels)}
    with warnings.catch_warnings():
        # one class in gold and predictions (small bootstrap resamples): MCC is 0, as defined
        warnings.filterwarnings("ignore", message="A single label was found")
        mcc = float(matthews_corrcoef([index[g] for g in golds], [index.get(p, -1) for p in preds]))
    return {
        "accuracy": float(np.mean(gold_array == pred_array)),
        "f1_weighted": float(f1_score(gold_array, pred_array, average="weighted", labels=labels,
                                      zero_division=0)),
        "f1_macro": float(f1_score(gold_array, pred_array, average="macro", labels=labels,
                                   zero_division=0)),
        "mcc": mcc,
        "missing_rate": float(np.mean(pred_array == MISSING)),
    }


def rouge_scores(references: Sequence[str], predictions: Sequence[str]) -> dict[str, list[float]]:
    """Per-example ROUGE-1/2/L F-measure (rouge-score, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    scores: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for reference, prediction in zip(references, predictions):
        result = scorer.score(reference, prediction)
        for key in scores:
            scores[key].append(result[key].fmeasure)
    return scores


def perplexity(losses: Sequence[tuple[float, int]]) -> float:
    """exp of the mean token loss, from (summed negative log-likelihood, tokens) pairs."""
    return math.exp(sum(n for n, _ in losses) / max(sum(t for _, t in losses), 1))


def bootstrap_ci(values: Sequence[Any], statistic: Any, resamples: int, seed: int,
                 ) -> tuple[float, float] | None:
    """95% percentile interval of `statistic(sample)` over resamples of `values`."""
    if resamples == 0 or len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    items = list(values)
    stats = [statistic([items[i] for i in rng.integers(0, len(items), len(items))])
             for _ in range(resamples)]
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def resampled_classification(golds: Sequence[str], preds: Sequence[str], metric: str,
                             resamples: int, seed: int) -> np.ndarray:
    """`metric` (accuracy or f1_weighted, as classification_metrics computes them) on each
    of `resamples` bootstrap resamples, all at once with numpy (the same draws as
    bootstrap_ci with this seed)."""
    labels = sorted(set(golds))
    gold, pred = np.array(golds), np.array(preds)
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.integers(0, len(gold), len(gold)) for _ in range(resamples)])
    g, p = gold[picks], pred[picks]
    if metric == "accuracy":
        return (g == p).mean(axis=1)
    assert metric == "f1_weighted", metric
    f1_sum, support_sum = np.zeros(resamples), np.zeros(resamples)
    for label in labels:
        tp = ((g == label) & (p == label)).sum(axis=1)
        fp = ((g != label) & (p == label)).sum(axis=1)
        support = (g == label).sum(axis=1)
        denominator = 2 * tp + fp + (support - tp)
        f1 = np.divide(2 * tp, denominator, out=np.zeros(resamples), where=denominator > 0)
        f1_sum += f1 * support
        support_sum += support
    return f1_sum / np.maximum(support_sum, 1)


def classification_ci(golds: Sequence[str], preds: Sequence[str], metric: str,
                      resamples: int, seed: int) -> tuple[float, float] | None:
    """95% bootstrap interval of a classification metric (vectorized bootstrap_ci)."""
    if resamples == 0 or len(golds) < 2:
        return None
    low, high = np.percentile(resampled_classification(golds, preds, metric, resamples, seed),
                              [2.5, 97.5])
    return float(low), float(high)


def bertscore_f1(references: Sequence[str], candidates: Sequence[str], model_path: str,
                 layer: int | None = None, batch_size: int = 32) -> list[float]:
    """BERTScore F1 per pair: greedy cosine matching of contextual token embeddings, without
    idf weighting or baseline rescaling, special tokens excluded (as bert-score computes it)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()

    def embed(texts: Sequence[str]) -> list[Any]:
        vectors = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True,
                              truncation=True, max_length=512, return_tensors="pt",
                              return_special_tokens_mask=True)
            special = batch.pop("special_tokens_mask")
            with torch.no_grad():
                hidden = model(**batch, output_hidden_states=True).hidden_states
            states = torch.nn.functional.normalize(hidden[-1 if layer is None else layer], dim=-1)
            keep = batch["attention_mask"].bool() & ~special.bool()
            vectors.extend(states[row][keep[row]] for row in range(len(states)))
        return vectors

    scores = []
    for ref, cand in zip(embed(references), embed(candidates)):
        if len(ref) == 0 or len(cand) == 0:
            scores.append(0.0)
            continue
        similarity = cand @ ref.T
        precision, recall = similarity.max(1).values.mean(), similarity.max(0).values.mean()
        scores.append(float(2 * precision * recall / (precision + recall)))
    return scores
