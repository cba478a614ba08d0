"""Prefect flows over dvc.yaml's stage graph: order, skipping, retries, failures, no rework."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.stages import (StageFailed, run_command, run_stage, stage_graph, up_to_date,
                          with_upstream)

from conftest import ROOT, project_copy

# The default params.yaml (dvc.yaml names each of its sections) cut down to one task and the
# majority baseline: every stage kind, in seconds.
FLOW_PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text()) | {
    "tasks": {"finarg_ecc": {"type": "finarg_ecc", "data": "data/demo/finarg_ecc",
                             "splits": {"train": "train.jsonl", "test": "test.jsonl"}}},
    "models": {"majority": {"kind": "majority"}},
    "predict": {"variants": ["adapter"]},
    "evaluate": {"bootstrap": 20, "bertscore_model": None},
    "submit": {"tasks": {"finarg_ecc": {"include_baselines": True}}},
    "corpus": {}, "questions": {}, "merge": {}, "ensemble": {},
}
FLOW_PARAMS["train"] = FLOW_PARAMS["train"] | {
    "runs": {"majority-finarg_ecc": {"model": "majority", "task": "finarg_ecc"}}}


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server/database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def _project(tmp_path: Path, params: dict) -> Path:
    root = project_copy(tmp_path / "project")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.lock").unlink(missing_ok=True)
    return root


def _dvc(args: list[str], cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True,
                          text=True, env=os.environ | {"DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_stage_graph_is_read_from_dvc_yaml() -> None:
    stages = {s.name: s for s in stage_graph(ROOT)}
    train = stages["train@smollm2-finarg_ecc"]
    assert set(train.upstream) >= {"prepare@finarg_ecc", "base@smollm2"}
    assert train.cmd == "fin-tasks train --run smollm2-finarg_ecc"
    assert "questions@numeric_mcq" in stages["prepare@numeric_mcq"].upstream
    order = [s.name for s in stage_graph(ROOT)]
    for node in stages.values():  # every stage comes after what it reads
        assert all(order.index(u) < order.index(node.name) for u in node.upstream)
    needed = {s.name for s in with_upstream(list(stages.values()), ["evaluate@minilm-finarg_ecc"])}
    assert needed == {"prepare@finarg_ecc", "base@minilm", "train@minilm-finarg_ecc",
                      "predict@minilm-finarg_ecc", "evaluate@minilm-finarg_ecc",
                      "corpus@textbook", "questions@numeric_mcq"} | {
        s for s in stages if s.startswith("prepare@")}  # base reads every prepared task


def test_an_out_of_memory_training_is_retried_with_smaller_micro_batches(tmp_path: Path) -> None:
    """The stage says it ran out of memory by its exit status; the retry halves its
    micro-batches in params.yaml (comments kept), so dvc.lock records what ran."""
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc(["init", "-q"], root)
    (root / "fake_train.py").write_text(
        "import sys, yaml\n"
        "from fin_tasks import events\n"
        "hyper = yaml.safe_load(open('params.yaml'))['train']['runs'][sys.argv[2]].get('hyper')\n"
        "events.emit('progress', step=1, total=2)\n"
        "print('loading the model')\n"
        "if (hyper or {}).get('micro_batch_size') != 2:  # fits in micro-batches of 2\n"
        "    sys.exit(events.EXIT_OUT_OF_MEMORY)\n"
        "open('out.txt', 'w').write(repr(hyper))\n")
    params = json.loads(json.dumps(FLOW_PARAMS))
    params["train"]["defaults"] |= {"micro_batch_size": 8, "grad_accum": 1}
    params["train"]["runs"] = {"x": {"model": "majority", "task": "finarg_ecc"}}
    (root / "params.yaml").write_text("# the user's own comment\n"
                                      + yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(
        "stages:\n  train:\n    foreach: ${train.runs}\n    do:\n"
        f"      cmd: {sys.executable} fake_train.py --run ${{key}}\n"
        "      deps: [fake_train.py]\n      params:\n        - train.runs.${key}\n"
        "      outs: [out.txt]\n")
    lines: list[str] = []
    seen: list[dict] = []
    node = next(s for s in stage_graph(root) if s.name == "train@x")
    assert run_stage(node, root, lines.append, on_event=seen.append) == "ran"
    assert (root / "out.txt").read_text() == "{'micro_batch_size': 2, 'grad_accum': 4}"
    assert sum("out of memory; params.yaml train.runs.x.hyper now sets" in line
               for line in lines) == 2
    assert seen == [{"event": "progress", "step": 1, "total": 2}] * 3
    assert "loading the model" in lines and not any("fin-tasks-event" in line for line in lines)
    assert (root / "params.yaml").read_text().startswith("# the user's own comment\n")
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train@x"]
    assert lock["params"]["params.yaml"]["train.runs.x"]["hyper"] == {
        "micro_batch_size": 2, "grad_accum": 4}
    assert up_to_date("train@x", root)  # committed to dvc.lock like a repro
    assert run_stage(node, root, lines.append) == "up-to-date"
    with pytest.raises(StageFailed) as failure:  # other failures are not retried
        run_command("train@y", f"{sys.executable} -c \"raise SystemExit('error: bad config')\"",
                    root, lines.append)
    assert failure.value.reason == "error: bad config" and not failure.value.out_of_memory


def test_a_stage_out_of_memory_exits_with_its_own_status(monkeypatch, capsys) -> None:
    from fin_tasks import cli, events

    def report(args) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 274877906944 bytes")

    monkeypatch.setattr(cli, "_report", report)
    monkeypatch.setenv(events.ENV, "1")
    assert cli.main(["report"]) == events.EXIT_OUT_OF_MEMORY
    out = capsys.readouterr()
    assert events.parse(out.out.splitlines()[-1])["event"] == "out_of_memory"
    assert "fin-tasks report: error: out of memory" in out.err
    monkeypatch.setattr(cli, "_report", lambda args: 1 / 0)  # anything else is a bug: raised
    with pytest.raises(ZeroDivisionError):
        cli.main(["report"])


def test_flow_then_repro_then_flow_recompute_nothing(prefect_harness, tmp_path: Path) -> None:
    from flows.pipeline import pipeline

    root = _project(tmp_path, FLOW_PARAMS)
    outcome = pipeline(str(root))
    assert set(outcome.values()) == {"ran"}
    assert {"prepare@finarg_ecc", "train@majority-finarg_ecc", "submit@finarg_ecc",
            "report"} <= set(outcome)
    assert (root / "outputs/report/leaderboard.md").exists()
    assert json.loads(_dvc(["status", "--json"], root) or "{}") == {}
    repro = _dvc(["repro"], root)
    assert "Running stage" not in repro and "up to date" in repro
    again = pipeline(str(root))
    assert set(again.values()) == {"up-to-date"}


def test_a_failed_model_does_not_stop_the_others(prefect_harness, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import pipeline

    params = json.loads(json.dumps(FLOW_PARAMS))
    params["models"]["broken"] = {"kind": "causal", "source": "no/such/model-folder"}
    params["train"]["runs"]["broken-finarg_ecc"] = {"model": "broken", "task": "finarg_ecc"}
    root = _project(tmp_path, params)
    state = pipeline(str(root), return_state=True)
    assert state.is_failed() and "train@broken-finarg_ecc" in state.message
    outcome = state.result(raise_on_failure=False)
    assert outcome["evaluate@majority-finarg_ecc"] == "ran"
    assert outcome["predict@broken-finarg_ecc"].startswith("skipped")
    assert "cannot load the tokenizer of model 'no/such/model-folder'" in outcome[
        "train@broken-finarg_ecc"]
    board = (root / "outputs/report/leaderboard.md").read_text()
    assert "broken-finarg_ecc: FAILED" in board and "majority-finarg_ecc" in board
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["leaderboard", "metrics-majority-finarg-ecc"])))}
    assert keys == {"leaderboard", "metrics-majority-finarg-ecc"}


def test_the_committed_dvc_lock_is_current(tmp_path) -> None:
    """On a fresh clone `dvc status` says only that outputs are not built yet: no code or
    params changed since dvc.lock was written. After a change, `dvc repro` and commit
    dvc.lock with it."""
    clone = project_copy(tmp_path)
    status = json.loads(_dvc(["status", "--json"], clone))
    stale = {stage: [change if isinstance(change, str) else
                     {path: state for path, state in next(iter(change.values())).items()
                      if not (path.startswith("outputs/") and state in ("deleted", "not in cache"))}
                     for change in changes]
             for stage, changes in status.items()}
    stale = {stage: [c for c in changes if c] for stage, changes in stale.items()}
    assert not {s: c for s, c in stale.items() if c}, "dvc.lock is stale: run `dvc repro`"
    locked = set(yaml.safe_load((clone / "dvc.lock").read_text())["stages"])
    defined = {stage.name for stage in stage_graph(clone)}
    assert locked == defined, (f"dvc.lock holds stages dvc.yaml no longer defines "
                               f"{sorted(locked - defined)} or lacks {sorted(defined - locked)}: "
                               "bash scripts/prune-lock.sh")


class _Run:
    """What `run_deployment` returns: a flow run with a name and a final state."""

    def __init__(self, number: int, state) -> None:
        self.name, self.state, self.id = f"run-{number}", state, number


def test_a_crashed_gpu_stage_is_resubmitted_a_bounded_number_of_times(monkeypatch) -> None:
    from prefect.states import Completed, Crashed, Failed

    import flows.pipeline as pipeline

    def deployments(states):
        queue = iter(states)
        monkeypatch.setattr("prefect.deployments.run_deployment",
                            lambda *a, **k: next(queue))

    warnings: list[str] = []
    lost = Crashed(message="no heartbeat for 180 s: the GPU worker was lost")
    deployments([_Run(1, lost), _Run(2, Completed())])
    run = pipeline._run_until_not_crashed("train@x", "d", {}, 2, warnings.append)
    assert run.name == "run-2" and len(warnings) == 1 and "resubmitting (1 of 2)" in warnings[0]
    deployments([_Run(n, lost) for n in (1, 2, 3)] + [_Run(4, Completed())])
    with pytest.raises(StageFailed) as failed:
        pipeline._run_until_not_crashed("train@x", "d", {}, 2, warnings.append)
    assert failed.value.stage == "train@x"
    assert "run-3 ended Crashed" in failed.value.reason and "crashed 3 times" in \
        failed.value.reason and "schedule.gpu_resubmits: 2" in failed.value.reason
    deployments([_Run(1, Failed(message="exit 2"))])  # a failure is not a lost worker
    with pytest.raises(StageFailed, match="run-1 ended Failed: exit 2"):
        pipeline._run_until_not_crashed("train@x", "d", {}, 2, warnings.append)


def test_the_lock_check_knows_which_stages_may_differ_between_machines() -> None:
    """Stages that neither run a model nor read what one wrote must reproduce anywhere."""
    from fin_tasks.config import load_params
    from flows.lockcheck import changed, machine_bound

    bound = machine_bound(stage_graph(ROOT), load_params(ROOT / "params.yaml"))
    for name in ("prepare@finarg_ecc", "base@smollm2", "base@tiny-llama",
                 "train@majority-finarg_ecc", "predict@majority-finarg_ecc",
                 "evaluate@majority-finarg_ecc", "corpus@textbook"):
        assert name not in bound, name
    for name in ("train@smollm2-finarg_ecc", "predict@smollm2-finarg_ecc",
                 "evaluate@smollm2-finarg_ecc", "report", "submit@finarg_ecc",
                 "evaluate@lead-sentence-edtsum"):  # BERTScore runs an encoder
        assert name in bound, name
    lock = {"stages": {"a": {"outs": [{"path": "x", "md5": "1"}]},
                       "b": {"outs": [{"path": "y", "md5": "2"}]}}}
    other = {"stages": {"a": {"outs": [{"path": "x", "md5": "1"}]},
                        "b": {"outs": [{"path": "y", "md5": "3"}]}, "c": {"outs": []}}}
    assert changed(lock, other) == ["b"]
