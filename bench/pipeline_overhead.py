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
    parser.add_argument("--reuse", action="store_true",
                        help="time only the no-op runs in a workdir that a full run left")
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    full = None
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        copy_project(work)
        (work / "dvc.lock").unlink(missing_ok=True)
        full, _ = timed(["dvc", "repro"], work)
    noop, log = timed(["dvc", "repro"], work)
    assert "Running stage" not in log
    status, _ = timed(["dvc", "status"], work)
    flow, log = timed([sys.executable, "-m", "flows.pipeline", "--workdir", str(work)], work)
    skipped = log.count("up to date (dvc.lock matches)")
    assert "Running stage" not in log and skipped, "the flow re-ran a stage"

    def share(seconds: float) -> str:
        return f"{100 * seconds / full:.1f}%" if full else "-"

    print(f"\nDefault params.yaml, {skipped} stages, {work}\n")
    print("| run | seconds | share of the work |\n|---|---|---|")
    if full:
        print(f"| `dvc repro`, everything to do (the work) | {full:.1f} | 100% |")
    print(f"| `dvc repro`, nothing to do | {noop:.1f} | {share(noop)} |")
    print(f"| `dvc status` | {status:.1f} | {share(status)} |")
    print(f"| flow run (ephemeral Prefect server), every stage up to date | {flow:.1f} | "
          f"{share(flow)} |")


if __name__ == "__main__":
    main()
