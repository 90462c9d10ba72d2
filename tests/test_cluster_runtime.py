"""Real cluster pieces on this machine, loopback only: an MLflow server with the basic-auth app,
a Ray head with the job server and token auth driven by the `ray job submit` CLI, a two-node
Ray cluster, and Ray's fake multi-node autoscaler with logical GPU nodes.

Every server runs in its own process session, and teardown terminates that whole session, so no
Ray or MLflow process outlives the module. We never run `ray stop`: it kills every Ray process of
this user on the machine, including other test runs'. Ports are picked free and passed explicitly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import kill_pids

VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
MLFLOW = str(VENV_BIN / "mlflow")


# --- process helpers ----------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now (all sockets held until all are picked)."""
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def subprocess_env(**extra: str) -> dict:
    """This process's environment without RAY_ADDRESS (no attaching to another Ray), venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def start_in_session(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new process session, output to ``log_path``."""
    log = open(log_path, "wb")
    try:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def session_members(session_id: int) -> list[int]:
    """Pids of live processes in a process session (Ray workers get their own process group, not session)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session_id:
                    members.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return members


def stop_session(proc: subprocess.Popen, grace: float = 30.0) -> list[int]:
    """SIGTERM a session leader, let it shut its children down, SIGKILL whatever is left.

    Returns the pids that needed SIGKILL (empty when the shutdown was clean).
    """
    session_id = proc.pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()
        if not session_members(session_id):
            return []
        time.sleep(0.5)
    leftovers = session_members(session_id)
    kill_pids(leftovers)
    proc.wait(timeout=10)
    return leftovers


def http_status(url: str, headers: dict | None = None, auth: tuple[str, str] | None = None) -> int:
    """HTTP status of a GET (0 when nothing answers)."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    if auth:
        import base64

        request.add_header(
            "Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def http_get(url: str, headers: dict | None = None) -> str:
    """Body of a GET that must succeed."""
    with urllib.request.urlopen(
        urllib.request.Request(url, headers=dict(headers or {})), timeout=30
    ) as response:
        return response.read().decode()


def wait_for_http(
    url: str, proc: subprocess.Popen, log_path: Path, timeout: float, headers: dict | None = None
) -> None:
    """Poll ``url`` until it answers 200; fail with the server log if the server dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if http_status(url, headers) == 200:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


def short_tempdir(prefix: str) -> Path:
    """A temp dir with a short path: Ray's Unix sockets live under it (108-byte path limit)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# --- MLflow server with basic auth ----------------------------------------------------------------

MLFLOW_ADMIN = ("admin", "admin-" + uuid.uuid4().hex)


@contextlib.contextmanager
def basic_auth_mlflow(root: Path, admin: tuple[str, str], user: str, default_permission: str):
    """A real `mlflow server --app-name basic-auth` on 127.0.0.1 (SQLite stores under ``root``,
    artifacts served by it) with a non-admin ``user`` created through the auth REST API: yields
    (URI, password). Every request needs credentials; ``default_permission`` is what a user holds on
    what no permission names."""
    import requests

    (port,) = free_ports(1)
    ini = root / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {admin[0]}\n"
        f"admin_password = {admin[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = subprocess_env(
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
        MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex,
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    cmd = [
        MLFLOW, "server", "--app-name", "basic-auth",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
        "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}",
        "--workers", "1",
    ]  # fmt: skip
    log_path = root / "server.log"
    proc = start_in_session(cmd, env, log_path)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", proc, log_path, timeout=180)
        password = "pw-" + uuid.uuid4().hex
        response = requests.post(
            f"{uri}/api/2.0/mlflow/users/create",
            json={"username": user, "password": password},
            auth=admin,
            timeout=60,
        )
        response.raise_for_status()
        yield uri, password
    finally:
        stop_session(proc)


@pytest.fixture(scope="module")
def mlflow_auth_server(tmp_path_factory):
    """The basic-auth server refusing anonymous requests: yields ``(uri, username, password)`` of a
    non-admin user; clients authenticate with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    root = tmp_path_factory.mktemp("mlflow_server")
    with basic_auth_mlflow(root, MLFLOW_ADMIN, "uml-ray", "NO_PERMISSIONS") as (uri, password):
        yield uri, "uml-ray", password


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(400)
def test_mlflow_server_refuses_anonymous_and_accepts_env_credentials(mlflow_auth_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri, username, password = mlflow_auth_server
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=5"
    assert http_status(search) == 401
    assert http_status(search, auth=(username, "wrong-password")) == 401
    assert http_status(search, auth=(username, password)) == 200

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(f"auth-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id, run_name="trial-0")
    client.log_param(run.info.run_id, "train.lr", "0.003")
    for step, acc in enumerate([0.5, 0.625, 0.75]):
        client.log_metric(run.info.run_id, "val_acc", acc, step=step)
    client.set_terminated(run.info.run_id)

    stored = client.get_run(run.info.run_id)
    assert stored.data.params == {"train.lr": "0.003"}
    assert stored.data.metrics["val_acc"] == 0.75 and stored.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0.5, 0.625, 0.75]
    # The creator got MANAGE on its experiment; an anonymous client still sees nothing.
    assert http_status(f"{uri}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}") == 401


# --- Ray head with the job server and token auth ------------------------------------------------


@dataclass
class RayHead:
    """A `ray start --head` running in its own session: where to submit and how to authenticate."""

    address: str  # job server / dashboard: http://127.0.0.1:PORT
    gcs_address: str  # 127.0.0.1:PORT, for ray.init / resources.address
    token: str
    temp_dir: Path
    client_env: dict = field(repr=False)  # environment for `ray job ...` clients: token auth on


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head on 127.0.0.1 with the dashboard job server and Ray token auth, two CPUs
    (a sweep's trials beside their Ray Data reads).

    Every port is explicit, the temp dir is private, RAY_ADDRESS is unset for it; teardown
    stops exactly this head's process session.
    """
    token = uuid.uuid4().hex + uuid.uuid4().hex
    ports = free_ports(9)
    temp_dir = short_tempdir("umlray-head-")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    cmd = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={ports[0]}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={ports[1]}",
        f"--ray-client-server-port={ports[2]}", f"--dashboard-agent-listen-port={ports[3]}",
        f"--dashboard-agent-grpc-port={ports[4]}", f"--runtime-env-agent-port={ports[5]}",
        f"--metrics-export-port={ports[6]}", f"--node-manager-port={ports[7]}",
        f"--object-manager-port={ports[8]}",
        "--num-cpus=2", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    log_path = temp_dir / "head.log"
    proc = start_in_session(cmd, subprocess_env(RAY_DEDUP_LOGS="0", **auth), log_path)
    head = RayHead(
        address=f"http://127.0.0.1:{ports[1]}",
        gcs_address=f"127.0.0.1:{ports[0]}",
        token=token,
        temp_dir=temp_dir,
        client_env=subprocess_env(**auth),
    )
    try:
        # The job API answers only once the job agent is up; asking it with the token proves both.
        wait_for_http(
            f"{head.address}/api/jobs/",
            proc,
            log_path,
            timeout=180,
            headers={"Authorization": f"Bearer {token}"},
        )
        yield head
    finally:
        stop_session(proc)


def submit_and_wait(
    address: str,
    entrypoint: str,
    working_dir: str | Path,
    env: dict,
    runtime_env: dict | None = None,
    timeout: float = 600,
) -> tuple[str, str]:
    """Run the documented `ray job submit --working-dir DIR -- ENTRYPOINT` and wait for the job to end.

    ``env`` is the client's environment (token auth: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN);
    ``runtime_env`` adds e.g. ``{"env_vars": {...}}`` for the job itself. Returns the job's final
    status (SUCCEEDED, FAILED, STOPPED) and its driver logs.
    """
    job_id = f"uml-ray-{uuid.uuid4().hex[:10]}"
    cmd = [
        RAY,
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        job_id,
        "--working-dir",
        str(working_dir),
    ]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    # Without --no-wait the CLI tails the driver log until the job ends. It shell-quotes each
    # argument after `--`, so the entrypoint goes in as separate words.
    subprocess.run(
        cmd + ["--", *shlex.split(entrypoint)], env=env, capture_output=True, text=True, timeout=timeout
    )
    # The final status and logs come from the job REST API, which the CLI itself wraps.
    headers = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"} if env.get("RAY_AUTH_TOKEN") else {}
    info = json.loads(http_get(f"{address}/api/jobs/{job_id}", headers))
    logs = json.loads(http_get(f"{address}/api/jobs/{job_id}/logs", headers))["logs"]
    return info["status"], logs


JOB_SCRIPT = """\
import os
import ray

ray.init()  # the job supervisor sets RAY_ADDRESS and passes the cluster's token on


@ray.remote
def square(x):
    return x * x


print("RESULT", sum(ray.get([square.remote(i) for i in range(5)])), os.environ["UML_RAY_MARK"])
"""


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_with_token_auth(ray_head, tmp_path):
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "job.py").write_text(JOB_SCRIPT)
    (workdir / "fail.py").write_text("raise SystemExit('uml-ray test failure 7')\n")

    # Token auth is on: the REST API and the CLI without the token are refused.
    assert http_status(f"{ray_head.address}/api/jobs/") == 401
    assert http_status(f"{ray_head.address}/api/jobs/", headers={"Authorization": "Bearer wrong"}) == 403
    no_token = subprocess_env(RAY_AUTH_MODE="token", HOME=str(tmp_path))  # no ~/.ray/auth_token either
    no_token.pop("RAY_AUTH_TOKEN", None)
    refused = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head.address, "--working-dir", str(workdir),
         "--", "python job.py"],
        env=no_token, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr

    status, logs = submit_and_wait(
        ray_head.address,
        "python job.py",
        workdir,
        ray_head.client_env,
        runtime_env={"env_vars": {"UML_RAY_MARK": "mark-42"}},
    )
    assert status == "SUCCEEDED", logs
    assert "RESULT 30 mark-42" in logs

    status, logs = submit_and_wait(ray_head.address, "python fail.py", workdir, ray_head.client_env)
    assert status == "FAILED" and "uml-ray test failure 7" in logs


