"""Supervised UML training: the method's promise on synthetic data, DDP parity, exact resume, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ALIGNED, write_config
from helpers import interrupted_and_resumed

from uml_ray.cli import main
from uml_ray.config import load_config
from uml_ray.driver.plan import build_plan
from uml_ray.train.context import Interrupted, LocalContext
from uml_ray.train.loop import train_supervised


def train_once(capsys, config, *overrides) -> dict:
    assert main(["train", str(config), *overrides]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def test_resumed_loop_continues_exactly_from_the_last_checkpoint(synthetic_manifest, tmp_path):
    # a checkpoint every 2nd validation: killed after the 3rd report (step 60), the run resumes
    # from step 40 and replays 60, 80, 100 bit for bit
    cfg = load_config(
        write_config(
            tmp_path / "c.yaml",
            synthetic_manifest,
            tmp_path,
            train={"max_steps": 100, "val_every": 20, "checkpoint_every": 2},
        )
    )
    plan = build_plan(cfg)
    whole = LocalContext(plan)
    train_supervised(plan, whole)

    first, second = interrupted_and_resumed(plan, train_supervised, fail_after=3)
    assert first.saved["progress"]["step"] == 40

    assert [r["step"] for r in second.reports] == [60, 80, 100]
    for resumed, uninterrupted in zip(second.reports, whole.reports[2:]):
        assert resumed == uninterrupted  # losses, accuracies, lr: bit-identical
    for name, weight in whole.saved["model"].items():
        assert torch.equal(weight, second.saved["model"][name]), name


@pytest.mark.parametrize("regime", ["supervised", "fused"])
def test_every_stream_is_closed_when_the_loop_is_left_early(
    synthetic_manifest, tmp_path, monkeypatch, regime
):
    """The loop closes its streams (a Ray Data read-ahead otherwise outlives the run) when a report
    raises too: here the simulated kill after the first validation."""
    from uml_ray.data.streams import BatchStream
    from uml_ray.train.fused_loop import train_fused

    closed, close = [], BatchStream.close

    def recording_close(stream):
        closed.append(stream.spec.name)
        close(stream)

    monkeypatch.setattr(BatchStream, "close", recording_close)
    plan = build_plan(load_config(write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path)))
    with pytest.raises(Interrupted):
        if regime == "fused":
            train_fused(plan, [{"train.lr": 0.01}, {"train.lr": 0.03}], LocalContext(plan, fail_after=1))
        else:
            train_supervised(plan, LocalContext(plan, fail_after=1))
    assert sorted(closed) == ["image.test", "image.train", "image.val", "text.train"]


def uml_and_unimodal(capsys, config) -> tuple[list[float], list[float]]:
    """Test accuracies of UML (alpha 1) and the unimodal baseline (alpha 0) at train seeds 0, 1, 2."""
    uml, base = [], []
    for seed in (0, 1, 2):
        uml.append(train_once(capsys, config, f"train.seed={seed}", "train.alpha_default=1.0")["test_acc"])
        base.append(train_once(capsys, config, f"train.seed={seed}", "train.alpha_default=0.0")["test_acc"])
    return uml, base


@pytest.mark.slow
def test_uml_beats_unimodal_baseline_over_seeds(ray_session, synthetic_manifest, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path, model={"project_target": False})
    uml, base = uml_and_unimodal(capsys, config)
    print(f"UML test acc {uml} vs unimodal {base}")
    assert np.mean(uml) - np.mean(base) >= 0.05
    assert all(u > b for u, b in zip(uml, base))


@pytest.mark.slow
def test_pure_noise_auxiliary_neither_helps_nor_hurts(ray_session, tmp_path, capsys):
    from uml_ray.data.synth import write_synthetic

    manifest = write_synthetic(str(tmp_path / "noise"), aux_pure_noise=True, seed=0, **ALIGNED)
    config = write_config(tmp_path / "c.yaml", manifest, tmp_path, model={"project_target": False})
    uml, base = uml_and_unimodal(capsys, config)
    print(f"pure-noise aux: UML test acc {uml} vs unimodal {base}")
    assert abs(np.mean(uml) - np.mean(base)) <= 0.05


@pytest.mark.slow
def test_two_workers_match_one_worker(ray_session, synthetic_manifest, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    # Full-batch steps: every worker's batch is its whole share (10 of the 20 target rows, 500 of
    # the 1000 auxiliary ones), so DDP's mean of the two workers' gradients is the one worker's
    # gradient over all rows, and validation and test sum both shares. The runs then differ only
    # in float summation order. With smaller batches each worker would draw its own rows with its
    # own seed: another trajectory, alike only in expectation (accuracies 0.06 apart).
    config = write_config(
        tmp_path / "c.yaml",
        synthetic_manifest,
        tmp_path,
        train={"batch_size": 20},
        data={"aux_batch_ratio": 50},
    )
    one = train_once(capsys, config, "--name", "one")
    two = train_once(
        capsys, config, "resources.num_workers=2", "resources.cpus_per_worker=0.5", "--name", "two"
    )
    print(f"1 worker {one} / 2 workers {two}")
    assert one["test_acc"] > 0.5  # 5 classes: chance is 0.2
    for name in ("best_step", "best_val_acc", "test_acc"):
        assert two[name] == one[name], name
    # every validation too (train_loss is the reporting worker's own share's loss: other rows)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    run_ids = {run.info.run_name: run.info.run_id for run in runs}
    for name in ("val_acc", "val_loss", "test_loss"):
        histories = [
            [(m.step, m.value) for m in client.get_metric_history(run_ids[run], name)]
            for run in ("one", "two")
        ]
        assert [step for step, _ in histories[1]] == [step for step, _ in histories[0]], name
        for (step, value_one), (_, value_two) in zip(*histories):
            assert value_two == pytest.approx(value_one, rel=1e-5), (name, step)


def test_train_cli_records_mlflow_run(ray_session, synthetic_manifest, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path)
    result = train_once(capsys, config, "--name", "single")
    assert result["best_val_acc"] > 0.4 and result["test_acc"] > 0.4  # 5 classes: chance is 0.2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "single"
    assert run.data.params["train.lr"] == "0.01"
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == [20, 40, 60, 80, 100, 120]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")
    }
    assert {"config.yaml", "checkpoint/best.pt"} <= artifacts
    assert run.data.metrics["test_acc"] == pytest.approx(result["test_acc"])


def test_patience_stops_early_and_scores_the_best_val_point(
    ray_session, synthetic_manifest, tmp_path, capsys
):
    from mlflow.tracking import MlflowClient

    config = write_config(
        tmp_path / "c.yaml",
        synthetic_manifest,
        tmp_path,
        train={"max_steps": 400, "val_every": 10, "patience": 2, "lr": 0.05},
    )
    result = train_once(capsys, config, "--name", "patient")
    assert result["stopped_early"] == 1 and result["step"] < 400
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_acc")}
    assert max(history.values()) == result["best_val_acc"]
    # stopped after exactly `patience` validations without improvement over the best
    assert max(history) - result["best_step"] == 2 * 10
    assert run.data.tags["uml_ray.outcome"] == "stopped_early"


def test_streamed_shares_read_by_pyarrow_match_the_same_rows_in_memory(synthetic_manifest):
    """A one-process run streams shares over data.cache_max_mb straight from Parquet (pyarrow, read
    ahead on a thread): the batches equal a BatchStream over the same rows held in memory, every row
    comes once per epoch, and a stream resumed mid-epoch continues with the same batches."""
    from uml_ray.data.manifest import load_manifest
    from uml_ray.data.parquet_source import ParquetSource
    from uml_ray.data.streams import BatchStream, StreamSpec, TableSource, read_table

    manifest = load_manifest(synthetic_manifest)
    uris = manifest.uris("text", "train")
    table = read_table(uris)
    spec = StreamSpec("text.train", "vector", manifest.modalities["text"].dim, len(table), cached=False)

    def stream(source, buffer):
        return BatchStream(source, spec, 16, seed=3, rank=0, world_size=1, shuffle_buffer=buffer)

    source = ParquetSource(uris, block_rows=7)  # blocks that do not divide the batches
    n = len(table)
    assert [len(t) for t in source.iter_batches(batch_size=50)] == [50] * (n // 50) + (
        [n % 50] if n % 50 else []
    )
    assert pa_concat(source.iter_batches()).equals(table)
    for buffer in (len(table), 40):
        streamed, held = stream(source, buffer), stream(TableSource(table), buffer)
        batches = {}  # (epoch, index in epoch) -> batch
        while streamed.epoch < 2:
            batch = streamed.next()
            batches[(streamed.epoch, streamed.drawn - 1)] = batch
        del batches[max(batches)]  # the first batch of epoch 2
        if buffer == len(table):  # one buffer: the whole share in file order, as held in memory
            for ours, theirs in zip(batches.values(), (held.next() for _ in batches)):
                assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])
        epoch0 = [b for (e, _), b in batches.items() if e == 0]
        assert sorted(np.concatenate([b[1] for b in epoch0]).tolist()) == sorted(
            table.column("label").to_pylist()
        )
        resumed = stream(source, buffer)
        resumed.load_state_dict({"epoch": 1, "drawn": 2})
        assert all(np.array_equal(resumed.next()[0], batches[(1, d)][0]) for d in range(2, 6))


def pa_concat(tables):
    import pyarrow as pa

    return pa.concat_tables(list(tables)).combine_chunks()


def test_read_ahead_hands_over_errors_and_stops_with_its_consumer():
    import threading

    from uml_ray.data.read_ahead import read_ahead

    def failing():
        yield 1
        raise ValueError("shard 2 is truncated")

    with pytest.raises(ValueError, match="shard 2 is truncated"):
        list(read_ahead(failing(), 2))
    produced = []

    def endless():
        for i in range(10**9):
            produced.append(i)
            yield i

    before = set(threading.enumerate())
    items = read_ahead(endless(), 2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    (reader,) = [t for t in threading.enumerate() if t not in before and t.name == "uml-ray-read-ahead"]
    items.close()
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert len(produced) <= 3 + 2 + 1  # the thread stopped a few items ahead, not at a billion


def test_train_cli_streams_shares_over_the_cache(ray_session, synthetic_manifest, tmp_path, capsys):
    """Every share streamed (data.cache_max_mb=0): the run trains to the end and learns."""
    config = write_config(
        tmp_path / "c.yaml", synthetic_manifest, tmp_path, data={"cache_max_mb": 0, "shuffle_buffer": 64}
    )
    result = train_once(capsys, config, "--name", "streamed")
    assert (
        result["step"] == 120 and result["best_val_acc"] > 0.4 and result["test_acc"] > 0.4
    )  # 5 classes: chance is 0.2
