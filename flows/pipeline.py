"""The pipeline as Prefect flows, over the stage graph that dvc.yaml defines.

    python -m flows.pipeline                      # the whole graph, here
    python -m flows.pipeline --model tiny-llama   # one model's runs (and what they need)

`pipeline` runs every stage of dvc.yaml in dependency order, concurrently where the graph
allows, skipping what DVC finds up to date (so it recomputes nothing after `dvc repro`, and
`dvc repro` nothing after it). With `dispatch_gpu`, the training of each model entry marked
`gpu: true` runs as a `fin-tasks-stage` flow run on the `gpu` work pool: the worker there pulls
the stage's inputs from the DVC remote, runs it and pushes its outputs back. A failed stage
does not stop the others; what depends on it is skipped and the report names it as failed.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.futures import PrefectFuture
from prefect.states import Failed
from prefect.utilities.annotations import allow_failure

from fin_tasks.config import load_params
from fin_tasks.layout import Layout
from fin_tasks.schedule import schedule_config
from flows.stages import (Stage, StageFailed, adopt_lock_entry, changed_stages, dvc,
                          run_stage, stage_graph, up_to_date, update_params, with_upstream)

ROOT = Path(__file__).resolve().parents[1]
GPU_DEPLOYMENT = "fin-tasks-stage/gpu"


def workspace(workdir: str | None = None) -> Path:
    """The project checkout to run in: the argument, $FIN_TASKS_WORKSPACE, or this one."""
    return Path(workdir or os.environ.get("FIN_TASKS_WORKSPACE") or ROOT).resolve()


def machine() -> str:
    """This worker's name: $FIN_TASKS_MACHINE, or the host name."""
    return os.environ.get("FIN_TASKS_MACHINE") or socket.gethostname()


def slug(text: str) -> str:
    """An artifact key: lower-case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def gpu_tag() -> str:
    """The concurrency tag of this machine's GPUs, with a limit of one training per GPU
    ($FIN_TASKS_GPUS, or the CUDA device count, at least 1), created when missing."""
    from prefect.client.orchestration import get_client

    tag = f"gpu-{slug(machine())}"
    gpus = os.environ.get("FIN_TASKS_GPUS")
    if gpus is None:
        import torch

        gpus = str(max(1, torch.cuda.device_count()))
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=tag, concurrency_limit=int(gpus))
    return tag


# ---------------------------------------------------------------- tasks


@task(retries=3, retry_delay_seconds=[2, 10, 30], task_run_name="dvc {verb}")
def transfer(verb: str, targets: list[str], workdir: str) -> None:
    """`dvc push` / `dvc pull` (idempotent I/O: retried with back-off)."""
    dvc([verb, *targets], workdir)


def _blocked(upstream: dict[str, Any] | None) -> str | None:
    """The first upstream stage that did not complete: its future failed (Prefect hands a
    failed input over as its exception, through `allow_failure`) or it was skipped."""
    return next((name for name, outcome in (upstream or {}).items()
                 if not isinstance(outcome, str) or outcome.startswith("skipped")), None)


def _current(upstream: dict[str, Any] | None, changed: bool) -> bool:
    """Whether DVC is known to find a stage up to date: it was clean at the start of the run
    and nothing upstream of it ran since."""
    return not changed and all(outcome == "up-to-date" for outcome in (upstream or {}).values())


@task(task_run_name="{stage.name}")
def run_here(stage: Stage, workdir: str, upstream: dict[str, Any] | None = None,
             changed: bool = True) -> str:
    """Run one stage in this workspace (fin_tasks through its CLI, as dvc.yaml says), once
    the `upstream` stages' futures have resolved; skipped if one of them did not complete.
    `changed`: DVC found the stage out of date at the start of the run."""
    blocked = _blocked(upstream)
    if blocked:
        return f"skipped: {blocked} did not complete"
    logger = get_run_logger()
    known_current = _current(upstream, changed)
    progress = None
    if stage.group == "train" and not known_current:
        progress = create_progress_artifact(progress=0.0, key=f"progress-{slug(stage.name)}",
                                            description=f"{stage.name} on {machine()}")

    updated = [0.0]  # when the artifact last changed: one API call a second at most

    def on_event(event: dict[str, Any]) -> None:
        if progress and event["event"] == "progress" and time.monotonic() - updated[0] >= 1:
            update_progress_artifact(progress, 100.0 * event["step"] / event["total"])
            updated[0] = time.monotonic()

    status = run_stage(stage, workdir, logger.info, known_current=known_current,
                       on_event=on_event)
    if progress:
        update_progress_artifact(progress, 100.0)
    return status


@task(task_run_name="{stage_name} (gpu pool)")
def run_on_gpu_pool(stage_name: str, upstream: dict[str, Any], workdir: str,
                    changed: bool = True, deployment: str = GPU_DEPLOYMENT,
                    resubmits: int = 2) -> str:
    """Run one stage as a flow run on the GPU pool, through the DVC remote both ways, once
    the `upstream` stages' futures have resolved; skipped if one of them did not complete.
    A flow run that crashed (its worker lost: see `flows.deploy.crash_lost_stages`) is
    resubmitted up to `resubmits` times; a training resumes from the shared checkpoint store."""
    blocked = _blocked(upstream)
    if blocked:
        return f"skipped: {blocked} did not complete"
    if _current(upstream, changed) or up_to_date(stage_name, workdir):
        return "up-to-date"
    if upstream:
        transfer("push", list(upstream), workdir)
    lock = (Path(workdir) / "dvc.lock").read_text(encoding="utf-8")
    params = (Path(workdir) / "params.yaml").read_text(encoding="utf-8")
    run = _run_until_not_crashed(stage_name, deployment, {
        "stage_name": stage_name, "lock": lock, "params": params}, resubmits,
        get_run_logger().warning)
    adopt_lock_entry(stage_name, _lock_entry_from(run.id), workdir)
    transfer("pull", [stage_name], workdir)
    return "ran"


def _run_until_not_crashed(stage_name: str, deployment: str, parameters: dict[str, Any],
                           resubmits: int, warn: Callable[[str], None]) -> Any:
    """The stage's completed flow run, after at most `resubmits` resubmissions of crashed
    ones; StageFailed naming the stage and what happened otherwise."""
    from prefect.deployments import run_deployment

    for attempt in range(resubmits + 1):
        run = run_deployment(deployment, parameters=parameters, timeout=None)
        state = run.state
        if state is not None and state.is_completed():
            return run
        ended = f"gpu flow run {run.name} ended {state.name if state else 'without a state'}"
        if state is None or not state.is_crashed():
            raise StageFailed(stage_name, 1, f"{ended}: {state.message if state else ''}",
                              False)
        if attempt == resubmits:
            raise StageFailed(stage_name, 1, f"{ended} ({state.message}); crashed "
                              f"{attempt + 1} times, so not resubmitted again "
                              f"(schedule.gpu_resubmits: {resubmits})", False)
        warn(f"{stage_name}: {ended} ({state.message}); resubmitting "
             f"({attempt + 1} of {resubmits})")
    raise AssertionError("unreachable")


def _lock_entry_from(flow_run_id: Any) -> dict:
    """The dvc.lock entry a stage flow run published as its `dvc-lock-*` artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    data = next(a.data for a in artifacts if (a.key or "").startswith("dvc-lock-"))
    return yaml.safe_load(data.split("```yaml", 1)[1].split("```", 1)[0])


