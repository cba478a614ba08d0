"""Create the work pools and deployments on the Prefect server that PREFECT_API_URL names.

    python -m flows.deploy [--params params.yaml]

- `fin-tasks/nightly` runs the `pipeline` flow on the `cpu` process pool on the cron schedule
  of params.yaml's `schedule` section;
- `fin-tasks-stage/gpu` runs one stage (a training) on the `gpu` process pool, for workers
  on GPU machines (each with its own checkout and the shared DVC remote); its flow runs send
  a heartbeat every `schedule.heartbeat_s`;
- the automation `fin-tasks: crash lost GPU stages` marks such a flow run Crashed when its
  heartbeats stop for `schedule.lost_after_s` (its machine is gone: Prefect's own way to
  detect zombie flow runs), and the pipeline resubmits it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.schedules import Cron

from fin_tasks.checkpoints import STORE_ENV
from fin_tasks.config import load_params
from fin_tasks.schedule import schedule_config
from flows.pipeline import ROOT, pipeline, stage

LOST_STAGES = "fin-tasks: crash lost GPU stages"
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
    deployment_id = stage.from_source(source=str(ROOT), entrypoint="flows/pipeline.py:stage"
                                      ).deploy(
        name="gpu", work_pool_name="gpu", tags=["fin-tasks"], print_next_steps=False,
        description="One stage on a GPU worker, through the DVC remote", build=False,
        push=False, job_variables={"env": stage_env(schedule.heartbeat_s)})
    crash_lost_stages(deployment_id, schedule.lost_after_s)


def stage_env(heartbeat_s: int) -> dict[str, str]:
    """What a GPU stage's flow run gets in its environment: its heartbeat, and the shared
    checkpoint store when this machine names one (each worker may also set its own)."""
    env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(heartbeat_s)}
    if os.environ.get(STORE_ENV):
        env[STORE_ENV] = os.environ[STORE_ENV]
    return env


def crash_lost_stages(deployment_id: Any, lost_after_s: int) -> None:
    """The automation that marks a GPU stage's flow run Crashed once its heartbeats stop for
    `lost_after_s` (replacing an earlier version of it)."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with contextlib.suppress(ValueError):  # not there yet
        Automation.read(name=LOST_STAGES).delete()
    Automation(
        name=LOST_STAGES, description="A GPU worker went silent: its stage is resubmitted",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({
                "prefect.resource.role": "deployment",
                "prefect.resource.id": f"prefect.deployment.{deployment_id}"}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=lost_after_s)),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"no heartbeat for {lost_after_s} s: the GPU worker was lost")],
    ).create()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    deploy(Path(parser.parse_args().params))
