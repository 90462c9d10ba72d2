"""Shared fixtures: one local Ray for the whole session, tiny synthetic datasets, config writers."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")


TIERS = ("unit", "integration", "cluster")


def pytest_collection_modifyitems(config, items):
    """Sort every test into one tier: ``cluster`` (marked), ``integration`` (marked, or uses the
    shared local Ray), else ``unit`` — which must never start Ray (``_unit_tier_has_no_ray``)."""
    for item in items:
        if item.get_closest_marker("cluster"):
            continue
        if item.get_closest_marker("integration") or "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _unit_tier_has_no_ray(request, monkeypatch):
    """A unit-tier test that starts Ray fails at once: it belongs to the integration tier."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError(
            f"{request.node.nodeid} started Ray: "
            "mark it @pytest.mark.integration or use the ray_session fixture"
        )

    monkeypatch.setattr(ray, "init", refuse)
    # a Ray left running by an earlier integration test must not be borrowed either
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    yield


@pytest.fixture
def ray_session():
    """One local Ray (2 CPUs) shared by every test that trains; ``uml-ray`` commands attach to it.

    Function-scoped but started once: it is only re-started when a cluster test detached the
    driver from it (those attach to clusters of their own). Ray shuts down at interpreter exit.
    """
    import ray

    from uml_ray.cluster import start_local_ray

    if not ray.is_initialized():
        start_local_ray(2)
    return ray


def write_config(path: Path, manifest: str, workdir: Path, **sections) -> Path:
    """A run config YAML for tests: tiny schedule, SQLite MLflow and Ray storage under ``workdir``."""
    tree = {
        "data": {"manifest": str(manifest)},
        "model": {"regime": "supervised"},
        "train": {
            "lr": 0.01,
            "batch_size": 32,
            "max_steps": 120,
            "warmup_steps": 10,
            "val_every": 20,
            "seed": 0,
        },
        "tracking": {
            "uri": f"sqlite:///{workdir / 'mlflow.db'}",
            "storage_path": str(workdir / "runs"),
            "experiment": "tests",
        },
        "resources": {"num_workers": 1, "num_cpus": 2},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(tree))
    return path


# 4 noisy target shots per class; the auxiliary observed through X's own mixing (aligned spaces)
# with less noise and many rows: the case where UML must beat the unimodal baseline
ALIGNED = {"aux_shared_mixing": True, "dims_aux": (32,), "n_train": 20, "noise_x": 1.0}


@pytest.fixture(scope="session")
def synthetic_manifest(tmp_path_factory):
    """A small synthetic dataset where the auxiliary modality carries class information X's noise hides."""
    from uml_ray.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic(str(out), seed=0, **ALIGNED)


@contextlib.contextmanager
def moto_s3(bucket: str):
    """A moto S3 server on a free port of 127.0.0.1 holding ``bucket``; yields the AWS_* variables
    through which boto3 and pyarrow (``AWS_ENDPOINT_URL``) reach it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    try:
        s3_client(aws).create_bucket(Bucket=bucket)
        yield aws
    finally:
        server.stop()


def s3_client(aws: dict):
    """A boto3 S3 client for the server ``moto_s3`` yielded ``aws`` for."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=aws["AWS_ENDPOINT_URL"],
        region_name=aws["AWS_REGION"],
        aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"],
    )
