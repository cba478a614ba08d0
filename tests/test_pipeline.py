"""End to end: `dvc repro` on the default params in a fresh copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tracked files, as a fresh clone would have them."""
    target = tmp_path_factory.mktemp("clone")
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    _run(["git", "init", "-q"], target)
    return target


def test_dvc_repro_prepares_every_task_then_is_a_no_op(clone: Path) -> None:
    _run(["dvc", "repro"], clone)
    for task in ("finarg_ecc", "edtsum", "fineval", "sentiment"):
        manifest = json.loads((clone / "outputs/prepare" / task / "manifest.json").read_text())
        assert all(split["rows"] > 0 for split in manifest["splits"].values())
    assert "Data and pipelines are up to date" in _run(["dvc", "repro"], clone)
    assert "up to date" in _run(["dvc", "status"], clone)
    _run(["dvc", "push"], clone)
    assert any((clone / ".dvc-storage").rglob("*")), "dvc push wrote nothing to the remote"