# --- uml-ray itself on these clusters -------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
# What `ray job submit --working-dir` leaves out of the upload (besides .gitignore): the venv is
# already on the head, and tests, local runs and stores are not code the job needs.
UPLOAD_EXCLUDES = [".git", ".venv", "tests", "benchmarks", "demo_work", "uml_runs", "mlruns", "*.db"]
TINY_TRAIN = {"max_steps": 40, "warmup_steps": 5, "val_every": 20}


def tiny_config(path: Path, workdir: Path, **sections) -> Path:
    """A run config on a small synthetic dataset (5 classes, 20 target shots each): 40 steps, validation
    at 20 and 40."""
    from conftest import write_config

    from uml_ray.data.synth import write_synthetic

    manifest = write_synthetic(str(workdir / "data"), seed=0, n_train=20, n_val=50, n_test=100, n_aux=200)
    return write_config(path, manifest, workdir, train=TINY_TRAIN, **sections)


def sweep_runs(tracking_uri: str, experiment: str, sweep: str) -> tuple:
    """(client, parent run, child trial runs) of one sweep in an MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment} at {tracking_uri}"
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`uml_ray.sweep` = '{sweep}'")
    parents = [r for r in runs if r.data.tags["uml_ray.kind"] == "sweep"]
    children = [r for r in runs if r.data.tags["uml_ray.kind"] == "trial"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    return client, parents[0], children


def assert_trials_tracked(client, parent, children, trials: int) -> None:
    """Every trial is a child of the sweep's parent run with val_acc at each validation step it reached."""
    assert len(children) == trials and parent.info.status == "FINISHED"
    assert parent.data.metrics["trials"] == trials
    assert len({c.data.tags["uml_ray.trial_id"] for c in children}) == trials
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status in ("FINISHED", "KILLED"), child.info.status
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        # ASHA may stop a trial after its first validation; a finished one validated at 20 and 40
        assert steps == ([20, 40] if child.info.status == "FINISHED" else [20]), (child.info.status, steps)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")] == steps
        assert 0.0 <= child.data.metrics["best_val_acc"] <= 1.0


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_runs_a_tracked_sweep(ray_head, tmp_path):
    config = tiny_config(tmp_path / "sweep.yaml", tmp_path)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The space path is relative: the job runs inside the uploaded working dir.
    entrypoint = (
        f"uml-ray tune {config} resources.cpus_per_worker=0.5 "
        "--space search_spaces/supervised_linear_probe.yaml --trials 3 --name job-sweep"
    )
    started = time.monotonic()
    status, logs = submit_and_wait(
        ray_head.address, entrypoint, REPO, ray_head.client_env, runtime_env={"excludes": UPLOAD_EXCLUDES}
    )
    print(f"ray job submit sweep: {time.monotonic() - started:.1f}s")
    assert status == "SUCCEEDED", logs[-5000:]
    summary = json.loads([line for line in logs.splitlines() if line.startswith('{"sweep"')][-1])
    assert summary["sweep"] == "job-sweep" and summary["trials"] == 3

    client, parent, children = sweep_runs(tracking_uri, "tests", "job-sweep")
    assert_trials_tracked(client, parent, children, trials=3)
    best = max(c.data.metrics["best_val_acc"] for c in children)
    assert (
        parent.data.metrics["best_best_val_acc"]
        == pytest.approx(best)
        == pytest.approx(summary["best_val_acc"])
    )


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_on_mlflow_server_and_best_reads_it_back(
    mlflow_auth_server, ray_session, tmp_path, monkeypatch, capsys
):
    from uml_ray.cli import main

    uri, username, password = mlflow_auth_server
    experiment = f"server-{uuid.uuid4().hex[:8]}"
    config = tiny_config(
        tmp_path / "sweep.yaml",
        tmp_path,
        tracking={"uri": uri, "experiment": experiment},
        resources={"cpus_per_worker": 0.5},
    )
    space = REPO / "search_spaces" / "supervised_linear_probe.yaml"
    best_yaml = tmp_path / "best.yaml"

    # Without credentials the server refuses the CLI before any Ray work, with one clear line.
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    assert main(["tune", str(config), "--space", str(space), "--trials", "2", "--name", "server-sweep"]) == 2
    err = capsys.readouterr().err
    assert (
        f"tracking.uri={uri}: cannot reach the MLflow store" in err
        and "401" in err
        and "Traceback" not in err
    )

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    started = time.monotonic()
    assert main(["tune", str(config), "--space", str(space), "--trials", "2", "--name", "server-sweep"]) == 0
    print(f"sweep against the MLflow server: {time.monotonic() - started:.1f}s")
    capsys.readouterr()

    # The sweep's runs are on the server, readable with the credentials and refused without.
    client, parent, children = sweep_runs(uri, experiment, "server-sweep")
    assert_trials_tracked(client, parent, children, trials=2)
    experiment_url = f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}"
    assert http_status(experiment_url) == 401
    assert http_status(f"{uri}/api/2.0/mlflow/runs/get?run_id={parent.info.run_id}") == 401
    assert http_status(experiment_url, auth=(username, password)) == 200
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "study_summary.json" in artifacts

    assert (
        main(
            [
                "best",
                "--tracking-uri",
                uri,
                "--experiment",
                experiment,
                "--sweep",
                "server-sweep",
                "--output",
                str(best_yaml),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out.splitlines()
    header = ["rank", "run", "selection_score", "best_val_acc", "best_val_loss", "val_se", "test_acc"]
    assert table[0].split()[:7] == header
    ranked = sorted(children, key=lambda c: c.data.metrics["selection_score"], reverse=True)
    assert table[1].split()[1] == ranked[0].info.run_name
    assert float(table[1].split()[3]) == pytest.approx(ranked[0].data.metrics["best_val_acc"], abs=1e-4)
    best = yaml.safe_load(best_yaml.read_text())
    assert best["tracking"]["uri"] == uri and best["tracking"]["experiment"] == experiment
    sampled = json.loads(ranked[0].data.tags["uml_ray.sampled"])
    assert best["train"]["lr"] == pytest.approx(sampled["train.lr"])
    # the written config is a complete run config: `uml-ray train` would accept it as is
    assert main(["validate", str(best_yaml)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["tracking"] == uri


# --- in-process clusters (the pytest process is their driver) -----------------------------------


def detach_driver():
    """Drop any Ray this process is attached to: a driver talks to one cluster at a time."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def driver_auth_mode(mode: str):
    """This process's Ray token-auth mode pinned to ``mode`` while attached to a cluster using it.

    A local ``ray.init()`` earlier in the process (the shared test session) sets
    ``RAY_AUTH_MODE=token`` in ``os.environ`` for good. A driver in token mode attached to a
    cluster without auth rejects the GCS's calls to it ("Missing authorization header"); the
    GCS takes the owner for dead and destroys every actor the driver creates before it runs.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    def reload():  # the C++ side caches the mode and the token: both re-read from the environment
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()

    before = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = mode
    reload()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = before
        reload()


@contextlib.contextmanager
def two_node_cluster(system_config: dict | None = None):
    """`ray.cluster_utils.Cluster`: head (0 CPU) + two worker nodes (2 CPUs each), driver attached,
    with the head's ``system_config`` if given; shut down, and the driver detached, on leaving.

    The head runs the dashboard (on a free loopback port) for the Ray state API.
    """
    import ray
    from ray.cluster_utils import Cluster

    detach_driver()
    (dashboard_port,) = free_ports(1)
    head_args = {
        "num_cpus": 0,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard_port,
    }
    if system_config:
        head_args["_system_config"] = system_config
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()  # the next integration test starts the shared local Ray again
        cluster.shutdown()


@pytest.fixture(scope="class")
def ray_two_node_cluster():
    """`two_node_cluster` for a test class."""
    with two_node_cluster() as cluster:
        yield cluster


@pytest.mark.cluster
@pytest.mark.slow
class TestTwoNodeCluster:
    """A head with no CPUs and two 2-CPU nodes; the driver (this process) is connected."""

    @pytest.mark.timeout(300)
    def test_strict_spread_placement_group_spans_both_nodes(self, ray_two_node_cluster):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        workers = {node.node_id for node in ray_two_node_cluster.worker_nodes}
        assert len([n for n in ray.nodes() if n["Alive"]]) == 3

        group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
        ray.get(group.ready(), timeout=120)

        @ray.remote(num_cpus=1)
        def node_of_bundle():
            return ray.get_runtime_context().get_node_id()

        placed = ray.get(
            [
                node_of_bundle.options(
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        group, placement_group_bundle_index=i
                    )
                ).remote()
                for i in range(2)
            ]
        )
        assert set(placed) == workers and len(set(placed)) == 2
        remove_placement_group(group)

        # Three bundles cannot be strictly spread over two CPU nodes: the group stays pending.
        too_wide = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
        ready, _ = ray.wait([too_wide.ready()], timeout=3)
        assert ready == []
        remove_placement_group(too_wide)

    @pytest.mark.timeout(600)
    def test_two_worker_training_spans_both_nodes(self, ray_two_node_cluster, tmp_path, capsys):
        from mlflow.tracking import MlflowClient
        from ray.util.state import list_actors

        from uml_ray.cli import main

        # 1.5 CPUs per worker: two cannot share a 2-CPU node, so Ray Train's PACK placement has to
        # spread them. The trial driving the TorchTrainer holds 0.01 CPU; Ray Data reads the
        # cached datasets in 1-CPU tasks before the workers start.
        config = tiny_config(
            tmp_path / "two.yaml", tmp_path, resources={"num_workers": 2, "cpus_per_worker": 1.5}
        )
        started = time.monotonic()
        assert main(["train", str(config), "--name", "two-node"]) == 0
        print(f"two-worker training on two nodes: {time.monotonic() - started:.1f}s")
        result = json.loads(
            [line for line in capsys.readouterr().out.splitlines() if line.startswith('{"run"')][-1]
        )
        assert result["step"] == 40 and 0.0 <= result["test_acc"] <= 1.0

        train_workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100)
        assert len(train_workers) == 2, train_workers
        assert {w.node_id for w in train_workers} == {n.node_id for n in ray_two_node_cluster.worker_nodes}

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        assert run.info.run_name == "two-node" and run.info.status == "FINISHED"
        assert run.data.params["resources.num_workers"] == "2"
        assert run.data.metrics["test_acc"] == pytest.approx(result["test_acc"])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [20, 40]


@dataclass
class FakeAutoscalingCluster:
    """Ray's fake multi-node autoscaler on one machine: a head whose autoscaler starts and stops
    real raylets on this host as if they were cloud nodes."""

    gcs_address: str
    config: dict
    temp_dir: Path


def fake_autoscaling_config(
    gcs_address: str, worker_types: dict, idle_timeout_minutes: float, head_cpus: int
) -> dict:
    """A complete `fake_multinode` autoscaler config (what ray.cluster_utils.AutoscalingCluster
    builds from the example.yaml the Ray 2.60 wheel does not ship)."""
    return {
        "cluster_name": "uml-ray-fake",
        "max_workers": sum(t["max_workers"] for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Fake nodes would join 6379 otherwise.
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **worker_types,
        },
        "head_node_type": "ray.head.default",
        "docker": {},
        "auth": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


@pytest.fixture(scope="class")
def fake_gpu_autoscaling_cluster():
    """Head with 1 CPU (for Ray Data, like the cloud configs' CPU group) + autoscaler; worker type
    `gpu_worker` = {CPU: 1, GPU: 1}, 0..2 nodes, idle timeout 6 s. The driver (this process) is attached.

    ray.cluster_utils.AutoscalingCluster is not used as is: in Ray 2.60 it reads an example.yaml
    missing from the wheel, and its start/shutdown run `ray stop --force`, which would kill
    every other Ray on the machine. This starts the same head (RAY_FAKE_CLUSTER=1,
    --autoscaling-config) in its own session instead.
    """
    import ray

    detach_driver()
    temp_dir = short_tempdir("umlray-as-")
    ports = free_ports(7)
    gcs_address = f"127.0.0.1:{ports[0]}"
    worker_types = {
        "gpu_worker": {
            "resources": {"CPU": 1, "GPU": 1},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 2,
        }
    }
    config = fake_autoscaling_config(gcs_address, worker_types, idle_timeout_minutes=0.1, head_cpus=1)
    config_path = temp_dir / "autoscaling.json"
    config_path.write_text(json.dumps(config))
    cmd = [
        RAY, "start", "--head", "--block", "--disable-usage-stats",
        f"--port={ports[0]}", "--num-cpus=1", "--include-dashboard=false",
        f"--ray-client-server-port={ports[1]}", f"--dashboard-agent-listen-port={ports[2]}",
        f"--dashboard-agent-grpc-port={ports[3]}", f"--runtime-env-agent-port={ports[4]}",
        f"--metrics-export-port={ports[5]}", f"--dashboard-port={ports[6]}",
        f"--temp-dir={temp_dir}", f"--autoscaling-config={config_path}",
    ]  # fmt: skip
    # The autoscaler must see the same auth mode as the nodes it launches; off keeps it simple.
    env = subprocess_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled")
    log_path = temp_dir / "head.log"
    proc = start_in_session(cmd, env, log_path)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake autoscaling head did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        with driver_auth_mode(env["RAY_AUTH_MODE"]):
            ray.init(address=gcs_address, log_to_driver=False)
            try:
                yield FakeAutoscalingCluster(gcs_address=gcs_address, config=config, temp_dir=temp_dir)
            finally:
                ray.shutdown()
    finally:
        stop_session(proc)


@pytest.mark.cluster
@pytest.mark.slow
class TestFakeGpuAutoscaling:
    """Scale-up on demand for logical GPUs, then scale-down of idle nodes."""

    @pytest.mark.timeout(400)
    def test_gpu_demand_adds_nodes_and_idle_nodes_go(self, fake_gpu_autoscaling_cluster):
        import ray

        assert [n["Resources"].get("GPU", 0) for n in alive_nodes()] == [0], "starts with the head only"

        @ray.remote(num_cpus=1, num_gpus=1)
        def gpu_task(i):
            time.sleep(2)  # long enough that two tasks need two GPU nodes at once
            return i, ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

        results = ray.get([gpu_task.remote(i) for i in range(4)], timeout=300)
        assert [i for i, _, _ in results] == [0, 1, 2, 3]
        used_nodes = {node for _, node, _ in results}
        gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU") == 1}
        assert used_nodes <= gpu_nodes and len(gpu_nodes) == 2, (
            "four pending GPU tasks scale up to max_workers=2"
        )
        assert all(len(gpus) == 1 for _, _, gpus in results)

        deadline = time.monotonic() + 120
        while len(alive_nodes()) > 1 and time.monotonic() < deadline:
            time.sleep(1)
        remaining = alive_nodes()
        assert len(remaining) == 1 and "GPU" not in remaining[0]["Resources"], "idle GPU nodes were removed"

    @pytest.mark.timeout(600)
    def test_gpu_sweep_scales_up_and_idle_nodes_go(self, fake_gpu_autoscaling_cluster, tmp_path):
        import ray

        from uml_ray.cli import main

        def gpu_nodes() -> set[str]:
            return {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")}

        deadline = time.monotonic() + 120  # the previous test's nodes may still be draining
        while len(alive_nodes()) > 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert [n["Resources"].get("GPU", 0) for n in alive_nodes()] == [0], "starts with the head only"
        before = gpu_nodes()  # dead nodes stay listed in ray.nodes()

        # Each trial trains in its Tune trial process, which holds {CPU: 1, GPU: 1}: only a
        # gpu_worker node has that, so every trial waits for the autoscaler. (These GPUs are
        # logical: torch finds no CUDA device here and trains on the CPU.) resources.address marks
        # an attached cluster, so its current CPUs (the head's one, kept for Ray Data) do not cap the
        # concurrency.
        config = tiny_config(
            tmp_path / "gpu.yaml",
            tmp_path,
            resources={
                "gpus_per_worker": 1,
                "cpus_per_worker": 1,
                "address": fake_gpu_autoscaling_cluster.gcs_address,
            },
        )
        started = time.monotonic()
        code = main(
            [
                "tune",
                str(config),
                "--space",
                str(REPO / "search_spaces" / "supervised_linear_probe.yaml"),
                "--trials",
                "3",
                "--concurrency",
                "2",
                "--name",
                "gpu-sweep",
            ]
        )
        errors = [p.read_text()[-3000:] for p in sorted((tmp_path / "runs").rglob("error.txt"))]
        assert code == 0, "the GPU sweep failed; trial errors:\n" + "\n---\n".join(errors)
        print(f"GPU sweep on the autoscaling cluster: {time.monotonic() - started:.1f}s")
        added = gpu_nodes() - before
        # two trials may run at once, but whether the autoscaler sees both pending (2 nodes) or
        # the second reuses the first node depends on timing: at least one, at most max_workers
        assert 1 <= len(added) <= 2, f"GPU trials scale up 1..max_workers=2 nodes, got {len(added)}"

        client, parent, children = sweep_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "tests", "gpu-sweep")
        assert_trials_tracked(client, parent, children, trials=3)
        assert all(c.data.params["resources.gpus_per_worker"] == "1.0" for c in children)
        assert any(0.0 <= c.data.metrics.get("test_acc", -1) <= 1.0 for c in children)

        started = time.monotonic()
        while len(alive_nodes()) > 1 and time.monotonic() - started < 120:
            time.sleep(1)
        print(f"idle GPU nodes removed after {time.monotonic() - started:.1f}s")
        remaining = alive_nodes()
        assert len(remaining) == 1 and "GPU" not in remaining[0]["Resources"], "idle GPU nodes were removed"
        assert not gpu_nodes() - before - added, "no further nodes were started"
