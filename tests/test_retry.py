"""Retry by error class (``uml_ray/driver/retry.py``): transient network and object-storage errors are
retried from the last checkpoint, deterministic ones fail at once. Real peers only: closed ports,
a moto S3 server stopped and started again, a trial that meets a real bug."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import s3_client, write_config
from helpers import uml_ray

from uml_ray.cli import main
from uml_ray.driver.retry import MAX_BACKOFF_S, backoff_s, is_transient
from uml_ray.errors import DataError

BUCKET = "uml-retry"


def closed_port() -> int:
    """A port of 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def raised(call) -> BaseException:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - the error is the value under test
        return exc
    raise AssertionError(f"{call} raised nothing")


class MotoServer:
    """A moto S3 server on one port of 127.0.0.1 that can be stopped and started again there: its
    buckets live in this process, so they outlast the server."""

    def __init__(self):
        self.port = closed_port()
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    @property
    def env(self) -> dict:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
        }


@contextlib.contextmanager
def moto_server():
    server = MotoServer()
    server.start()
    try:
        s3_client(server.env).create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()


def test_policy_table(tmp_path, monkeypatch):
    """Each row of the policy table, on an error a real peer raised."""
    import boto3
    import botocore.config
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    port = closed_port()
    refused = raised(lambda: socket.create_connection(("127.0.0.1", port), timeout=5))
    assert isinstance(refused, ConnectionRefusedError) and is_transient(refused)
    http = raised(lambda: requests.get(f"http://127.0.0.1:{port}/", timeout=5))
    assert isinstance(http, requests.exceptions.ConnectionError) and is_transient(http)
    boto = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )
    endpoint = raised(boto.list_buckets)
    assert type(endpoint).__name__ == "EndpointConnectionError" and is_transient(endpoint)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracking = raised(lambda: MlflowClient(f"http://127.0.0.1:{port}").search_experiments())
    # MLflow's REST client raises its own error while handling the connection error
    assert isinstance(tracking, MlflowException) and is_transient(tracking)

    # pyarrow's S3 error once the object store went away
    with moto_server() as server:
        s3 = pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{server.port}",
            scheme="http",
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
        with s3.open_output_stream(f"{BUCKET}/x.parquet") as out:
            out.write(b"not read")
    storage = raised(lambda: pq.ParquetFile(f"{BUCKET}/x.parquet", filesystem=s3))
    assert type(storage) is OSError and "NETWORK_CONNECTION" in str(storage) and is_transient(storage)

    # deterministic: the same on every attempt
    missing = raised(lambda: open(tmp_path / "missing.parquet", "rb"))
    assert isinstance(missing, FileNotFoundError) and not is_transient(missing)
    folder = raised(lambda: open(tmp_path, "rb"))
    assert isinstance(folder, IsADirectoryError) and not is_transient(folder)
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1" + b"x" * 100 + b"PAR1")
    corrupt = raised(lambda: pq.read_table(tmp_path / "corrupt.parquet"))
    assert not is_transient(corrupt)
    full = OSError(errno.ENOSPC, "No space left on device")
    assert not is_transient(full)
    assert not is_transient(raised(lambda: int("x")))  # ValueError
    assert not is_transient(raised(lambda: {}["key"]))  # KeyError

    # the chain: a bug raised while handling a network error is retried (bounded); a UserError
    # is the user's, whatever it was raised from
    def wrapped(cls):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError as exc:
            raise cls("shard unreadable") from exc

    assert is_transient(raised(lambda: wrapped(RuntimeError)))
    assert not is_transient(raised(lambda: wrapped(DataError)))


