"""Create the work pools and deployments on the Prefect server that PREFECT_API_URL names.

    python -m flows.deploy [--params params.yaml]

- `fin-tasks/nightly` runs the `pipeline` flow on the `cpu` process pool on the cron schedule
  of params.yaml's `schedule` section;
- `fin-tasks-stage/gpu` runs one stage (a training) on the `gpu` process pool, for workers
  on GPU machines (each with its own checkout and the shared DVC remote).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from prefect.schedules import Cron

from fin_tasks.config import load_params
from fin_tasks.schedule import schedule_config
from flows.pipeline import ROOT, pipeline, stage

POOLS = {"cpu": "the pipeline flow and CPU stages", "gpu": "trainings of `gpu: true` models"}


def ensure_pools() -> None:
    """Create the `cpu` and `gpu` process work pools when missing."""
    for pool in POOLS:
        done = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "inspect", pool],
                              capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", pool,
                            "--type", "process"], check=True, capture_output=True, text=True)


def deploy(params_path: Path) -> None:
    """Register both deployments (idempotent: a rerun updates them)."""
    schedule = schedule_config(load_params(params_path), str(params_path))
    ensure_pools()
    pipeline.from_source(source=str(ROOT), entrypoint="flows/pipeline.py:pipeline").deploy(
        name="nightly", work_pool_name="cpu", tags=["fin-tasks"],
        schedules=[Cron(schedule.cron, timezone=schedule.timezone)],
        parameters={"dispatch_gpu": schedule.dispatch_gpu, "push": schedule.push},
        description=f"The whole pipeline, {schedule.cron} ({schedule.timezone})",
        print_next_steps=False, build=False, push=False)
    stage.from_source(source=str(ROOT), entrypoint="flows/pipeline.py:stage").deploy(
        name="gpu", work_pool_name="gpu", tags=["fin-tasks"], print_next_steps=False,
        description="One stage on a GPU worker, through the DVC remote", build=False,
        push=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    deploy(Path(parser.parse_args().params))