# ---------------------------------------------------------------- flows


@flow(name="fin-tasks-stage", flow_run_name="{stage_name}")
def stage(stage_name: str, lock: str, params: str, workdir: str | None = None) -> str:
    """One stage on this worker: take the pipeline's dvc.lock and params, pull the stage's
    inputs from the DVC remote, run it, push its outputs, publish its dvc.lock entry."""
    logger = get_run_logger()
    root = workspace(workdir)
    (root / "params.yaml").write_text(params, encoding="utf-8")
    (root / "dvc.lock").write_text(lock, encoding="utf-8")
    node = next(s for s in stage_graph(root) if s.name == stage_name)
    logger.info("%s on worker %s in %s", stage_name, machine(), root)
    if node.upstream:
        transfer("pull", list(node.upstream), str(root))
    status = run_here.with_options(tags=[gpu_tag()])(node, str(root))
    transfer("push", [stage_name], str(root))
    entry = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))["stages"][stage_name]
    create_markdown_artifact(
        key=f"dvc-lock-{slug(stage_name)}",
        markdown=f"{stage_name} ran on worker **{machine()}**\n\n```yaml\n"
                 f"{yaml.safe_dump(entry, sort_keys=False)}```\n",
        description=f"worker: {machine()}")
    return status


@flow(name="fin-tasks", log_prints=True)
def pipeline(workdir: str | None = None, models: list[str] | None = None,
             tasks: list[str] | None = None, overrides: dict[str, Any] | None = None,
             dispatch_gpu: bool = False, push: bool = False) -> dict[str, str]:
    """Every stage of dvc.yaml (or the selected models' and tasks' runs), in dependency order.

    `overrides` are merged into params.yaml first (and so recorded by DVC like any edit);
    `dispatch_gpu` sends trainings of `gpu: true` models to the gpu pool; `push` sends every
    output to the DVC remote at the end."""
    logger = get_run_logger()
    root = workspace(workdir)
    if overrides:
        update_params(root / "params.yaml", overrides)
    params = load_params(root / "params.yaml")
    schedule_config(params, str(root / "params.yaml"))  # a typo there fails now, not at deploy
    stages = select(stage_graph(root), params, models, tasks)
    logger.info("%d stages in %s: %s", len(stages), root, ", ".join(s.name for s in stages))
    outcome, failures = _schedule(stages, params, str(root), dispatch_gpu)
    _publish(params, stages, outcome, root)
    if failures:
        _report_failures(params, root, failures, outcome)
    if push:
        transfer("push", [], str(root))
    if failures:
        return Failed(message=f"{len(failures)} stage(s) failed: " + "; ".join(
            f"{name}: {reason}" for name, reason in failures.items()), data=outcome)
    return outcome


