"""The pipeline as a Prefect flow: the same library functions `dvc repro` calls.

    python -m flows.pipeline --params params.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task

from fin_tasks.config import load_params
from fin_tasks.layout import Layout
from fin_tasks.prepare import prepare_task


@task(task_run_name="prepare-{name}")
def prepare(name: str, params_path: str, out_dir: str) -> dict:
    """Prepare one task's splits (fin_tasks.prepare.prepare_task)."""
    params = load_params(params_path)
    return prepare_task(name, params.tasks[name], params.prepare,
                        Layout(Path(out_dir)).prepared(name))


@flow(name="fin-tasks", log_prints=True)
def pipeline(params_path: str = "params.yaml", tasks: list[str] | None = None,
             out_dir: str = "outputs") -> dict[str, dict]:
    """Run the stages that exist so far for the selected tasks (default: all)."""
    names = tasks or list(load_params(params_path).tasks)
    futures = {name: prepare.submit(name, params_path, out_dir) for name in names}
    return {name: future.result() for name, future in futures.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--task", action="append")
    args = parser.parse_args()
    pipeline(args.params, args.task)
