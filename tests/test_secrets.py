"""Credentials in URIs never leave the process: redaction rules, scoped MLflow credentials, and a real
training run against a basic-auth MLflow server whose password appears in no record, file or line."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from conftest import write_config

from uml_ray.uri import redact, redact_text, redact_values, split_credentials

REDACTED = [
    # (as written, as recorded)
    ("http://alice:s3cret@mlflow.example:5000", "http://alice@mlflow.example:5000"),
    ("https://alice:p%40ss@mlflow.example/prefix?x=1", "https://alice@mlflow.example/prefix?x=1"),
    ("http://alice:p@ss@127.0.0.1:5000/api", "http://alice@127.0.0.1:5000/api"),  # '@' in the password
    ("http://:s3cret@host:5000", "http://host:5000"),
    (
        "s3://bucket/data/manifest.yaml?access_key=AKIA1&secret_key=s3cret&endpoint_override=127.0.0.1:9000",
        "s3://bucket/data/manifest.yaml?endpoint_override=127.0.0.1:9000",
    ),
    ("s3://bucket/runs?session_token=t0k&region=eu-west-1", "s3://bucket/runs?region=eu-west-1"),
    ("s3://bucket/runs?Secret_Key=s3cret", "s3://bucket/runs"),
    ("s3://bucket/runs?aws_secret_access_key=s3cret&scheme=http", "s3://bucket/runs?scheme=http"),
    ("gs://bucket/x?token=abc&password=pw&AccessKeyId=k", "gs://bucket/x"),
    (
        "https://acct.blob.core.windows.net/c/f?sv=2020&sig=abc%2Fdef",
        "https://acct.blob.core.windows.net/c/f?sv=2020",
    ),
    ("s3://bucket/x?X-Amz-Credential=a&X-Amz-Signature=b&X-Amz-Security-Token=c", "s3://bucket/x"),
    ("postgresql://mlflow:s3cret@db:5432/mlflow", "postgresql://mlflow@db:5432/mlflow"),
    # no secret: unchanged
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("http://alice@mlflow.example:5000", "http://alice@mlflow.example:5000"),
    ("s3://bucket/data/manifest.yaml?endpoint_override=localhost:9000", None),
    ("sqlite:////tmp/work/mlflow.db", None),
    ("file:///tmp/work/runs", None),
    ("/tmp/work/data/manifest.yaml", None),
    ("data/manifest.yaml", None),
    ("s3://bucket/shards/part-0.parquet#frag", None),
]


@pytest.mark.parametrize("written, recorded", REDACTED)
def test_redact_drops_passwords_and_credential_query_parameters(written, recorded):
    recorded = written if recorded is None else recorded
    assert redact(written) == recorded
    assert redact(recorded) == recorded  # idempotent: a recorded URI is recorded as it is


def test_redact_text_redacts_every_uri_in_free_text():
    text = (
        "tracking.uri=http://alice:s3cret@127.0.0.1:5000: cannot reach the MLflow store; manifest "
        "'s3://bucket/m.yaml?secret_key=k3y&endpoint_override=h:9000' (or s3://b/x?token=t0k). "
        "local /tmp/data/manifest.yaml and http://127.0.0.1:5000/#/experiments/1 stay."
    )
    assert redact_text(text) == (
        "tracking.uri=http://alice@127.0.0.1:5000: cannot reach the MLflow store; manifest "
        "'s3://bucket/m.yaml?endpoint_override=h:9000' (or s3://b/x). "
        "local /tmp/data/manifest.yaml and http://127.0.0.1:5000/#/experiments/1 stay."
    )
    config = {
        "tracking": {"uri": "http://alice:s3cret@h:5000", "retries": 3},
        "data": {"manifest": "s3://b/m.yaml?secret_key=k3y", "auxiliary": ["s3://b/a?token=t0k", "text"]},
    }
    assert redact_values(config) == {
        "tracking": {"uri": "http://alice@h:5000", "retries": 3},
        "data": {"manifest": "s3://b/m.yaml", "auxiliary": ["s3://b/a", "text"]},
    }


def test_split_credentials_gives_the_bare_uri_and_decoded_userinfo():
    assert split_credentials("http://alice:p%40ss@h:5000/x") == ("http://h:5000/x", "alice", "p@ss")
    assert split_credentials("http://alice@h:5000") == ("http://h:5000", "alice", None)
    assert split_credentials("http://h:5000") == ("http://h:5000", None, None)
    assert split_credentials("/tmp/mlflow") == ("/tmp/mlflow", None, None)


def test_mlflow_client_gets_the_bare_uri_and_the_credentials_aside(monkeypatch):
    """The client is given the URI without userinfo; the credentials MLflow builds for requests to that
    server (tracking store or artifacts, in any thread) carry the URI's user name and password, where
    the environment gives none; other servers get none, and nothing is set in os.environ."""
    import threading

    from mlflow.utils.credentials import get_default_host_creds

    from uml_ray.tracking.store import client

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    environment = dict(os.environ)
    made = client("http://alice:s3cret@127.0.0.1:9/")  # nothing listens: building a client sends nothing
    assert made.tracking_uri == "http://127.0.0.1:9/"
    assert os.environ == environment

    def creds(host):
        found = get_default_host_creds(host)
        return found.username, found.password

    assert creds("http://127.0.0.1:9") == ("alice", "s3cret")
    in_thread = []
    worker = threading.Thread(
        target=lambda: in_thread.append(creds("http://127.0.0.1:9/api/2.0/mlflow-artifacts"))
    )
    worker.start()
    worker.join()
    assert in_thread == [("alice", "s3cret")]  # MLflow downloads artifacts in a thread pool
    assert creds("http://127.0.0.1:10") == (None, None)  # another server
    assert creds("https://127.0.0.1:9") == (None, None)  # another scheme
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-env")
    assert creds("http://127.0.0.1:9") == ("alice", "from-env")  # the environment still comes first
    assert client("http://127.0.0.1:11").tracking_uri == "http://127.0.0.1:11"
    assert creds("http://127.0.0.1:11") == (None, "from-env")


def test_a_kept_uri_is_recorded_redacted_and_still_authenticates(monkeypatch):
    """What Tune pickles holds ``keep_credentials``' redacted URI; a client given that URI later in the
    process (a resumed sweep's restored tracker) authenticates as one given the original."""
    from mlflow.utils.credentials import get_default_host_creds

    from uml_ray.tracking.store import client, keep_credentials

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    assert keep_credentials("http://bob:s3cret@127.0.0.1:12") == "http://bob@127.0.0.1:12"
    assert client("http://bob@127.0.0.1:12").tracking_uri == "http://127.0.0.1:12"
    found = get_default_host_creds("http://127.0.0.1:12")
    assert (found.username, found.password) == ("bob", "s3cret")
    client("http://carol@127.0.0.1:12")  # another user: bob's password is not hers
    found = get_default_host_creds("http://127.0.0.1:12")
    assert (found.username, found.password) == ("carol", None)


def test_param_and_tag_values_are_recorded_redacted():
    from uml_ray.tracking.store import param, param_value, tag

    assert param("tracking.uri", "http://alice:s3cret@h:5000").value == "http://alice@h:5000"
    assert tag("best.data.manifest", "s3://b/m?secret_key=k").value == "s3://b/m"
    assert param_value({"uri": "http://a:s3cret@h"}) == '{"uri": "http://a@h"}'


def test_error_messages_name_the_redacted_uri():
    from uml_ray.errors import UserError
    from uml_ray.tracking.store import check_tracking_uri

    with pytest.raises(UserError) as refused:
        check_tracking_uri("ftp://alice:s3cret@host/x")
    assert "s3cret" not in str(refused.value) and "ftp://alice@host/x" in str(refused.value)


# --- a real run against a basic-auth MLflow server --------------------------------------------------


@pytest.fixture
def mlflow_basic_auth(tmp_path):
    """``mlflow server --app-name basic-auth`` on 127.0.0.1 (SQLite stores, artifacts served by it) with
    a non-admin user: yields (root folder, URI, user, password). Anonymous requests are refused (401),
    so a run that records anything authenticated."""
    from test_cluster_runtime import basic_auth_mlflow

    root = tmp_path / "server"
    root.mkdir()
    admin = ("admin", "admin-" + uuid.uuid4().hex)
    with basic_auth_mlflow(root, admin, "alice", "READ") as (uri, password):
        yield root, uri, "alice", password


def files_holding(folder: Path, secret: str) -> list[str]:
    """Every file under ``folder`` whose bytes hold ``secret`` (pickles and SQLite pages included)."""
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_password_in_tracking_uri_reaches_no_record_file_or_line(
    ray_session, mlflow_basic_auth, synthetic_manifest, tmp_path, capfd, monkeypatch
):
    """``uml-ray train`` with ``tracking.uri=http://alice:<password>@127.0.0.1:PORT`` on a server that
    refuses anonymous requests records its run (so it authenticated), and the password is in no
    console line, no file of the server's stores, no file under Tune's storage path and not in the
    ``uml-ray best`` YAML; the run's recorded ``tracking.uri`` is ``http://alice@127.0.0.1:PORT``."""
    from mlflow.tracking import MlflowClient

    from uml_ray.cli import main
    from uml_ray.config import load_config

    root, uri, user, password = mlflow_basic_auth
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    secret_uri = uri.replace("http://", f"http://{user}:{password}@")
    config = write_config(
        tmp_path / "c.yaml",
        synthetic_manifest,
        tmp_path,
        tracking={"uri": secret_uri, "experiment": "secrets"},
        train={"max_steps": 40},
    )
    assert main(["validate", str(config)]) == 0
    assert main(["train", str(config), "--name", "secret"]) == 0
    best = tmp_path / "best.yaml"
    argv = ["best", "--experiment", "secrets", "--tracking-uri", secret_uri, "--output", str(best)]
    assert main(argv) == 0
    out = capfd.readouterr()

    assert password not in out.out + out.err
    assert f"http://{user}@127.0.0.1" in out.out  # `validate` names the server, and whose account
    assert files_holding(root, password) == []  # backend store, artifacts, server log
    assert files_holding(tmp_path / "runs", password) == []  # Tune's results, params, state, checkpoints
    assert password not in best.read_text()
    assert load_config(str(best)).tracking.uri == f"http://{user}@{uri.removeprefix('http://')}"

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("secrets")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["step"] == 40
    assert run.data.params["tracking.uri"] == f"http://{user}@{uri.removeprefix('http://')}"
    assert all(password not in value for value in [*run.data.params.values(), *run.data.tags.values()])