def select(stages: list[Stage], params: Any, models: list[str] | None,
           tasks: list[str] | None) -> list[Stage]:
    """The stages of the runs on the chosen models and tasks, and what they need; all
    stages when nothing is chosen (submission and report need every run, so a selection
    leaves them out)."""
    if not models and not tasks:
        return stages
    runs = {name for name, run in params.train.runs.items()
            if (not models or run.model in models) and (not tasks or run.task in tasks)}
    wanted = [s.name for s in stages if s.group in ("train", "predict", "evaluate")
              and s.key in runs]
    return with_upstream(stages, wanted)


def _schedule(stages: list[Stage], params: Any, workdir: str,
              dispatch_gpu: bool) -> tuple[dict[str, str], dict[str, str]]:
    """Submit every stage at once, in graph order, each a Prefect task whose inputs are its
    upstream stages' futures (`allow_failure`: a failed one reaches it as an exception, and
    it skips itself); Prefect starts each as soon as its inputs resolve. A failed stage
    does not stop the others."""
    logger = get_run_logger()
    changed = changed_stages(workdir)  # one DVC call; a stage clean now stays clean unless
    futures: dict[str, PrefectFuture] = {}  # something upstream of it runs
    for node in stages:
        upstream = {u: allow_failure(futures[u]) for u in node.upstream if u in futures}
        futures[node.name] = _submit(node, params, workdir, dispatch_gpu, upstream,
                                     node.name in changed)
    outcome: dict[str, str] = {}
    failures: dict[str, str] = {}
    for name, future in futures.items():
        future.wait()
        if future.state.is_pending():  # NotReady: an upstream crashed or was cancelled
            outcome[name] = "skipped: an upstream stage did not complete"
            continue
        try:
            outcome[name] = future.result()
        except Exception as error:  # a failed stage must not stop the others
            reason = error.reason if isinstance(error, StageFailed) else str(error)
            outcome[name], failures[name] = f"failed: {reason}", reason
            logger.error("%s failed: %s", name, reason)
    return outcome, failures


def _submit(node: Stage, params: Any, workdir: str, dispatch_gpu: bool,
            upstream: dict[str, Any], changed: bool) -> PrefectFuture:
    if node.group == "train" and node.key in params.train.runs:
        model = params.models[params.train.runs[node.key].model]
        if model.gpu and dispatch_gpu:
            return run_on_gpu_pool.submit(node.name, upstream, workdir, changed,
                                          resubmits=schedule_config(params).gpu_resubmits)
        if model.gpu:
            return run_here.with_options(tags=[gpu_tag()]).submit(node, workdir, upstream,
                                                                   changed)
    return run_here.submit(node, workdir, upstream, changed)


def _publish(params: Any, stages: list[Stage], outcome: dict[str, str], root: Path) -> None:
    """Dashboard artifacts: each run's metrics, submission checks, the leaderboard."""
    layout = Layout(root / "outputs")
    for node in stages:
        if outcome.get(node.name, "").startswith(("failed", "skipped")):
            continue
        if node.group in ("evaluate", "evaluate_merge", "evaluate_ensemble"):
            metrics = layout.read_evaluation(node.key)
            key = metrics["ranking_metric"]
            create_table_artifact(
                key=f"metrics-{slug(node.key)}", description=f"{node.key}: {key} by variant",
                table=[{"variant": v, "split": s, key: round(m[key], 4), "rows": m["rows"]}
                       for v, splits in metrics["metrics"].items() for s, m in splits.items()])
        elif node.group == "submit":
            report = (layout.submission(node.key) / "validation.json").read_text()
            create_markdown_artifact(key=f"submission-{slug(node.key)}",
                                     markdown=f"# Submission {node.key}\n\n```json\n{report}\n```",
                                     description=f"validated submission bundle for {node.key}")
        elif node.group == "report":
            create_markdown_artifact(
                key="leaderboard", description="fin-tasks leaderboard",
                markdown=(layout.report() / "leaderboard.md").read_text(encoding="utf-8"))


def _report_failures(params: Any, root: Path, failures: dict[str, str],
                     outcome: dict[str, str]) -> None:
    """A leaderboard of what did finish, naming the runs that failed and why."""
    from fin_tasks.report import build_report

    failed: dict[str, str] = {}
    for run in [*params.train.runs, *params.merge, *params.ensemble]:
        reason = next((f"{name}: {outcome[name]}" for name in outcome
                       if name.split("@", 1)[-1] == run and not outcome[name].startswith(
                           ("ran", "up-to-date"))), None)
        if reason:
            failed[run] = reason
    layout = Layout(root / "outputs")
    build_report(params, layout.root, layout.report(), failed=failed)
    create_markdown_artifact(key="leaderboard", description="fin-tasks leaderboard (with failures)",
                             markdown=(layout.report() / "leaderboard.md").read_text())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="project checkout (default: this one)")
    parser.add_argument("--model", action="append", help="only these models' runs")
    parser.add_argument("--task", action="append", help="only these tasks' runs")
    parser.add_argument("--push", action="store_true", help="dvc push the outputs at the end")
    args = parser.parse_args()
    pipeline(args.workdir, args.model, args.task, push=args.push)
