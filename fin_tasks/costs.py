"""What a stage cost on this machine: seconds, speed and peak memory, with the machine it ran on.

These figures change from one run to the next, so they stay out of every DVC output: DVC hashes
whatever a stage declares, and one timing there would make each rerun's `dvc.lock` differ and
keep a shared cache from ever hitting. The library hands them to `record`; where they go is
the caller's choice, as with logging: the CLI sends them to `outputs/costs/<stage>/<name>.json`
(no stage declares that folder, and git ignores `outputs/`), and `fin-tasks report` gathers
them into `outputs/costs/summary.md`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

from fin_tasks.artifacts import write_json

_folder: Path | None = None
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what sets CPU speed and numerics


def write_to(folder: str | Path | None) -> None:
    """Send this process's cost records to `folder` (None: keep none)."""
    global _folder
    _folder = Path(folder) if folder is not None else None


def record(stage: str, name: str, figures: dict[str, Any]) -> None:
    """Keep one stage run's costs (merged into what the same stage and name recorded before
    in this process, e.g. one prediction split after another), with the machine."""
    if _folder is None:
        return
    path = _folder / stage / f"{name}.json"
    earlier = read(path) if path.exists() else {}
    when = datetime.datetime.now().isoformat(timespec="seconds")
    write_json(path, earlier | figures | {"machine": machine(), "at": when})


def read(path: str | Path) -> dict[str, Any]:
    """A cost record, or {} when there is none."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def machine() -> dict[str, Any]:
    """The machine as it matters for a timing: host, CPU model and flags, cores, load, GPU."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    torch = sys.modules.get("torch")  # only when the stage loaded it: baselines never do
    gpu = torch.cuda.get_device_name(0) if torch and torch.cuda.is_available() else None
    return {"host": socket.gethostname(), "cpu": model,
            "cpu_flags": [f for f in CPU_FLAGS if f in flags], "cores": os.cpu_count(),
            "load_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "gpu": gpu}
