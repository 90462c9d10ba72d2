"""`uml-ray best --ensemble m`: the top-m runs' recorded best-val weights rebuilt, each reproducing its
recorded accuracies, their softmax probabilities averaged; refusals before anything is printed."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_config

from uml_ray.errors import UserError
from uml_ray.train.predict import accuracy, mean_probabilities, softmax

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "supervised_linear_probe.yaml"


def test_softmax_mean_and_accuracy_on_numbers():
    """Averaging probabilities can pick a class no single member picks; argmax of logits and of their
    softmax agree."""
    a = np.array([[2.0, 0.0, 1.9], [0.0, 3.0, 0.0]])
    b = np.array([[0.0, 2.0, 1.9], [0.0, 3.0, 0.0]])
    pa, pb = softmax(a), softmax(b)
    assert pa.sum(axis=1) == pytest.approx([1.0, 1.0])
    e = math.exp
    assert pa[0] == pytest.approx(
        [e(2) / (e(2) + 1 + e(1.9)), 1 / (e(2) + 1 + e(1.9)), e(1.9) / (e(2) + 1 + e(1.9))]
    )
    mean = mean_probabilities([pa, pb])
    assert mean == pytest.approx((pa + pb) / 2)
    labels = np.array([2, 1])
    # each member gets row 0 wrong (class 0, class 1); the mean's highest is class 2
    assert accuracy(a, labels) == accuracy(b, labels) == 0.5
    assert accuracy(pa, labels) == 0.5
    assert mean.argmax(axis=1).tolist() == [2, 1] and accuracy(mean, labels) == 1.0
    # huge logits do not overflow
    assert softmax(np.array([[1000.0, 0.0]]))[0] == pytest.approx([1.0, 0.0])
    with pytest.raises(ValueError, match="differ in shape"):
        mean_probabilities([pa, pa[:1]])


def test_sizes_and_paths():
    from uml_ray.driver.ensemble import check_size, ensemble_path

    for bad in (1, 0, -3):
        with pytest.raises(UserError, match=f"--ensemble {bad}: an ensemble needs at least 2 members"):
            check_size(bad)
    check_size(2)
    assert ensemble_path("out/best_config.yaml") == "out/best_config.ensemble.yaml"
    assert ensemble_path("best") == "best.ensemble.yaml"


def _plan(manifest, tmp_path, **train):
    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan

    config = write_config(tmp_path / "c.yaml", manifest, tmp_path, train={"max_steps": 80, **train})
    return build_plan(load_config(str(config)))


def test_loop_products_reproduce_their_accuracies(synthetic_manifest, tmp_path):
    """A single run's and a fused trial's members' products, rebuilt, score exactly the val and test
    accuracies the loop recorded (no Ray: LocalContext)."""
    from uml_ray.train.context import LocalContext
    from uml_ray.train.fused_loop import train_fused
    from uml_ray.train.loop import train_supervised
    from uml_ray.train.predict import Member

    plan = _plan(synthetic_manifest, tmp_path)
    ctx = LocalContext(plan)
    final = train_supervised(plan, ctx)
    member = Member.from_product("single", ctx.best)
    _, labels, logits = member.logits("val")
    assert accuracy(logits, labels) == final["best_val_acc"]
    _, labels, logits = member.logits("test")
    assert accuracy(logits, labels) == final["test_acc"]

    members = [
        {"train.lr": 0.02, "model.head_init": "text"},
        {"train.lr": 0.003, "train.weight_decay": 0.01},
        {"train.lr": 0.01, "train.alpha.text": 0.0},
    ]
    ctx = LocalContext(plan.with_params(members[0]))
    final = train_fused(plan, members, ctx)
    for k, result in enumerate(final["members"]):
        member = Member.from_product(f"m{k}", ctx.best["members"][k])
        for split, recorded in (("val", "best_val_acc"), ("test", "test_acc")):
            _, labels, logits = member.logits(split)
            assert accuracy(logits, labels) == result[recorded]


def test_a_product_whose_manifest_moved_is_refused_naming_the_path(synthetic_manifest, tmp_path):
    from uml_ray.train.context import LocalContext
    from uml_ray.train.loop import train_supervised
    from uml_ray.train.predict import Member

    data = tmp_path / "data"
    shutil.copytree(Path(synthetic_manifest).parent, data)
    plan = _plan(str(data / Path(synthetic_manifest).name), tmp_path, max_steps=20)
    ctx = LocalContext(plan)
    train_supervised(plan, ctx)
    shutil.rmtree(data)
    with pytest.raises(UserError) as refused:
        Member.from_product("gone", ctx.best)
    assert f"run gone: its recorded manifest {plan.cfg.data.manifest} cannot be read" in str(refused.value)
    sequence = dict(ctx.best, config={**ctx.best["config"], "model": {"regime": "sequence"}})
    with pytest.raises(UserError, match="run seq: regime 'sequence'"):
        Member.from_product("seq", sequence)
    folds = dict(
        ctx.best, config={**ctx.best["config"], "train": {**ctx.best["config"]["train"], "select_folds": 4}}
    )
    with pytest.raises(UserError, match="run folds: trained with train.select_folds=4"):
        Member.from_product("folds", folds)


def _best(uri: str, output: Path, *extra: str) -> list[str]:
    from uml_ray.cli import main

    argv = ["best", "--experiment", "tests", "--tracking-uri", uri, "--sweep", "ens", "--output", str(output)]
    return main([*argv, *extra])


@pytest.mark.slow
def test_best_ensemble_of_a_real_sweep(ray_session, synthetic_manifest, tmp_path, capsys):
    """A real sweep (TPE, fused trials with halving, MLflow SQLite), then `best --ensemble 3`: every member
    reproduces its recorded accuracies, the ensemble's probabilities are the members' mean softmax,
    the YAML beside --output and the parent run's metrics hold its accuracies; the refusals."""
    from mlflow.tracking import MlflowClient

    from uml_ray.cli import main
    from uml_ray.driver.ensemble import evaluate
    from uml_ray.tracking.runs import PRODUCT, ranked_runs
    from uml_ray.train.predict import Member

    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path)
    assert main(["tune", str(config), "--space", str(SPACE), "--trials", "12", "--name", "ens"]) == 0
    capsys.readouterr()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ranked = ranked_runs(uri, "tests", sweep="ens")
    assert len(ranked) >= 3

    output = tmp_path / "best.yaml"
    assert _best(uri, output, "--ensemble", "3") == 0
    out = capsys.readouterr().out
    assert "ensemble of the top 3" in out and "(the single best)" in out
    assert yaml.safe_load(output.read_text())["train"]  # --output stays a runnable config
    written = yaml.safe_load((tmp_path / "best.ensemble.yaml").read_text())["ensemble"]
    assert written["size"] == 3 and written["ranked_by"] == "selection_score"
    assert [m["run_id"] for m in written["members"]] == [r["run_id"] for r in ranked[:3]]
    for member, run in zip(written["members"], ranked):
        # reproduced from the weights, equal to what the sweep recorded
        assert member["val_acc"] == run["metrics"]["best_val_acc"]
        assert member["test_acc"] == run["metrics"]["test_acc"]
        assert member["params"] and member["params"] == yaml.safe_load(run["tags"]["uml_ray.sampled"])
    assert written["single_best"]["run_id"] == ranked[0]["run_id"]

    # the ensemble's probabilities are the mean of the members' softmax, on the real rows
    client = MlflowClient(uri)
    members, logits = [], {"val": [], "test": []}
    for k, run in enumerate(ranked[:3]):
        path = client.download_artifacts(run["run_id"], PRODUCT, str(tmp_path / f"p{k}"))
        member = Member.from_product(run["run_name"], torch.load(path, weights_only=False))
        members.append(member)
        for split in logits:
            logits[split].append(member.logits(split)[2])
    result = evaluate(members, ranked[:3])
    for split in logits:
        by_hand = sum(softmax(x) for x in logits[split]) / 3
        assert result["probabilities"][split] == pytest.approx(by_hand, abs=1e-12)
        assert result["probabilities"][split].sum(axis=1) == pytest.approx(1.0)
        assert written[f"{split}_acc"] == accuracy(by_hand, result["labels"][split])

    # a member whose weights no longer score what its run recorded (the data was rebuilt) stops it
    shifted = [
        dict(
            ranked[0], metrics={**ranked[0]["metrics"], "test_acc": written["members"][0]["test_acc"] + 0.001}
        )
    ]
    with pytest.raises(
        UserError, match=f"run {ranked[0]['run_name']}: its recorded weights score test accuracy"
    ):
        evaluate(members[:1], shifted)

    parent = next(
        r
        for r in client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        if r.data.tags.get("uml_ray.kind") == "sweep"
    )
    assert parent.data.metrics["ensemble3_val_acc"] == written["val_acc"]
    assert parent.data.metrics["ensemble3_test_acc"] == written["test_acc"]
    assert parent.data.tags["uml_ray.ensemble3_members"] == ",".join(r["run_id"] for r in ranked[:3])

    # refusals: exit 2, one line, nothing written
    capsys.readouterr()  # the test's own downloads' progress bars
    other = tmp_path / "other.yaml"
    for argv, said in (
        (["--ensemble", "1"], "uml-ray best: error: --ensemble 1: an ensemble needs at least 2 members"),
        (
            ["--ensemble", str(len(ranked) + 1)],
            f"uml-ray best: error: --ensemble {len(ranked) + 1}: only {len(ranked)} finished run(s) in "
            "sweep 'ens'",
        ),
    ):
        assert _best(uri, other, *argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith(said) and captured.err.count("\n") == 1
    assert not other.exists()

    # a member's dataset moved away: named, before anything is printed
    manifest = Path(members[0].manifest.path)
    moved = manifest.with_name("moved.yaml")
    manifest.rename(moved)
    try:
        assert _best(uri, other, "--ensemble", "2") == 2
    finally:
        moved.rename(manifest)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert f"its recorded manifest {manifest} cannot be read" in captured.err
    assert not other.exists()
