"""The `schedule` section of params: when the scheduled Prefect deployment re-runs the
pipeline. Only the flows read it (`flows/deploy.py`), so it lives here and not in
`config.py`, which every stage imports: editing it reruns no stage.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from fin_tasks.config import Params, Strict, parse_section


class ScheduleConfig(Strict):
    """When the scheduled Prefect deployment re-runs the pipeline (`flows/deploy.py`), and how
    it treats GPU workers that disappear."""

    cron: str = "0 2 * * *"
    """Cron expression of the `fin-tasks/nightly` deployment (default: 02:00 every day)."""
    timezone: str = "UTC"
    """Time zone of the cron expression."""
    dispatch_gpu: bool = True
    """Send trainings of `gpu: true` models to the `gpu` work pool's workers."""
    push: bool = True
    """Push every output to the DVC remote at the end of a scheduled run."""
    heartbeat_s: int = Field(60, ge=30)
    """Seconds between the heartbeats of a GPU stage's flow run (Prefect's minimum is 30)."""
    lost_after_s: int = Field(180, ge=60)
    """A GPU stage whose heartbeats stop this long is marked Crashed (its worker is taken as
    lost) and resubmitted; at least two heartbeats long."""
    gpu_resubmits: int = Field(2, ge=0)
    """How many times a crashed GPU stage is resubmitted (each resumes from the shared
    checkpoint store) before the pipeline reports it failed."""

    @model_validator(mode="after")
    def _two_heartbeats(self) -> ScheduleConfig:
        if self.lost_after_s < 2 * self.heartbeat_s:
            raise ValueError(f"lost_after_s {self.lost_after_s} is under two heartbeats "
                             f"({2 * self.heartbeat_s} s): live stages would be crashed")
        return self


def schedule_config(params: Params, source: str = "params") -> ScheduleConfig:
    """The validated `schedule` section (defaults where it is absent)."""
    return parse_section(ScheduleConfig, params.schedule, "schedule", source)
