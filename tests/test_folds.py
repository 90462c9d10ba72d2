"""k-fold selection: the stratified seeded fold split, fold members trained side by side that never
see their held-out rows, each equal to its config trained alone on its fold, and the refit on the
whole pool recorded on the sweep."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import write_config

from uml_ray.config import load_config
from uml_ray.data.folds import fold_assignment, fold_split, pool_table
from uml_ray.data.format import FEATURES, ID, layout_of, table_to_numpy, vector_array
from uml_ray.driver.plan import build_plan
from uml_ray.driver.sweep import check_folds_fuse
from uml_ray.errors import ConfigError
from uml_ray.search.space import load_space
from uml_ray.train.context import LocalContext
from uml_ray.train.fused_loop import Fused, train_fused
from uml_ray.train.loop import Supervised, train_supervised
from uml_ray.train.refit import refit
from uml_ray.train.state import rng_state, set_rng_state

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "supervised_linear_probe.yaml"
FOLDS = 3
MEMBERS = [
    {"train.lr": 0.01, "train.alpha.text": 0.5, "model.head_init": "text"},
    {"train.lr": 0.003, "train.weight_decay": 0.01, "train.alpha.text": 0.0},
    {"train.lr": 0.02, "train.alpha.text": 1.0, "model.logit_scale": True, "train.grad_clip": 0.5},
]


@pytest.fixture(scope="module")
def plan(synthetic_manifest, tmp_path_factory):
    """3-fold selection over the synthetic pool (20 train + 100 val rows), 120 steps, batch 16."""
    workdir = tmp_path_factory.mktemp("folds")
    schedule = {"max_steps": 120, "val_every": 20, "checkpoint_every": 2}
    path = write_config(
        workdir / "c.yaml",
        synthetic_manifest,
        workdir,
        train={**schedule, "select_folds": FOLDS, "batch_size": 16},
    )
    return build_plan(load_config(path))


def split_tables(plan) -> tuple[pa.Table, pa.Table]:
    base = LocalContext(plan)
    target = plan.dataset.target
    return base.source(f"{target}.train").table, base.source(f"{target}.val").table


def test_folds_are_stratified_seeded_disjoint_and_cover_the_pool():
    labels = np.repeat(np.arange(4), [7, 9, 8, 12])  # class sizes not divisible by k
    for k in (2, 3, 5, 7):
        folds = fold_assignment(labels, k, seed=3)
        assert sorted(set(folds.tolist())) == list(range(k))
        sizes = np.bincount(folds, minlength=k)
        assert sizes.max() - sizes.min() <= 1 and sizes.sum() == len(labels)  # every row in exactly one
        for c in range(4):  # each class dealt evenly: floor or ceil of n_c / k rows in every fold
            per_fold = np.bincount(folds[labels == c], minlength=k)
            assert per_fold.max() - per_fold.min() <= 1 and per_fold.min() >= 1
        np.testing.assert_array_equal(folds, fold_assignment(labels, k, seed=3))  # seeded
    assert not np.array_equal(fold_assignment(labels, 3, 3), fold_assignment(labels, 3, 4))
    with pytest.raises(ConfigError, match=r"select_folds=8: class '0' has only 7 row\(s\).*<=7"):
        fold_assignment(labels, 8, seed=0)
    with pytest.raises(ConfigError, match="select_folds=1"):
        fold_assignment(labels, 1, seed=0)


def test_fold_split_of_the_pool_holds_every_row_out_once(plan):
    pool = pool_table(*split_tables(plan))
    assert len(pool) == 120
    splits = fold_split(pool, FOLDS, seed=0)
    held = [set(val.column(ID).to_pylist()) for _, val in splits]
    assert set().union(*held) == set(pool.column(ID).to_pylist()) and sum(map(len, held)) == len(pool)
    for (train, _), out in zip(splits, held):
        assert not out & set(train.column(ID).to_pylist()) and len(train) + len(out) == len(pool)


def test_impossible_folds_are_refused_before_any_training(synthetic_manifest, tmp_path):
    def config(**train):
        return load_config(write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path, train=train))

    # 120 rows of 5 classes in the synthetic pool
    with pytest.raises(
        ConfigError, match=r"select_folds=100: class '.*' has only \d+ row\(s\) in the pooled"
    ):
        build_plan(config(select_folds=100))
    with pytest.raises(ConfigError, match="train.select_folds=1: use 0"):
        config(select_folds=1)
    with pytest.raises(ConfigError, match="sequence and fine-tuning regimes cannot"):
        load_config(
            write_config(
                tmp_path / "s.yaml",
                synthetic_manifest,
                tmp_path,
                model={"regime": "sequence"},
                train={"select_folds": 3},
            )
        )
    plan = build_plan(config(select_folds=3))
    for space, fuse in ((None, 0), (load_space(str(SPACE)), 1)):  # `uml-ray train`; --fuse 1
        with pytest.raises(ConfigError, match="train.select_folds=3 trains each config's 3 fold models"):
            check_folds_fuse(plan, space, fuse)
    check_folds_fuse(plan, load_space(str(SPACE)), 16)


def stepped(plan, tables: dict, steps: int) -> list[dict]:
    """Every stacked member's weights after ``steps`` fused steps of MEMBERS over ``tables``."""
    state = rng_state()
    with contextlib.ExitStack() as closing:
        regime = Fused(plan, MEMBERS, LocalContext(plan, tables=tables), closing)
        for step in range(steps):
            regime.step(step)
        weights = [regime.model.member_state_dict(m) for m in range(regime.model.members)]
    set_rng_state(state)
    return weights


