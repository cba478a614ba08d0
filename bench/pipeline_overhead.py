"""Pipeline overhead: a no-op `dvc repro` and a no-op flow run on the default params, beside
the time of the work they skip. In a fresh copy of the project: a full `dvc repro` (the work),
then `dvc repro` again (nothing to do), then the Prefect flow (every stage up to date).

    python bench/pipeline_overhead.py [--workdir bench-out/overhead]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def copy_project(target: Path) -> None:
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, names.split("\0")):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)


def timed(args: list[str], cwd: Path) -> tuple[float, str]:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1",
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    started = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench-out/overhead")
    work = Path(parser.parse_args().workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    copy_project(work)
    (work / "dvc.lock").unlink(missing_ok=True)
    full, log = timed(["dvc", "repro"], work)
    stages = log.count("Running stage")
    noop, log = timed(["dvc", "repro"], work)
    assert "Running stage" not in log
    status, _ = timed(["dvc", "status"], work)
    flow, log = timed([sys.executable, "-m", "flows.pipeline", "--workdir", str(work)], work)
    assert log.count("up to date (dvc.lock matches)") == stages, "the flow re-ran a stage"
    print(f"\nDefault params.yaml, {stages} stages, fresh copy of the project\n")
    print("| run | seconds | share of the work |\n|---|---|---|")
    print(f"| `dvc repro`, everything to do (the work) | {full:.1f} | 100% |")
    print(f"| `dvc repro`, nothing to do | {noop:.1f} | {100 * noop / full:.1f}% |")
    print(f"| `dvc status` | {status:.1f} | {100 * status / full:.1f}% |")
    print(f"| flow run (ephemeral Prefect server), every stage up to date | {flow:.1f} | "
          f"{100 * flow / full:.1f}% |")


if __name__ == "__main__":
    main()
