"""requirements.lock pins the environment: it matches pyproject.toml and constraints.txt,
pins every dependency they name, and is what this environment was installed from."""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import tomllib

from conftest import ROOT

PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^ \\;]+)", re.MULTILINE)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _locked() -> dict[str, str]:
    text = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    return {name.lower().replace("_", "-"): version for name, version in PIN.findall(text)}


def test_the_lock_matches_pyproject_and_constraints() -> None:
    inputs = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()
                            + (ROOT / "constraints.txt").read_bytes()).hexdigest()
    header = (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines()[:5]
    assert f"# inputs-sha256: {inputs}" in header, (
        "pyproject.toml or constraints.txt changed without the lock: run bash scripts/lock.sh")


def test_every_dependency_is_pinned_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]} | {
        _name(r) for extra in project["optional-dependencies"].values() for r in extra}
    locked = _locked()
    assert wanted - {"torch"} <= set(locked), sorted(wanted - {"torch"} - set(locked))
    assert "torch" not in locked  # setup installs the CPU or CUDA build of torch==2.13.0 first
    text = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    assert text.count("==") == len(locked) and text.count("--hash=sha256:") >= len(locked)


def test_this_environment_was_installed_from_the_lock() -> None:
    drift = {}
    for name, version in _locked().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a platform-marked package (another Python or OS)
        if installed != version:
            drift[name] = (installed, version)
    assert not drift, f"installed vs locked: {drift}; run bash scripts/setup.sh"