def test_a_fold_member_never_depends_on_its_held_out_rows(plan):
    target = plan.dataset.target
    train, val = split_tables(plan)
    pool = pool_table(train, val)
    held_out = set(fold_split(pool, FOLDS, 0)[1][1].column(ID).to_pylist())  # fold 1's rows

    def perturbed(table):  # fold 1's rows get other features (labels and ids stay)
        dim = plan.dataset.manifest.modalities[target].dim
        features = table_to_numpy(table, "vector", dim)[0].copy()
        rows = np.array([i in held_out for i in table.column(ID).to_pylist()])
        features[rows] = -3.0 * features[rows] + 7.0
        column = vector_array(features, dim, layout_of(table.schema.field(FEATURES).type))
        return table.set_column(table.schema.get_field_index(FEATURES), FEATURES, column)

    tables = {f"{target}.train": train, f"{target}.val": val}
    changed = {name: perturbed(table) for name, table in tables.items()}
    assert any(not t.equals(tables[n]) for n, t in changed.items())
    before, after = stepped(plan, tables, 60), stepped(plan, changed, 60)
    configs = len(MEMBERS)
    for m, (one, other) in enumerate(zip(before, after)):
        same = all(torch.equal(one[name], other[name]) for name in one)
        assert same == (m // configs == 1), m  # fold 1's members bit-identical, the others moved


def test_fold_members_equal_their_configs_trained_alone_on_their_folds(plan):
    target = plan.dataset.target
    pool = pool_table(*split_tables(plan))
    splits = fold_split(pool, FOLDS, 0)
    size = min([plan.cfg.train.batch_size] + [len(t) for t, _ in splits])
    fused = LocalContext(plan)
    train_fused(plan, MEMBERS, fused)
    for c, overrides in enumerate(MEMBERS):
        alone = []
        for fold_train, fold_val in splits:
            member_plan = plan.with_params({**overrides, "train.select_folds": 0, "train.batch_size": size})
            ctx = LocalContext(member_plan, tables={f"{target}.train": fold_train, f"{target}.val": fold_val})
            train_supervised(member_plan, ctx)
            alone.append({r["step"]: r for r in ctx.reports})
        for report in fused.reports:
            member, step = report["members"][c], report["step"]
            assert member["val_rows"] == len(pool)
            folds = [runs[step] for runs in alone]
            rows = [len(v) for _, v in splits]
            # the config's val numbers pool its folds' held-out rows; its train loss is their mean
            pooled_acc = sum(f["val_acc"] * n for f, n in zip(folds, rows)) / len(pool)
            pooled_loss = sum(f["val_loss"] * n for f, n in zip(folds, rows)) / len(pool)
            assert member["val_acc"] == pytest.approx(pooled_acc, abs=1e-6), (c, step)
            assert member["val_loss"] == pytest.approx(pooled_loss, abs=1e-4), (c, step)
            assert member["train_loss"] == pytest.approx(np.mean([f["train_loss"] for f in folds]), abs=1e-4)
        final = fused.reports[-1]["members"][c]
        assert final["completed"] == 1 and 0.0 < final["test_acc"] <= 1.0
        assert final["test_acc"] == pytest.approx(np.mean([final[f"test_acc_fold{f}"] for f in range(FOLDS)]))
        best = fused.best["members"][c]
        assert len(best["model"]) == FOLDS and best["step"] == final["best_step"]


def test_refit_trains_on_the_whole_pool_for_the_given_steps(plan):
    config = plan.with_params({**MEMBERS[0], "train.select_folds": 0})
    first, again = refit(config, 60), refit(config, 60)
    assert first == again and first["rows"] == 120 and first["steps"] == 60
    assert 0.0 < first["test_acc"] <= 1.0
    # the same config trained on the train split alone for 60 steps is another model
    with contextlib.ExitStack() as closing:
        regime = Supervised(config, LocalContext(config), closing)
        regime.initialise()
        for step in range(60):
            regime.step(step)
        assert regime.evaluate_test()["test_loss"] != pytest.approx(first["test_loss"], abs=1e-6)


@pytest.mark.slow
def test_tune_with_folds_records_the_refit(ray_session, synthetic_manifest, tmp_path, capsys):
    """A real 6-config sweep with 3-fold selection: the chosen config's refit is on the parent run and
    in the study summary."""
    from mlflow.tracking import MlflowClient

    from uml_ray.cli import main

    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path, train={"select_folds": 3})
    assert main(["tune", str(config), "--space", str(SPACE), "--trials", "6", "--name", "kfold"]) == 0
    out = capsys.readouterr().out
    printed = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert "retrained on all 120 train+val rows" in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("uml_ray.kind") == "sweep")
    metrics = parent.data.metrics
    assert metrics["refit_test_acc"] == pytest.approx(printed["refit_test_acc"])
    assert metrics["refit_steps"] == printed["refit_steps"] and metrics["refit_rows"] == 120
    chosen = parent.data.tags["uml_ray.best.refit_trial"]
    trial = next(
        r
        for r in runs
        if r.data.tags.get("uml_ray.kind") == "trial" and r.data.tags.get("uml_ray.trial_id") == chosen
    )
    assert trial.data.metrics["best_step"] == metrics["refit_steps"] and trial.data.metrics["val_rows"] == 120
    folder = tmp_path / "artifacts"
    client.download_artifacts(parent.info.run_id, "study_summary.json", str(folder))
    study = json.loads((folder / "study_summary.json").read_text())
    assert study["best_trial"] == chosen
    assert study["summary"]["refit_test_acc"] == pytest.approx(metrics["refit_test_acc"])
    # uml-ray best: the refit is shown, and the written config runs with uml-ray train (no fold models)
    output = tmp_path / "best.yaml"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["best", "--tracking-uri", uri, "--experiment", "tests", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    refit_line = (
        f"3-fold selection (sweep 'kfold'): its refit on train+val ({int(metrics['refit_steps'])} steps)"
    )
    assert f"{refit_line} tested at {metrics['refit_test_acc']:.4f}" in out
    best = load_config(str(output))
    assert best.train.select_folds == 0 and best.train.lr > 0
    assert main(["validate", str(output)]) == 0


def test_halved_and_resumed_fold_trial_continues_exactly(plan):
    # halving at validation 1 drops whole configs (all their fold members) on the pooled fold numbers;
    # killed after the 3rd report, the trial resumes from step 40 and replays the rest bit for bit
    from helpers import interrupted_and_resumed

    whole = LocalContext(plan)
    train_fused(plan, MEMBERS, whole, rungs=[1])
    first, second = interrupted_and_resumed(
        plan, lambda plan, ctx: train_fused(plan, MEMBERS, ctx, rungs=[1]), fail_after=3
    )
    assert first.saved["step"] == 40 and len(first.saved["live"]) == 2
    assert first.saved["model"]["head"].shape[0] == 2 * FOLDS  # the survivors' fold members only
    pruned = [m for m in whole.reports[0]["members"] if m["pruned"]]
    kept = [m for m in whole.reports[0]["members"] if not m["pruned"]]
    assert len(pruned) == 1 and all(m["selection_score"] >= pruned[0]["selection_score"] for m in kept)
    assert second.reports == whole.reports[2:]
