"""The `questions` stage: numeric-sensitive multiple-choice questions built from a corpus.

NumLLM's second module tunes on questions that hinge on numbers. Each numeric question
takes one corpus sentence, masks one number (with its unit), and offers the true value
beside three distractors made by perturbing it: scale (x10, /10), a swap of two adjacent
digits, the sign, or the unit (万元/亿元, million/billion, %/‰). A set share of questions
mask a term instead (a frequent word or two-character term) so the module does not learn
that the answer is always a number. Everything is seeded; a pandera schema checks every
question (four distinct options, one answer, the answer restores the sentence); the result
is written in FinEval's layout (`dev/<subject>_dev.csv`, `val/<subject>_val.csv`), ready for a
`fineval` task.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa

from fin_tasks.artifacts import (atomic_dir, package_versions, read_jsonl, sha256_file,
                                 write_csv, write_json)
from fin_tasks.config import QuestionsConfig
from fin_tasks.corpus import sentences
from fin_tasks.errors import DataError
from fin_tasks.tasks import has_numeric

log = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
QUESTION_FIELDS = ("id", "question", *LETTERS, "answer", "explanation")
BLANK = "____"
_SENTENCE_ENDS = ("。", "！", "？", ".", "!", "?")
# A number not glued to a preceding digit, letter or separator, its sign, and its unit.
_NUMBER = re.compile(
    r"(?<![0-9A-Za-z.,])(?P<sign>-)?(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
    r"(?P<unit>个百分点|万亿元|亿元|万元|万亿|亿|万|元|%|％|‰|倍|\s?(?:billion|million|thousand)\b)?")
UNIT_FAMILIES = (("元", "万元", "亿元"), ("万", "亿"), ("%", "‰"), ("％", "‰"),
                 (" thousand", " million", " billion"))
_WORD = re.compile(r"[A-Za-z]{6,}")
_CJK_PAIR = re.compile(r"(?=([\u4e00-\u9fff]{2}))")
# function words, units and counters: pairs holding one are not terms
_FUNCTION_CHARS = set("的了是在和与及或为等其这那之也而并以于对中上下个一不有"
                      "元万亿年月日天次倍约某")
STEMS = {("zh", True): "根据教材原文，句中空白处应填入的数值是：",
         ("zh", False): "根据教材原文，句中空白处应填入的词语是：",
         ("en", True): "According to the textbook, which value fills the blank? ",
         ("en", False): "According to the textbook, which term fills the blank? "}


@dataclass(frozen=True)
class Question:
    """One built question before its options are shuffled."""

    sentence: str
    start: int
    end: int
    answer: str
    distractors: tuple[str, ...]
    numeric: bool
    kinds: tuple[str, ...]
    """How each distractor was made (scale, digit_swap, sign, unit, offset, term)."""


# ---------------------------------------------------------------- numbers


def _format(value: Decimal, grouped: bool) -> str:
    text = format(value.normalize(), ",f" if grouped else "f")
    return text[:-2] if text.endswith(".0") else text


def number_distractors(digits: str, sign: str, unit: str,
                       rng: np.random.Generator) -> list[tuple[str, str]]:
    """Perturbed versions of one number (text as it would appear, and how it was made),
    in a seeded random order of kinds; never the original."""
    value = Decimal(digits.replace(",", "")) * (-1 if sign else 1)
    grouped = "," in digits
    candidates: dict[str, list[str]] = {"scale": [], "digit_swap": [], "sign": [], "unit": []}
    candidates["scale"] = [_format(value * 10, grouped), _format(value / 10, grouped)]
    swapped = _digit_swaps(digits)
    candidates["digit_swap"] = [("-" if sign else "") + s for s in swapped]
    if value != 0:
        candidates["sign"] = [_format(-value, grouped)]
    for family in UNIT_FAMILIES:
        if unit in family:
            candidates["unit"] = [sign + digits + other for other in family if other != unit]
    original = sign + digits + (unit or "")
    out: list[tuple[str, str]] = []
    for kind in rng.permutation(list(candidates)).tolist():
        for text in rng.permutation(candidates[kind]).tolist() if candidates[kind] else []:
            text = text if kind == "unit" else text + (unit or "")
            if text != original and text not in [t for t, _ in out]:
                out.append((text, kind))
                break
    step = Decimal(1).scaleb(Decimal(digits.replace(",", "")).as_tuple().exponent)
    for k in (1, 2, 3, 4, 5, 6):  # last resort: off by a few units of the last digit
        text = _format(value + k * step, grouped) + (unit or "")
        if text != original and text not in [t for t, _ in out]:
            out.append((text, "offset"))
    return out


def _digit_swaps(digits: str) -> list[str]:
    """The number with two adjacent, different digits swapped (no new leading zero)."""
    chars = list(digits)
    positions = [i for i in range(len(chars) - 1)
                 if chars[i].isdigit() and chars[i + 1].isdigit() and chars[i] != chars[i + 1]
                 and not (i == 0 and chars[1] == "0")]
    swaps = []
    for i in positions:
        swapped = chars.copy()
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        swaps.append("".join(swapped))
    return swaps


def numeric_question(sentence: str, rng: np.random.Generator) -> Question | None:
    """A question masking one number of `sentence` (None when it has none)."""
    matches = [m for m in _NUMBER.finditer(sentence)]
    if not matches:
        return None
    match = matches[int(rng.integers(len(matches)))]
    unit = match.group("unit") or ""
    try:
        options = number_distractors(match.group("digits"), match.group("sign") or "", unit, rng)
    except InvalidOperation:
        return None
    start, end = match.span()
    return Question(sentence, start, end, sentence[start:end], tuple(t for t, _ in options[:3]),
                    True, tuple(k for _, k in options[:3]))


# ---------------------------------------------------------------- terms


def term_vocabulary(texts: Sequence[str]) -> list[str]:
    """Terms that a non-numeric question may mask or offer: English words of six letters or
    more, and two-character Chinese terms seen at least twice without function characters."""
    words = Counter(w.lower() for text in texts for w in _WORD.findall(text))
    chars = Counter(c for text in texts for c in text)
    pairs = Counter(p for text in texts for p in set(_CJK_PAIR.findall(text))
                    if not set(p) & _FUNCTION_CHARS)
    # a cohesive pair: seen in two texts or more, and a good share of each character's uses
    terms = {p for p, n in pairs.items()
             if n >= 2 and n / chars[p[0]] >= 0.3 and n / chars[p[1]] >= 0.3}
    return sorted(set(words) | terms)


def term_question(sentence: str, vocabulary: Sequence[str],
                  rng: np.random.Generator) -> Question | None:
    """A question masking one known term of `sentence`, with three other terms of the same
    script as distractors (None when the sentence has no known term)."""
    known = set(vocabulary)
    found = [(m.start(), m.end()) for m in _WORD.finditer(sentence) if m.group().lower() in known]
    found += [(m.start(1), m.start(1) + 2) for m in _CJK_PAIR.finditer(sentence)
              if m.group(1) in known]
    if not found:
        return None
    start, end = found[int(rng.integers(len(found)))]
    answer = sentence[start:end]
    chinese = _is_chinese(answer)
    pool = [t for t in vocabulary if _is_chinese(t) == chinese and t.lower() != answer.lower()]
    if len(pool) < 3:
        return None
    picks = rng.choice(len(pool), size=3, replace=False)
    distractors = tuple(pool[i] if chinese or not answer[0].isupper() else pool[i].capitalize()
                        for i in picks)
    return Question(sentence, start, end, answer, distractors, False, ("term",) * 3)


def _is_chinese(text: str) -> bool:
    return bool(re.search(r"[\u4e00-\u9fff]", text))


# ---------------------------------------------------------------- the stage


def questions_schema() -> pa.DataFrameSchema:
    """FinEval layout plus the original sentence, with the checks that make a question valid."""
    option = pa.Column(str, pa.Check(lambda s: s.str.strip().str.len() > 0, error="empty option"))
    return pa.DataFrameSchema(
        {"id": pa.Column(int, unique=True),
         "question": pa.Column(str, pa.Check(lambda s: s.str.count(BLANK) == 1,
                                             error="exactly one blank")),
         **{letter: option for letter in LETTERS},
         "answer": pa.Column(str, pa.Check.isin(LETTERS)),
         "explanation": pa.Column(str)},
        checks=[pa.Check(lambda df: df[list(LETTERS)].nunique(axis=1) == 4,
                         error="four distinct options"),
                pa.Check(lambda df: df.apply(_restores, axis=1),
                         error="the answer restores the original sentence")],
        strict=True)


def _restores(row: pd.Series) -> bool:
    """The option the answer letter names, put in the blank, gives back the sentence."""
    return row["question"].replace(BLANK, row[row["answer"]]).endswith(row["explanation"])


def build_questions(name: str, config: QuestionsConfig, corpus_dir: str | Path,
                    out_dir: str | Path) -> dict[str, Any]:
    """Build and validate one question set from a `corpus` stage output; its manifest."""
    corpus_dir = Path(corpus_dir)
    chunks = read_jsonl(corpus_dir / "chunks.jsonl")
    # whole sentences only: headings and fragments make poor questions
    pool = [s for c in chunks for s in sentences(c["text"])
            if BLANK not in s and s.endswith(_SENTENCE_ENDS)]
    rng = np.random.default_rng(config.seed)
    vocabulary = term_vocabulary(list(dict.fromkeys(pool)))
    numeric = _candidates([s for s in pool if _NUMBER.search(s)],
                          lambda s: numeric_question(s, rng), rng)
    terms = _candidates([s for s in pool if not has_numeric(s)],
                        lambda s: term_question(s, vocabulary, rng), rng)
    want_terms = round(config.count * config.non_numeric_share)
    want_numeric = config.count - want_terms
    scale = min(1.0, len(numeric) / want_numeric if want_numeric else 1.0,
                len(terms) / want_terms if want_terms else 1.0)
    n_terms, n_numeric = int(want_terms * scale), int(want_numeric * scale)
    if n_terms + n_numeric == 0:
        raise DataError(corpus_dir / "chunks.jsonl", None, None,
                        "no sentence yields a question", "sentences with numbers or terms")
    if scale < 1:
        log.warning("questions %s: the corpus yields %d numeric and %d term questions; building "
                    "%d + %d (asked for %d) to keep the %.0f%% share of term questions", name,
                    len(numeric), len(terms), n_numeric, n_terms, config.count,
                    100 * config.non_numeric_share)
    chosen = numeric[:n_numeric] + terms[:n_terms]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    frame = pd.DataFrame([_row(i, q, rng) for i, q in enumerate(chosen)])
    questions_schema().validate(frame, lazy=True)
    held_out = round(len(frame) * config.held_out_fraction)
    parts = {"dev": frame.iloc[held_out:], "val": frame.iloc[:held_out]}
    kinds = Counter(k for q in chosen for k in q.kinds)
    manifest = {"questions": name, "corpus": config.corpus, "requested": config.count,
                "built": len(frame), "numeric": n_numeric, "non_numeric": n_terms,
                "available": {"numeric": len(numeric), "non_numeric": len(terms)},
                "splits": {part: len(rows) for part, rows in parts.items()},
                "distractor_kinds": dict(sorted(kinds.items())),
                "inputs": {"chunks.jsonl": sha256_file(corpus_dir / "chunks.jsonl")},
                "config": config.model_dump(mode="json"),
                "packages": package_versions(("fin-tasks",))}
    with atomic_dir(out_dir) as scratch:
        for part, rows in parts.items():
            if len(rows):
                write_csv(scratch / part / f"{config.subject}_{part}.csv",
                          rows.to_dict("records"), QUESTION_FIELDS)
        write_json(scratch / "manifest.json", manifest)
    log.info("questions %s: %d built (%d numeric, %d term), dev %d / val %d", name, len(frame),
             n_numeric, n_terms, len(parts["dev"]), len(parts["val"]))
    return manifest


def _candidates(pool: list[str], make: Callable[[str], Question | None],
                rng: np.random.Generator) -> list[Question]:
    """One question per distinct sentence (that yields one with three distractors),
    in a seeded order."""
    unique = list(dict.fromkeys(pool))
    built = (make(unique[i]) for i in rng.permutation(len(unique)))
    return [q for q in built if q is not None and len(set(q.distractors)) == 3]


def _row(index: int, question: Question, rng: np.random.Generator) -> dict[str, Any]:
    """FinEval CSV row: the masked sentence after a stem, four shuffled options, the letter."""
    options = [question.answer, *question.distractors]
    order = rng.permutation(4).tolist()
    masked = question.sentence[:question.start] + BLANK + question.sentence[question.end:]
    stem = STEMS[("zh" if _is_chinese(question.sentence) else "en", question.numeric)]
    return {"id": index, "question": stem + masked,
            **{LETTERS[slot]: options[k] for slot, k in enumerate(order)},
            "answer": LETTERS[order.index(0)], "explanation": question.sentence}

