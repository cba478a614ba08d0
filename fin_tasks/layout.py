"""Where every stage's outputs live under one root: the paths dvc.yaml names, in code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

EVALUATION_FILE = "evaluation.json"
HEADLINE_DIR = "headline"  # in an evaluation folder: <variant>.json, for `dvc metrics show`
ENSEMBLE_VARIANT = "ensemble"  # the one prediction folder of an ensemble
ENSEMBLE_RECORD = "ensemble.json"  # an ensemble's members, weights and how it was fit


@dataclass(frozen=True)
class Layout:
    """Stage output folders under `root` (`outputs/` by default)."""

    root: Path = Path("outputs")

    def corpus(self, name: str) -> Path:
        return self.root / "corpus" / name

    def questions(self, name: str) -> Path:
        return self.root / "questions" / name

    def prepared(self, task: str) -> Path:
        return self.root / "prepare" / task

    def base(self, model: str) -> Path:
        return self.root / "base" / model

    def trained(self, run: str) -> Path:
        return self.root / "train" / run

    def merged(self, name: str) -> Path:
        return self.root / "merge" / name

    def ensembled(self, name: str) -> Path:
        """An ensemble's combined predictions (`ensemble/<split>.jsonl`) and its record."""
        return self.root / "ensemble" / name

    def predictions(self, key: str) -> Path:
        """Predictions of a train run, or of a merge's comparison (names never clash)."""
        return self.root / "predict" / key

    def evaluation(self, key: str) -> Path:
        return self.root / "evaluate" / key

    def read_evaluation(self, key: str) -> dict:
        """The full record `evaluate` wrote for a run, merge or ensemble (headline/ holds each
        variant's ranking metric and interval, for `dvc metrics`)."""
        return json.loads((self.evaluation(key) / EVALUATION_FILE).read_text(encoding="utf-8"))

    def plots(self, stage: str, run: str) -> Path:
        return self.root / "plots" / stage / run

    def submission(self, task: str) -> Path:
        return self.root / "submit" / task

    def report(self) -> Path:
        return self.root / "report"
