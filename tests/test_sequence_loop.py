"""The self-supervised training loop: the CLI run in MLflow, the exact step_k schedule, exact resume, a
sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_config
from helpers import interrupted_and_resumed

from uml_ray.cli import main
from uml_ray.config import load_config
from uml_ray.driver.plan import build_plan
from uml_ray.train.context import LocalContext
from uml_ray.train.sequence_loop import train_sequence

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "sequence.yaml"
CLASSES = 5
TRAIN_ROWS, BATCH = 60, 16  # 3 target batches per epoch
STEPS_PER_EPOCH = TRAIN_ROWS // BATCH
SEQUENCE = {
    "model": {"regime": "sequence", "zdim": 20, "layers": 1, "heads": 5, "pos_emb": "learnable"},
    "train": {"lr": 0.003, "batch_size": BATCH, "max_steps": 30, "warmup_steps": 3, "val_every": 5},
}


@pytest.fixture(scope="module")
def sequence_manifest(tmp_path_factory):
    """Tiny synthetic sequences whose class lives in the latent drive (a next-step model's pooled state
    carries it)."""
    from uml_ray.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("sequence")
    return write_synthetic(
        str(out),
        kind="sequence",
        n_classes=CLASSES,
        dim_x=8,
        dims_aux=(6,),
        n_train=TRAIN_ROWS,
        n_val=60,
        n_test=100,
        n_aux=120,
        noise_x=0.5,
        class_sep=2.0,
        seq_len=(6, 12),
        seed=0,
    )


def sequence_config(path: Path, manifest: str, workdir: Path, **train) -> Path:
    return write_config(
        path, manifest, workdir, model=SEQUENCE["model"], train={**SEQUENCE["train"], **train}
    )


@pytest.fixture(scope="module")
def loop_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sequence-loop")


def loop_plan(sequence_manifest, workdir, **train):
    """The run plan of the sequence regime on ``train`` settings, a checkpoint at every validation."""
    return build_plan(
        load_config(
            sequence_config(workdir / "c.yaml", sequence_manifest, workdir, checkpoint_every=1, **train)
        )
    )


def run_loop(sequence_manifest, workdir, **train) -> LocalContext:
    """The sequence loop without Ray; returns its context (reports, last checkpoint)."""
    plan = loop_plan(sequence_manifest, workdir, **train)
    ctx = LocalContext(plan)
    train_sequence(plan, ctx)
    return ctx


def test_step_k_trains_the_target_from_exactly_epoch_step_k(sequence_manifest, loop_workdir):
    step_k, max_steps = 2, 12
    ctx = run_loop(sequence_manifest, loop_workdir, step_k=step_k, max_steps=max_steps, val_every=1)
    warm_up = step_k * STEPS_PER_EPOCH
    assert [r["step"] for r in ctx.reports] == list(range(1, max_steps + 1))
    assert [r["target_on"] for r in ctx.reports] == [0.0] * warm_up + [1.0] * (max_steps - warm_up)
    assert [r["epoch"] for r in ctx.reports] == [(s - 1) // STEPS_PER_EPOCH for s in range(1, max_steps + 1)]
    # the target term is absent from the warm-up's losses, present from the first joint step on
    assert all(
        "train_loss_image" not in r and r["train_loss"] == r["train_loss_text"] for r in ctx.reports[:warm_up]
    )
    assert all(r["train_loss_image"] > 0 for r in ctx.reports[warm_up:])
    # no target batch was drawn during the warm-up: its stream has served exactly the joint steps
    joint = max_steps - warm_up
    assert ctx.saved["streams"]["image"] == {
        "epoch": (joint - 1) // STEPS_PER_EPOCH,
        "drawn": (joint - 1) % STEPS_PER_EPOCH + 1,
    }
    text = ctx.saved["streams"]["text"]
    assert text["epoch"] * (120 // BATCH) + text["drawn"] == max_steps


def test_unimodal_run_with_a_warm_up_is_refused_before_launch(sequence_manifest, loop_workdir):
    from uml_ray.errors import ConfigError

    with pytest.raises(
        ConfigError, match="train.step_k=2 warms up on the auxiliary modalities alone, but every alpha is 0"
    ):
        run_loop(sequence_manifest, loop_workdir, step_k=2, alpha_default=0.0)


def test_resumed_sequence_loop_continues_exactly(sequence_manifest, loop_workdir):
    # dropout and a learnable position table are on, and the interruption falls inside the
    # step_k warm-up, so RNG, stream positions and the schedule all have to come back
    train = {"step_k": 3, "val_every": 5, "max_steps": 20}
    plan = loop_plan(sequence_manifest, loop_workdir, **train)
    whole = LocalContext(plan)
    train_sequence(plan, whole)

    first, second = interrupted_and_resumed(plan, train_sequence, fail_after=1)
    assert first.saved["progress"]["step"] == 5
    assert first.saved["streams"]["image"] == {"epoch": 0, "drawn": 0}

    assert [r["step"] for r in second.reports] == [10, 15, 20]
    for resumed, uninterrupted in zip(second.reports, whole.reports[1:]):
        assert resumed == uninterrupted  # losses, probe accuracies, lr: bit-identical
    assert whole.reports[-1]["completed"] == 1 and whole.reports[-1]["test_acc"] > 1 / CLASSES
    for name, weight in whole.saved["model"].items():
        assert torch.equal(weight, second.saved["model"][name]), name
    for name, weight in whole.best["model"].items():
        assert torch.equal(weight, second.best["model"][name]), name


def test_train_cli_runs_the_sequence_regime_into_mlflow(ray_session, sequence_manifest, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    config = sequence_config(tmp_path / "c.yaml", sequence_manifest, tmp_path, step_k=1)
    assert main(["train", str(config), "--name", "sequence"]) == 0
    result = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    chance = 1 / CLASSES
    assert result["best_val_acc"] > chance + 0.3 and result["test_acc"] > chance + 0.3

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "sequence"
    assert run.data.params["model.regime"] == "sequence" and run.data.params["train.step_k"] == "1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [5, 10, 15, 20, 25, 30]
    # one epoch is 3 steps: the window ending at step 5 trained the target on 2 of its 5 steps
    target_on = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "target_on")}
    assert target_on == {5: pytest.approx(2 / 5), 10: 1.0, 15: 1.0, 20: 1.0, 25: 1.0, 30: 1.0}
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss_image")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert run.data.metrics["test_acc"] == pytest.approx(result["test_acc"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert "checkpoint/best.pt" in artifacts


@pytest.mark.slow
def test_sequence_sweep_lands_trials_under_a_parent(ray_session, sequence_manifest, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    config = sequence_config(tmp_path / "c.yaml", sequence_manifest, tmp_path)
    assert (
        main(["tune", str(config), "--space", str(SPACE), "--trials", "3", "--name", "sequence-sweep"]) == 0
    )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    parents = [r for r in runs if r.data.tags.get("uml_ray.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("uml_ray.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 3
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    for child in children:
        assert child.data.params["model.zdim"] in {"20", "40", "150", "300"}
        assert child.data.params["model.pos_emb"] in {"none", "sinusoidal", "learnable"}
        assert child.data.metrics["best_val_acc"] > 1 / CLASSES
        assert client.get_metric_history(child.info.run_id, "val_acc")[0].step == 5
    assert parents[0].data.metrics["trials"] == 3
