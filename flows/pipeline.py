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
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.states import Failed

from fin_tasks.config import load_params, parse_params
from fin_tasks.layout import Layout
from flows.stages import (Stage, StageFailed, adopt_lock_entry, changed_stages, dvc,
                          progress_of, run_stage, stage_graph, up_to_date, with_upstream)

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


@task(task_run_name="{stage.name}")
def run_here(stage: Stage, workdir: str, known_current: bool = False) -> str:
    """Run one stage in this workspace (fin_tasks through its CLI, as dvc.yaml says)."""
    logger = get_run_logger()
    progress = None
    if stage.group == "train" and not known_current:
        progress = create_progress_artifact(progress=0.0, key=f"progress-{slug(stage.name)}",
                                            description=f"{stage.name} on {machine()}")

    def on_line(line: str) -> None:
        logger.info(line)
        percent = progress_of(line) if progress else None
        if percent is not None:
            update_progress_artifact(progress, percent)

    status = run_stage(stage, workdir, on_line, known_current=known_current)
    if progress:
        update_progress_artifact(progress, 100.0)
    return status


@task(task_run_name="{stage_name} (gpu pool)")
def run_on_gpu_pool(stage_name: str, upstream: list[str], workdir: str,
                    deployment: str = GPU_DEPLOYMENT) -> str:
    """Run one stage as a flow run on the GPU pool, through the DVC remote both ways."""
    from prefect.deployments import run_deployment

    if up_to_date(stage_name, workdir):
        return "up-to-date"
    if upstream:
        transfer("push", upstream, workdir)
    lock = (Path(workdir) / "dvc.lock").read_text(encoding="utf-8")
    params = (Path(workdir) / "params.yaml").read_text(encoding="utf-8")
    run = run_deployment(deployment, parameters={"stage_name": stage_name, "lock": lock,
                                                 "params": params}, timeout=None)
    if not run.state or not run.state.is_completed():
        raise StageFailed(stage_name, 1, f"gpu flow run {run.name} ended "
                          f"{run.state.name if run.state else 'without a state'}", False)
    adopt_lock_entry(stage_name, _lock_entry_from(run.id), workdir)
    transfer("pull", [stage_name], workdir)
    return "ran"


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
        _apply_overrides(root / "params.yaml", overrides)
    params = load_params(root / "params.yaml")
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
    """Submit each stage once its upstream succeeded; skip it when one failed."""
    logger = get_run_logger()
    pending = {s.name: s for s in stages}
    changed = changed_stages(workdir)  # one DVC call; a stage clean now stays clean unless
    running: dict[str, Any] = {}       # something upstream of it runs
    outcome: dict[str, str] = {}
    failures: dict[str, str] = {}
    while pending or running:
        for name, node in list(pending.items()):
            blocked = [u for u in node.upstream if outcome.get(u, "").startswith(("failed",
                                                                                  "skipped"))]
            if blocked:
                outcome[name] = f"skipped: {blocked[0]} did not complete"
                del pending[name]
            elif all(u in outcome for u in node.upstream):
                current = name not in changed and all(outcome[u] == "up-to-date"
                                                       for u in node.upstream)
                running[name] = _submit(node, params, workdir, dispatch_gpu, current)
                del pending[name]
        for name, future in list(running.items()):
            if future.state.is_final():
                del running[name]
                try:
                    outcome[name] = future.result()
                except Exception as error:  # a failed stage must not stop the others
                    reason = error.reason if isinstance(error, StageFailed) else str(error)
                    outcome[name], failures[name] = f"failed: {reason}", reason
                    logger.error("%s failed: %s", name, reason)
        time.sleep(0.2)
    return outcome, failures


def _submit(node: Stage, params: Any, workdir: str, dispatch_gpu: bool,
            current: bool) -> Any:
    if node.group == "train" and node.key in params.train.runs and not current:
        model = params.models[params.train.runs[node.key].model]
        if model.gpu and dispatch_gpu:
            return run_on_gpu_pool.submit(node.name, list(node.upstream), workdir)
        if model.gpu:
            return run_here.with_options(tags=[gpu_tag()]).submit(node, workdir)
    return run_here.submit(node, workdir, current)


def _publish(params: Any, stages: list[Stage], outcome: dict[str, str], root: Path) -> None:
    """Dashboard artifacts: each run's metrics, submission checks, the leaderboard."""
    layout = Layout(root / "outputs")
    for node in stages:
        if outcome.get(node.name, "").startswith(("failed", "skipped")):
            continue
        if node.group in ("evaluate", "evaluate_merge"):
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
    for run in list(params.train.runs) + list(params.merge):
        reason = next((f"{name}: {outcome[name]}" for name in outcome
                       if name.split("@", 1)[-1] == run and not outcome[name].startswith(
                           ("ran", "up-to-date"))), None)
        if reason:
            failed[run] = reason
    layout = Layout(root / "outputs")
    build_report(params, layout.root, layout.report(), failed=failed)
    create_markdown_artifact(key="leaderboard", description="fin-tasks leaderboard (with failures)",
                             markdown=(layout.report() / "leaderboard.md").read_text())


def _apply_overrides(path: Path, overrides: dict[str, Any]) -> None:
    """Deep-merge `overrides` into params.yaml, validated before it is written."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}

    def merge(into: dict, update: dict) -> dict:
        for key, value in update.items():
            into[key] = merge(dict(into.get(key) or {}), value) if isinstance(value, dict) \
                else value
        return into

    merged = merge(raw, overrides)
    parse_params(merged, source=f"{path} + overrides")
    scratch = path.with_suffix(".yaml.tmp")
    scratch.write_text(yaml.safe_dump(merged, sort_keys=False, allow_unicode=True),
                       encoding="utf-8")
    scratch.replace(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="project checkout (default: this one)")
    parser.add_argument("--model", action="append", help="only these models' runs")
    parser.add_argument("--task", action="append", help="only these tasks' runs")
    parser.add_argument("--push", action="store_true", help="dvc push the outputs at the end")
    args = parser.parse_args()
    pipeline(args.workdir, args.model, args.task, push=args.push)
