"""Scoring exactly as the FinLLM Challenge organizers do (PIXIU `src/tasks/flare.py`).

Classification: the generated text is stripped and lower-cased; the first choice (in the
order of `choices`) found in it as a substring is the prediction, else "missing".
Weighted and macro F1 are sklearn's over the gold labels only (`labels=set(golds)`), so a
"missing" prediction counts against its gold class; MCC maps "missing" to its own class.
Summarization: ROUGE-1/2/L F-measure from rouge-score without stemming.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

MISSING = "missing"


def parse_choice(text: str, choices: Sequence[str]) -> str:
    """The organizers' parser: first choice found in the lower-cased output, else "missing"."""
    output = text.strip().lower()
    for choice in choices:
        if choice.lower() in output:
            return choice
    return MISSING


_LETTER = re.compile(r"[A-D]")


def parse_letter(text: str, choices: Sequence[str]) -> str:
    """Multiple choice (FinEval): the first option letter in the output, else "missing"."""
    match = re.search("|".join(re.escape(c) for c in choices), text.strip().upper())
    return match.group(0) if match else MISSING


PARSERS = {"substring": parse_choice, "letter": parse_letter}


def classification_metrics(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    """Accuracy, weighted F1 (the ranking metric), macro F1, MCC and missing rate."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    labels = sorted(set(golds))
    gold_array, pred_array = np.array(golds), np.array(preds)
    index = {label: i for i, label in enumerate(labels)}
    return {
        "accuracy": float(np.mean(gold_array == pred_array)),
        "f1_weighted": float(f1_score(gold_array, pred_array, average="weighted", labels=labels,
                                      zero_division=0)),
        "f1_macro": float(f1_score(gold_array, pred_array, average="macro", labels=labels,
                                   zero_division=0)),
        "mcc": float(matthews_corrcoef([index[g] for g in golds],
                                       [index.get(p, -1) for p in preds])),
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
