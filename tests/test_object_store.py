"""Real ``s3://`` paths end to end against moto's S3-compatible server on 127.0.0.1 (no mocks).

pyarrow (``FileSystem.from_uri``) and boto3 both reach the server through ``AWS_ENDPOINT_URL``.
Every ``uml-ray`` command runs in a fresh subprocess with that environment: Ray workers inherit
the environment of the process that started Ray, so ``train`` starts its own local Ray there
rather than attaching to the shared ``ray_session``.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import moto_s3, s3_client, write_config
from helpers import uml_ray

BUCKET = "uml-store"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free port of 127.0.0.1 with one bucket; yields (boto3 client, env)."""
    with moto_s3(BUCKET) as aws:
        env = {**os.environ, **aws}
        env.pop("RAY_ADDRESS", None)  # the subprocess must start a local Ray of its own
        yield s3_client(aws), env


def keys(client, prefix: str) -> set[str]:
    found = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        found.update(o["Key"] for o in page.get("Contents", []))
    return found


def synth_on_s3(env, cwd, prefix: str, n_val: int) -> str:
    """``uml-ray data synth`` of a small dataset (20 train rows, ``n_val`` val and test rows, 40 auxiliary
    rows, seed 0) into ``s3://BUCKET/prefix``; returns its manifest's URI."""
    sizes = ["--n-train", 20, "--n-val", n_val, "--n-test", n_val, "--n-aux", 40, "--seed", 0]
    synth = uml_ray(env, cwd, "data", "synth", f"s3://{BUCKET}/{prefix}", *sizes)
    assert synth.returncode == 0, synth.stderr
    return f"s3://{BUCKET}/{prefix}/manifest.yaml"


def test_synth_and_validate_on_s3(s3, tmp_path):
    client, env = s3
    manifest = synth_on_s3(env, tmp_path, "synth", n_val=10)
    written = keys(client, "synth/")
    assert "synth/manifest.yaml" in written
    shards = sorted(k for k in written if k.endswith(".parquet"))
    assert {k.split("/")[1] for k in shards} == {"image", "text"}
    assert {k.split("/")[2] for k in shards if k.startswith("synth/image/")} == {"train", "val", "test"}
    assert not [k for k in os.listdir(tmp_path)], "synth wrote locally instead of to the bucket"

    ok = uml_ray(env, tmp_path, "data", "validate", manifest)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.rstrip().endswith("OK") and "Traceback" not in ok.stderr

    broken = "synth/text/train/part-00000.parquet"
    assert broken in shards
    client.put_object(Bucket=BUCKET, Key=broken, Body=b"this is not a parquet file" * 10)
    bad = uml_ray(env, tmp_path, "data", "validate", manifest)
    assert bad.returncode == 2, (bad.stdout, bad.stderr)
    assert "Traceback" not in bad.stderr
    problems = [line for line in bad.stderr.splitlines() if f"s3://{BUCKET}/{broken}" in line]
    assert len(problems) == 1, bad.stderr
    assert "cannot read the Parquet shard" in problems[0]
    assert not [line for line in bad.stderr.splitlines() if ".parquet" in line and broken not in line], (
        bad.stderr
    )


@pytest.mark.slow
@pytest.mark.integration
def test_train_reads_s3_manifest_and_checkpoints_to_s3(s3, tmp_path):
    from mlflow.tracking import MlflowClient

    client, env = s3
    manifest = synth_on_s3(env, tmp_path, "train-data", n_val=20)
    config = write_config(
        tmp_path / "c.yaml",
        manifest,
        tmp_path,
        train={"max_steps": 40, "val_every": 20, "warmup_steps": 5},
        tracking={"storage_path": f"s3://{BUCKET}/runs"},
        resources={"num_workers": 1, "num_cpus": 2},
    )
    run = uml_ray(env, tmp_path, "train", config, "--name", "s3run", timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])
    assert result["test_acc"] > 0.3  # 5 classes: chance is 0.2

    stored = keys(client, "runs/")
    checkpoints = [k for k in stored if "/checkpoint_" in k]
    assert checkpoints, sorted(stored)[:50]
    assert any(k.endswith(".pt") for k in checkpoints), sorted(checkpoints)
    assert not (tmp_path / "runs").exists() and not os.path.exists(os.path.join(tmp_path, "s3:"))

    mlflow = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED" and runs[0].info.run_name == "s3run"
    assert runs[0].data.metrics["test_acc"] == pytest.approx(result["test_acc"])
    assert runs[0].data.params["data.manifest"] == manifest
    # the best weights were fetched back from the s3 checkpoint and logged to MLflow
    logged = {a.path for a in mlflow.list_artifacts(runs[0].info.run_id, "checkpoint")}
    assert "checkpoint/best.pt" in logged