def test_backoff_doubles_and_is_bounded():
    assert [backoff_s(attempt, 2.0) for attempt in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert backoff_s(1, 0.0) == 0.0
    assert backoff_s(10_000, 2.0) == MAX_BACKOFF_S


def test_bug_is_not_retried(ray_session, synthetic_manifest, tmp_path, capsys, monkeypatch):
    """A trial that meets a bug fails at once, naming its traceback file, however many transient
    retries are allowed (a retry after 60 s would show as a line and a minute)."""
    import dataclasses

    from uml_ray.driver import sweep

    config = write_config(
        tmp_path / "c.yaml",
        synthetic_manifest,
        tmp_path,
        resources={"transient_retries": 3, "retry_backoff_s": 60.0},
    )
    original = sweep.load_tables

    def broken_tables(plan):  # a share that is not a table: the trial's loop crashes on it
        plan = original(plan)
        return dataclasses.replace(
            plan, tables={**plan.tables, "image.train": ray_session.put("not a table")}
        )

    monkeypatch.setattr(sweep, "load_tables", broken_tables)
    started = time.monotonic()
    assert main(["train", str(config), "--name", "bug"]) == 1
    assert time.monotonic() - started < 60
    out, err = capsys.readouterr()
    assert "retried from its last checkpoint" not in out + err
    assert "trial crashed: 1 of 1 trial(s) of 'bug' failed" in err and "(after" not in err
    traceback_file = Path(err.split("(traceback: ")[1].split(")")[0])
    assert "Traceback" in traceback_file.read_text()


def final_result(run: subprocess.CompletedProcess) -> dict:
    return json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
@pytest.mark.integration
def test_train_survives_s3_outage(tmp_path):
    """A run streaming its data from S3 whose server stops after the first checkpoint and comes
    back 10 s later: the trial retries from its checkpoint, says so in one console line, and ends
    with the metrics of an uninterrupted run."""
    with moto_server() as server:
        # no decoded stream cache: every epoch must read S3, so the outage meets a read
        env = {
            **os.environ,
            **server.env,
            "PYTHONPATH": str(Path(__file__).parents[1]),
            "UML_RAY_STREAM_CACHE": "off",
        }
        env.pop("RAY_ADDRESS", None)  # the subprocess starts a local Ray that inherits the AWS_* variables
        sizes = ["--n-train", 20, "--n-val", 20, "--n-test", 20, "--n-aux", 40, "--seed", 0]
        synth = uml_ray(env, tmp_path, "data", "synth", f"s3://{BUCKET}/data", *sizes, timeout=600)
        assert synth.returncode == 0, synth.stderr
        config = write_config(
            tmp_path / "c.yaml",
            f"s3://{BUCKET}/data/manifest.yaml",
            tmp_path,
            # every share streamed from S3 (val and test at every validation)
            data={"cache_max_mb": 0},
            train={"max_steps": 1500, "val_every": 50, "checkpoint_every": 1, "batch_size": 8},
            resources={"num_workers": 1, "num_cpus": 2, "transient_retries": 5, "retry_backoff_s": 2.0},
        )
        calm = uml_ray(env, tmp_path, "train", config, "--name", "calm", timeout=600)
        assert calm.returncode == 0, calm.stderr[-4000:]

        outage = {}

        def cut_when_checkpointed():
            deadline = time.monotonic() + 500
            while time.monotonic() < deadline:
                if any((tmp_path / "runs" / "stormy").glob("*/checkpoint_*")):
                    server.stop()
                    outage["at"] = time.monotonic()
                    time.sleep(10)
                    server.start()
                    return
                time.sleep(0.1)

        cutter = threading.Thread(target=cut_when_checkpointed, daemon=True)
        cutter.start()
        stormy = uml_ray(env, tmp_path, "train", config, "--name", "stormy", timeout=600)
        cutter.join(timeout=30)
    assert "at" in outage, "the run ended before its first checkpoint was seen"
    assert stormy.returncode == 0, stormy.stderr[-4000:]
    console = stormy.stdout + stormy.stderr
    lines = [line for line in console.splitlines() if "retried from its last checkpoint" in line]
    assert lines, console[-4000:]
    assert all("OSError" in line and "attempt" in line for line in lines), lines
    assert "retry 1 of 5" in lines[0]
    calm_result, stormy_result = final_result(calm), final_result(stormy)
    for key in ("best_val_acc", "test_acc", "step"):
        assert stormy_result[key] == calm_result[key], (key, stormy_result, calm_result)
