"""The search-efficiency benchmark's core on a tiny table: real searchers (uml-ray's CheckedSearcher,
Ray's ASHA, Optuna's Hyperband pruner) replayed on known validation curves, compute charged as they
stop configs, and what each returns checked against the table."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from replayed_searchers import run_grid, run_optuna, run_tune_random, run_umlray  # noqa: E402
from search_replay import Table, config_key, replay_asha, replay_fused  # noqa: E402
from warm_replay import warm_from  # noqa: E402

from uml_ray.selection import selection_key, selection_score  # noqa: E402

GRID = {
    "train.lr": [0.001, 0.003, 0.01, 0.03],
    "train.weight_decay": [0.0, 0.01],
    "train.alpha.text": [0.5, 1.0],
}
VAL_EVERY, VALIDATIONS, VAL_ROWS = 20, 6, 40


def curve_row(params: dict, level: float, rise: float, test: float) -> dict:
    """A config's row: val accuracy climbing to ``level`` at rate ``rise``, loss falling, ``test`` at
    its best-val point."""
    steps = [VAL_EVERY * (v + 1) for v in range(VALIDATIONS)]
    acc = [round(level * (1 - np.exp(-rise * (v + 1))) * VAL_ROWS) / VAL_ROWS for v in range(VALIDATIONS)]
    acc = list(np.maximum.accumulate(acc))
    loss = [2.0 / (1 + v) + (1 - level) for v in range(VALIDATIONS)]
    return {
        "params": params,
        "val_steps": steps,
        "best_val_acc": acc,
        "best_val_loss": loss,
        "selection_score": [selection_score(a, lo, VAL_ROWS) for a, lo in zip(acc, loss)],
        "steps": steps[-1],
        "completed": 1,
        "test_acc": test,
        "val_rows": VAL_ROWS,
    }


@pytest.fixture
def table() -> Table:
    rng = np.random.default_rng(3)
    rows = []
    for values in itertools.product(*GRID.values()):
        params = dict(zip(GRID, values))
        level = 0.5 + 0.4 * rng.random()
        rows.append(curve_row(params, level, 0.3 + rng.random(), round(level - 0.05 * rng.random(), 4)))
    return Table(rows, seconds_per_step=0.01, trial_overhead_s=1.0)


@pytest.fixture
def case(synthetic_manifest, tmp_path):
    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan
    from uml_ray.search.space import Param, SearchSpace

    config = write_config(tmp_path / "run.yaml", synthetic_manifest, tmp_path)
    space = SearchSpace([Param(k, "choice", values=v) for k, v in GRID.items()], source="tiny grid")
    return build_plan(load_config(config), space), space


def test_the_oracle_is_the_tables_best_and_the_grid_returns_its_val_selected_config(table, case):
    plan, space = case
    assert table.oracle == max(row["test_acc"] for row in table.rows)
    ledger = run_grid(table, plan, space, table.grid_steps)
    steps, wall, test, params = ledger.events[-1]
    assert steps == table.grid_steps == len(table.rows) * VAL_EVERY * VALIDATIONS
    assert params == table.selected()["params"] and test == table.selected()["test_acc"]
    # the 16 configs share one fusion group: one fused trial, charged its steps and one overhead
    assert ledger.trials == 1 and wall == pytest.approx(steps * 0.01 + 1.0)
    assert test <= table.oracle


def test_a_pruned_config_pays_up_to_its_rung(table):
    from ray.tune.schedulers import ASHAScheduler

    from uml_ray.train.skeleton import Halving

    rows = sorted(table.rows, key=lambda r: r["best_val_acc"][0], reverse=True)[:4]
    steps, results = replay_fused(rows, Halving([1, 2, 4], 2))
    stopped = [r["step"] for r in results if r.get("pruned")]
    finished = [r for r in results if r.get("completed")]
    assert len(finished) == 1 and sorted(stopped) == [20, 20, 40]
    assert steps == 20 + 20 + 40 + 120
    asha = ASHAScheduler(
        time_attr="training_iteration", metric="selection_score", mode="max", max_t=VALIDATIONS
    )
    best, worst = (
        max(table.rows, key=lambda r: r["selection_score"][0]),
        min(table.rows, key=lambda r: r["selection_score"][0]),
    )
    assert replay_asha(best, asha, "a")[0] == 120  # the first trial meets no cutoff
    paid, result = replay_asha(worst, asha, "b")
    assert paid == 20 and result["pruned"] == 1 and "test_acc" not in result


def test_searchers_return_their_best_completed_config_within_budget(table, case):
    plan, space = case
    budget = table.grid_steps
    for ledger in (
        run_umlray(table, plan, space, "tpe", 0, budget),
        run_umlray(table, plan, space, "random", 1, budget),
        run_optuna(table, GRID, 0, budget),
        run_tune_random(table, space, 0, budget),
    ):
        assert ledger.events and all(test <= table.oracle for _, _, test, _ in ledger.events)
        best = max(
            ledger.completed,
            key=lambda row: selection_key(
                {
                    "selection_score": row["selection_score"][-1],
                    "best_val_acc": row["best_val_acc"][-1],
                    "best_val_loss": row["best_val_loss"][-1],
                },
                "selection_score",
            ),
        )
        assert ledger.events[-1][3] == best["params"]
        # every config completed was paid in full; the rest of the steps went to pruned configs
        assert ledger.steps >= sum(row["steps"] for row in ledger.completed)
        assert ledger.steps < budget + 120 * 16
    # uml-ray's sweep never trains a config twice and ends when the space is spent
    tpe = run_umlray(table, plan, space, "tpe", 0, budget)
    keys = [config_key(row["params"]) for row in tpe.completed]
    assert len(keys) == len(set(keys)) and tpe.steps < budget


def test_warm_start_enqueues_the_sources_best_configs_first(table, case):
    import optuna

    plan, space = case
    source = run_umlray(table, plan, space, "tpe", 7, table.grid_steps)
    # one fused trial of the 16 configs, halved at validations 1, 2 and 4: two finish
    assert len(source.completed) == 2
    study = optuna.create_study(direction="maximize")
    warm_from(source, top_k=2)(study, space)
    distributions = {k: optuna.distributions.CategoricalDistribution(v) for k, v in GRID.items()}
    asked = [study.ask(distributions).params for _ in range(2)]
    ranked = sorted(
        source.completed, key=lambda r: (r["selection_score"][-1], r["best_val_acc"][-1]), reverse=True
    )
    assert asked == [row["params"] for row in ranked]
