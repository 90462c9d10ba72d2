"""Divergence is a trial outcome, not a crash: a loss that goes non-finite or explodes ends the run (or
the fused member) at that validation as ``diverged``; the searcher is told it failed, MLflow records
the outcome with the step and the loss, and the sweep goes on."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write_config

from uml_ray.cli import main
from uml_ray.config import load_config
from uml_ray.driver.plan import build_plan
from uml_ray.train.context import LocalContext
from uml_ray.train.fused_loop import train_fused
from uml_ray.train.loop import train_supervised
from uml_ray.train.state import DIVERGENCE_FACTOR, diverges

# lr is capped at 10, where AdamW alone does not diverge on the synthetic data; its decoupled weight
# decay at lr * wd > 2 flips and grows every weight each step: inf, then NaN, within ~40 steps
DIVERGING = {"train.lr": 10.0, "train.weight_decay": 1.0}


@pytest.fixture(scope="module")
def plan(synthetic_manifest, tmp_path_factory):
    """120 steps, validating every 20."""
    workdir = tmp_path_factory.mktemp("divergence")
    return build_plan(load_config(write_config(workdir / "c.yaml", synthetic_manifest, workdir)))


def run_alone(plan, overrides: dict) -> LocalContext:
    member_plan = plan.with_params(overrides)
    ctx = LocalContext(member_plan)
    train_supervised(member_plan, ctx)
    return ctx


def test_the_bound_is_non_finite_or_factor_times_the_first_train_loss():
    assert diverges(math.nan, 2.0) and diverges(math.inf, 2.0) and diverges(math.inf, None)
    assert not diverges(2.0 * DIVERGENCE_FACTOR, 2.0) and diverges(2.0 * DIVERGENCE_FACTOR * 1.01, 2.0)
    # a first loss below 1 is taken as 1: a fit that went from 1e-6 to 0.05 has not exploded
    assert not diverges(0.05, 1e-6) and diverges(DIVERGENCE_FACTOR * 1.01, 1e-6)


def test_a_non_finite_loss_ends_the_run_at_that_validation_untested(plan):
    ctx = run_alone(plan, DIVERGING)
    steps = [r["step"] for r in ctx.reports]
    first, last = ctx.reports[0], ctx.reports[-1]
    assert steps == [20, 40]  # ended at the first validation after the loss went non-finite, not at 120
    assert math.isfinite(first["train_loss"]) and "diverged" not in first
    assert not math.isfinite(last["train_loss"])
    assert last["diverged"] == 1 and last["diverged_step"] == 40
    assert math.isnan(last["diverged_loss"]) == math.isnan(last["train_loss"])
    # untested and not completed; the best-val point is the last finite one
    assert "test_acc" not in last and "completed" not in last
    assert last["best_step"] == 20 and last["best_val_acc"] == first["best_val_acc"]


def test_an_exploding_loss_ends_the_run_before_it_is_non_finite(plan):
    ctx = run_alone(plan, {**DIVERGING, "train.val_every": 5})
    first, last = ctx.reports[0], ctx.reports[-1]
    assert [r["step"] for r in ctx.reports] == [5, 10]
    assert math.isfinite(last["diverged_loss"]) and last["diverged_loss"] == last["train_loss"]
    assert last["diverged_loss"] > DIVERGENCE_FACTOR * max(first["train_loss"], 1.0)
    assert last["diverged_step"] == 10


def test_a_diverging_fused_member_ends_alone_and_the_others_train_as_if_alone(plan):
    members = [
        {"train.lr": 0.01, "train.alpha.text": 0.5},
        DIVERGING,
        {"train.lr": 0.003, "train.weight_decay": 0.01, "train.alpha.text": 1.0},
    ]
    fused = LocalContext(plan)
    train_fused(plan, members, fused)
    assert [r["step"] for r in fused.reports] == [20, 40, 60, 80, 100, 120]
    assert [r["live"] for r in fused.reports] == [3, 2, 2, 2, 2, 0]
    final = fused.reports[-1]["members"]
    assert final[1]["diverged"] == 1 and final[1]["diverged_step"] == 40 and "test_acc" not in final[1]
    by_step = {r["step"]: r for r in fused.reports}
    for k in (0, 2):
        alone = run_alone(plan, members[k])
        for report in alone.reports:
            member = by_step[report["step"]]["members"][k]
            assert "diverged" not in member
            for name in ("train_loss", "val_acc", "val_loss", "best_val_acc", "best_step", "lr"):
                assert member[name] == pytest.approx(report[name], abs=1e-4), (k, report["step"], name)
        assert final[k]["completed"] == 1
        assert final[k]["test_acc"] == pytest.approx(alone.reports[-1]["test_acc"], abs=1e-4)
        assert final[k]["best_step"] == alone.best["step"]


def test_the_searcher_tells_optuna_a_diverged_run_failed(plan, tmp_path):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from uml_ray.driver.searcher import CheckedSearcher, tune_space
    from uml_ray.search.space import load_space

    (tmp_path / "s.yaml").write_text("params:\n  train.lr: {type: choice, values: [0.01, 0.03, 10.0]}\n")
    space = load_space(tmp_path / "s.yaml")
    inner = OptunaSearch(
        space=None, sampler=optuna.samplers.RandomSampler(seed=0), metric="best_val_acc", mode="max"
    )
    searcher = CheckedSearcher(inner, plan, "fixed", "best_val_acc", 3)
    searcher.set_search_properties("best_val_acc", "max", tune_space(space))
    for i in range(3):
        config = searcher.suggest(f"t{i}")
        # a diverged run still carries the best val accuracy it had before: it must not be learnt from
        result = {"best_val_acc": 0.5 + i / 10}
        if config["train.lr"] == 10.0:
            result.update(diverged=1, diverged_step=40, diverged_loss=math.inf)
        searcher.on_trial_complete(f"t{i}", result=result)
    states = {t.params["train.lr"]: t.state.name for t in inner._ot_study.trials}
    assert states == {0.01: "COMPLETE", 0.03: "COMPLETE", 10.0: "FAIL"}


@pytest.mark.parametrize("fuse", [1, 4])
def test_a_sweep_with_a_diverging_trial_goes_on_and_records_it(
    ray_session, synthetic_manifest, tmp_path, capsys, fuse
):
    """Four configs, one diverging: as four trials (ASHA may stop some others) or as the members of
    one fused trial (halving may prune some others). It diverges at its first validation, before
    any rung could stop it."""
    from mlflow.tracking import MlflowClient

    schedule = {"max_steps": 120, "val_every": 40, "weight_decay": 1.0}
    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path, train=schedule)
    space = tmp_path / "s.yaml"
    space.write_text(
        "searcher: random\nparams:\n  train.lr: {type: choice, values: [0.003, 0.01, 0.03, 10.0]}\n"
    )
    name = f"div{fuse}"
    code = main(
        ["tune", str(config), "--space", str(space), "--trials", "4", "--fuse", str(fuse), "--name", name]
    )
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert summary["best_config"]["train.lr"] != 10.0

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    children = [r for r in runs if r.data.tags.get("uml_ray.kind") == "trial"]
    assert len(children) == 4
    (diverged,) = [r for r in children if float(r.data.params["train.lr"]) == 10.0]
    assert diverged.data.tags["uml_ray.outcome"] == "diverged" and diverged.info.status == "FAILED"
    assert diverged.data.tags["uml_ray.diverged_step"] == "40"
    loss = diverged.data.tags["uml_ray.diverged_loss"]
    assert loss in ("nan", "inf")
    assert diverged.data.metrics["diverged_step"] == 40
    assert "checkpoint" not in {a.path for a in client.list_artifacts(diverged.info.run_id)}
    assert f"trial {diverged.data.tags['uml_ray.trial_id']} diverged at step 40 (loss {loss})" in out
    others = [r for r in children if r is not diverged]
    assert {r.data.tags["uml_ray.outcome"] for r in others} <= {"finished", "pruned"}
    (parent,) = [r for r in runs if r.data.tags.get("uml_ray.kind") == "sweep"]
    counts = parent.data.metrics
    assert counts["diverged_trials"] == 1 and counts["failed_trials"] == 0 and counts["trials"] == 4
    assert counts["completed_trials"] >= 1 and counts["completed_trials"] + counts["pruned_trials"] == 3
    assert parent.info.status == "FINISHED"


def test_a_single_diverging_run_ends_in_one_line(ray_session, synthetic_manifest, tmp_path, capsys):
    config = write_config(
        tmp_path / "c.yaml", synthetic_manifest, tmp_path, train={"lr": 10.0, "weight_decay": 1.0}
    )
    assert main(["train", str(config), "--name", "single"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("uml-ray train: error: run 'single' diverged at step 40 (loss ")
    assert err[-1].endswith("); lower train.lr")
