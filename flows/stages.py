"""The stage graph as dvc.yaml defines it, and running one stage so that DVC knows.

`dvc.yaml` is the one definition of the graph (../STYLE.md point 3). The flows read it here
through DVC's own API and run each stage's command exactly as `dvc repro` would, then
`dvc commit` the stage: dvc.lock records the same hashes either way, so a flow run after
`dvc repro` finds every stage up to date, and the reverse. A stage that DVC already finds up
to date is not run. Only the short DVC bookkeeping calls are serialized (DVC locks its
repository); the stage commands themselves may run concurrently.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fin_tasks import events

log = logging.getLogger(__name__)

_DVC_LOCK = threading.Lock()
_PARAMS_LOCK = threading.Lock()


@dataclass(frozen=True)
class Stage:
    """One expanded stage of dvc.yaml (e.g. `train@tiny-llama-finarg_ecc`)."""

    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    upstream: tuple[str, ...]
    """Stages whose outputs this stage reads."""

    @property
    def group(self) -> str:
        return self.name.split("@", 1)[0]

    @property
    def key(self) -> str | None:
        return self.name.split("@", 1)[1] if "@" in self.name else None


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def stage_graph(workdir: str | Path) -> list[Stage]:
    """Every stage of `workdir/dvc.yaml`, expanded, in an order that respects dependencies."""
    from dvc.repo import Repo

    with Repo(str(workdir)) as repo:
        raw = [(s.name, s.cmd, tuple(str(d.def_path) for d in s.deps),
                tuple(str(o.def_path) for o in s.outs)) for s in repo.index.stages]
    stages = {}
    for name, cmd, deps, outs in raw:
        upstream = tuple(other for other, _, _, other_outs in raw if other != name and any(
            _overlaps(dep, out) for dep in deps for out in other_outs))
        stages[name] = Stage(name, cmd, deps, outs, upstream)
    return _topological(stages)


def _topological(stages: dict[str, Stage]) -> list[Stage]:
    ordered: list[Stage] = []
    done: set[str] = set()
    while len(ordered) < len(stages):
        ready = [s for n, s in stages.items() if n not in done and set(s.upstream) <= done]
        if not ready:
            raise ValueError("dvc.yaml has a dependency cycle among: "
                             + ", ".join(sorted(set(stages) - done)))
        ordered += ready
        done |= {s.name for s in ready}
    return ordered


def with_upstream(stages: list[Stage], wanted: Iterable[str]) -> list[Stage]:
    """`wanted` stages and everything they need, in graph order."""
    by_name = {s.name: s for s in stages}
    keep: set[str] = set()
    todo = list(wanted)
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo += by_name[name].upstream
    return [s for s in stages if s.name in keep]


# ---------------------------------------------------------------- DVC bookkeeping


def dvc(args: list[str], workdir: str | Path, attempts: int = 20) -> str:
    """Run one DVC command; waits while another DVC process holds the repository lock."""
    for attempt in range(attempts):
        with _DVC_LOCK:
            done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workdir,
                                  capture_output=True, text=True, env=_env())
        if done.returncode == 0:
            return done.stdout
        if "Unable to acquire lock" not in done.stderr + done.stdout or attempt == attempts - 1:
            raise RuntimeError(f"dvc {' '.join(args)} failed in {workdir}:\n"
                               f"{(done.stdout + done.stderr)[-3000:]}")
        time.sleep(0.5 + attempt * 0.5)
    raise AssertionError("unreachable")


def up_to_date(stage: str, workdir: str | Path) -> bool:
    """DVC's own verdict: the stage's deps, params and outs match dvc.lock."""
    return json.loads(dvc(["status", "--json", stage], workdir) or "{}") == {}


def changed_stages(workdir: str | Path) -> set[str]:
    """The stages whose deps, params, command or outs differ from dvc.lock, in one DVC call."""
    return set(json.loads(dvc(["status", "--json"], workdir) or "{}"))


def commit(stage: str, workdir: str | Path) -> None:
    """Record a stage's deps, params and outs in dvc.lock and the cache, as repro does."""
    dvc(["commit", "--force", stage], workdir)


def adopt_lock_entry(stage: str, entry: dict, workdir: str | Path) -> None:
    """Record in this workspace's dvc.lock a stage that ran elsewhere (atomically, while no
    DVC command of this process runs), and the params it ran with: a worker's retry after
    running out of memory changes them, and dvc.lock must agree with params.yaml."""
    import yaml

    params = Path(workdir) / "params.yaml"
    recorded = (entry.get("params") or {}).get("params.yaml") or {}
    tree = yaml.safe_load(params.read_text(encoding="utf-8")) or {}
    overrides: dict[str, Any] = {}
    for key, value in recorded.items():  # dotted keys, e.g. train.runs.<run>
        nested: Any = value
        for part in reversed(_key_path(tree, key)):
            nested = {part: nested}
        _merge(overrides, nested)
    if overrides:
        update_params(params, overrides)
    path = Path(workdir) / "dvc.lock"
    with _DVC_LOCK:
        lock = yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None
        lock = lock or {"schema": "2.0", "stages": {}}
        lock["stages"][stage] = entry
        scratch = path.with_suffix(".lock.tmp")
        scratch.write_text(yaml.safe_dump(lock, sort_keys=False), encoding="utf-8")
        scratch.replace(path)


