"""The `schedule` section of params: when the scheduled Prefect deployment re-runs the
pipeline. Only the flows read it (`flows/deploy.py`), so it lives here and not in
`config.py`, which every stage imports: editing it reruns no stage.
"""

from __future__ import annotations

from fin_tasks.config import Params, Strict, parse_section


class ScheduleConfig(Strict):
    """When the scheduled Prefect deployment re-runs the pipeline (`flows/deploy.py`)."""

    cron: str = "0 2 * * *"
    """Cron expression of the `fin-tasks/nightly` deployment (default: 02:00 every day)."""
    timezone: str = "UTC"
    """Time zone of the cron expression."""
    dispatch_gpu: bool = True
    """Send trainings of `gpu: true` models to the `gpu` work pool's workers."""
    push: bool = True
    """Push every output to the DVC remote at the end of a scheduled run."""


def schedule_config(params: Params, source: str = "params") -> ScheduleConfig:
    """The validated `schedule` section (defaults where it is absent)."""
    return parse_section(ScheduleConfig, params.schedule, "schedule", source)
