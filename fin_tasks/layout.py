"""Where every stage's outputs live under one root: the paths dvc.yaml names, in code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Stage output folders under `root` (`outputs/` by default)."""

    root: Path = Path("outputs")

    def prepared(self, task: str) -> Path:
        return self.root / "prepare" / task

    def base(self, model: str) -> Path:
        return self.root / "base" / model

    def trained(self, run: str) -> Path:
        return self.root / "train" / run

    def predictions(self, run: str) -> Path:
        return self.root / "predict" / run

    def evaluation(self, run: str) -> Path:
        return self.root / "evaluate" / run

    def plots(self, stage: str, run: str) -> Path:
        return self.root / "plots" / stage / run

    def submission(self, task: str) -> Path:
        return self.root / "submit" / task

    def report(self) -> Path:
        return self.root / "report"