def _env() -> dict[str, str]:
    """The environment for stage commands: offline, no telemetry, this venv first on PATH."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    return env


# ---------------------------------------------------------------- params


def _key_path(tree: Any, dotted: str) -> list[str]:
    """The keys a DVC params path names in `tree`: the longest key that matches at each
    level, since a name may itself hold dots (`models.qwen2.5-coder-0.5b`)."""
    parts, path = dotted.split("."), []
    while parts:
        end = next((n for n in range(len(parts), 0, -1)
                    if isinstance(tree, dict) and ".".join(parts[:n]) in tree), 1)
        key = ".".join(parts[:end])
        path.append(key)
        tree, parts = (tree.get(key) if isinstance(tree, dict) else None), parts[end:]
    return path


def update_params(path: str | Path, overrides: dict[str, Any]) -> bool:
    """Deep-merge `overrides` into a params file, validated before it is written, through
    DVC's own YAML round trip (comments and layout stay) and atomically; False when nothing
    changes (the file is then not touched)."""
    from dvc.utils.serialize import modify_yaml

    from fin_tasks.config import parse_params

    path = Path(path)
    with _PARAMS_LOCK:  # stages retried at once, or adopted at once, edit one file in turn
        handle, name = tempfile.mkstemp(suffix=".yaml", dir=path.parent)
        os.close(handle)
        scratch = Path(name)
        try:
            shutil.copyfile(path, scratch)
            with modify_yaml(scratch) as data:
                changed = _merge(data, overrides)
                parse_params(json.loads(json.dumps(data)), source=f"{path} + overrides")
            if changed:
                scratch.replace(path)
            return changed
        finally:
            scratch.unlink(missing_ok=True)


def _merge(into: Any, update: dict[str, Any]) -> bool:
    """Merge `update` into the mapping `into` in place; whether anything changed."""
    changed = False
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            changed |= _merge(into[key], value)
        elif into.get(key) != value:
            into[key], changed = value, True
    return changed


def halve_micro_batches(run: str, workdir: str | Path) -> str | None:
    """Split a run's micro-batches in two and double its accumulation (the same effective
    batch) as an override of `train.runs.<run>.hyper` in params.yaml, so that dvc.lock
    records what ran; what was set, or None when they cannot be split."""
    from fin_tasks.config import load_params

    path = Path(workdir) / "params.yaml"
    hyper = load_params(path).train.hyper(run)
    if hyper.micro_batch_size < 2 or hyper.micro_batch_size % 2:
        return None
    update = {"micro_batch_size": hyper.micro_batch_size // 2, "grad_accum": hyper.grad_accum * 2}
    update_params(path, {"train": {"runs": {run: {"hyper": update}}}})
    return (f"params.yaml train.runs.{run}.hyper now sets micro_batch_size "
            f"{update['micro_batch_size']} and grad_accum {update['grad_accum']}")


# ---------------------------------------------------------------- running a stage


class StageFailed(RuntimeError):
    """A stage command exited non-zero; `reason` is its last error line."""

    def __init__(self, stage: str, code: int, reason: str, out_of_memory: bool) -> None:
        super().__init__(f"{stage} failed (exit {code}): {reason}")
        self.stage, self.reason, self.out_of_memory = stage, reason, out_of_memory


def run_command(stage: str, cmd: str, workdir: str | Path,
                on_line: Callable[[str], None] = log.info,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Run a stage's command, passing each log line to `on_line` and each machine-readable
    event (`fin_tasks.events`) to `on_event`; StageFailed on error, with `out_of_memory` set
    from the command's exit status (or its death by SIGKILL, the kernel's OOM killer)."""
    process = subprocess.Popen(shlex.split(cmd), cwd=workdir, env=_env() | {events.ENV: "1"},
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               bufsize=1)
    tail: list[str] = []
    out_of_memory = False
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        event = events.parse(line)
        if event is not None:
            # data-parallel children say it here: their launcher exits 1, not 3
            out_of_memory |= event["event"] == "out_of_memory"
            if on_event is not None:
                on_event(event)
        elif line:
            on_line(line)
            tail = (tail + [line])[-40:]
    code = process.wait()
    if code:
        reason = next((t for t in reversed(tail) if "error" in t.lower()), tail[-1] if tail
                      else "no output")
        raise StageFailed(stage, code, reason.strip(),
                          out_of_memory or code in (events.EXIT_OUT_OF_MEMORY, -9, 137))


def run_stage(stage: Stage, workdir: str | Path, on_line: Callable[[str], None] = log.info,
              oom_retries: int = 2, known_current: bool = False,
              on_event: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Run one stage unless DVC finds it up to date, then commit it: "up-to-date" or "ran".
    `known_current`: the caller already knows DVC finds it up to date (it was clean at the
    start and nothing upstream ran), which spares a DVC call.

    A training that runs out of memory is retried with micro-batches split in two (then
    four...), the same effective batch accumulated over more steps, set in params.yaml."""
    if known_current or up_to_date(stage.name, workdir):
        on_line(f"{stage.name}: up to date (dvc.lock matches), not run")
        return "up-to-date"
    for attempt in range(oom_retries + 1):
        try:
            run_command(stage.name, stage.cmd, workdir, on_line, on_event)
            break
        except StageFailed as failure:
            retry = failure.out_of_memory and stage.group == "train" and attempt < oom_retries
            change = halve_micro_batches(stage.key, workdir) if retry else None
            if change is None:
                raise
            on_line(f"{stage.name}: out of memory; {change} (same effective batch), retrying")
    commit(stage.name, workdir)
    return "ran"
