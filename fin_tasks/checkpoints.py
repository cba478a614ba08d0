"""Where a training's resumable state lives, and which state a run may resume from.

A checkpoint sits in `<root>/<run>-<fingerprint[:12]>/`: `checkpoint.pt` (weights that train,
optimizer, scheduler, RNG states) and `checkpoint.json` (run, step and the fingerprint's
parts, written last). The fingerprint hashes what shapes the numbers: the run's settings,
its data, its base, and the numerics this machine resolves (`auto` compute dtype, device
kind), so a changed run, or the same params on hardware that computes differently, starts
afresh, and says why.

With a shared store (`FIN_TASKS_CHECKPOINT_STORE`: a folder every machine mounts, or an
fsspec URL such as `s3://bucket/fin-tasks-checkpoints`), each checkpoint is also copied there,
so that a training whose machine is lost resumes on another one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from fin_tasks.artifacts import write_json

log = logging.getLogger(__name__)

STATE = "checkpoint.pt"
RECORD = "checkpoint.json"
STORE_ENV = "FIN_TASKS_CHECKPOINT_STORE"


def fingerprint(parts: dict[str, Any]) -> str:
    """One hash of a run's fingerprint parts (settings, data, base, numerics)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def folder(root: str | Path, run: str, parts: dict[str, Any]) -> Path:
    """The local checkpoint folder of this exact run."""
    return Path(root) / f"{run}-{fingerprint(parts)[:12]}"


def write_record(checkpoint_dir: Path, run: str, step: int, parts: dict[str, Any]) -> None:
    """Say what the checkpoint beside it holds (written after `checkpoint.pt`)."""
    write_json(checkpoint_dir / RECORD, {"run": run, "step": step, "fingerprint": parts})


def why_fresh(root: str | Path, run: str, parts: dict[str, Any]) -> str | None:
    """Why this run starts from step 0 although a checkpoint of the same run name exists
    (made under other settings, data, base or numerics: the closest one is named); None
    when there is none."""
    found = []
    for record_path in sorted(Path(root).glob(f"*/{RECORD}")):
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        old = record.get("fingerprint") or {}
        changed = [_change(key, old.get(key), parts[key]) for key in parts
                   if old.get(key) != parts[key]]
        if record.get("run") == run and changed:
            found.append((len(changed), record_path.parent, record.get("step"), changed))
    if not found:
        return None
    _, where, step, changed = min(found, key=lambda item: item[0])
    return (f"run {run}: the checkpoint at step {step} in {where} was made with "
            f"{'; '.join(changed)}; starting afresh")


def _change(key: str, old: Any, new: Any) -> str:
    if key == "numerics" and isinstance(old, dict):
        return "numerics " + ", ".join(f"{k} {old.get(k)} (now {v})" for k, v in new.items()
                                       if old.get(k) != v)
    return f"other {key}"


def push(checkpoint_dir: Path, store: str) -> None:
    """Copy a checkpoint to the shared store: the state first, then its record, each under
    a temporary name and then renamed, so a reader never sees a half-written one."""
    fs, base = _store(store, checkpoint_dir.name)
    fs.makedirs(base, exist_ok=True)
    for name in (STATE, RECORD):
        fs.put_file(str(checkpoint_dir / name), f"{base}/.{name}.part")
        fs.mv(f"{base}/.{name}.part", f"{base}/{name}")
    log.info("checkpoint copied to the store: %s/%s", store.rstrip("/"), checkpoint_dir.name)


def pull(checkpoint_dir: Path, store: str) -> bool:
    """Fetch this run's checkpoint from the shared store when there is one and it is ahead
    of the local one (another machine trained further); whether one was fetched."""
    fs, base = _store(store, checkpoint_dir.name)
    if not fs.exists(f"{base}/{RECORD}"):
        return False
    with fs.open(f"{base}/{RECORD}", "r") as handle:
        remote_step = json.load(handle)["step"]
    local = checkpoint_dir / RECORD
    if local.exists() and json.loads(local.read_text(encoding="utf-8"))["step"] >= remote_step:
        return False
    scratch = checkpoint_dir.with_name(f".{checkpoint_dir.name}.pull")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    for name in (STATE, RECORD):
        fs.get_file(f"{base}/{name}", str(scratch / name))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    scratch.replace(checkpoint_dir)
    log.info("resuming from the store's checkpoint at step %d (%s/%s)", remote_step,
             store.rstrip("/"), checkpoint_dir.name)
    return True


def drop(checkpoint_dir: Path, store: str | None) -> None:
    """Remove a finished run's checkpoint, here and in the store."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if store:
        fs, base = _store(store, checkpoint_dir.name)
        if fs.exists(base):
            fs.rm(base, recursive=True)


def _store(store: str, name: str) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(store)
    return fs, f"{root.rstrip('/')}/{name}"
