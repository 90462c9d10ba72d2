"""Warm start from MLflow history (``uml-ray tune --warm-start``): the plan (fit, skip, clip, top-k by the
selection key), the searcher that holds told trials and never trains them, a resumed searcher that tells
them once, and real sweeps: same task (told), another seed (transferred), refusals before any Ray work."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from conftest import write_config
from helpers import drain

from uml_ray.cli import main
from uml_ray.config import load_config
from uml_ray.driver.plan import build_plan
from uml_ray.driver.warm_start import (
    WarmPlan,
    WarmRecord,
    apply_warm_plan,
    merge_plans,
    plan_warm_start,
    space_distributions,
)
from uml_ray.errors import ConfigError
from uml_ray.search.space import load_space

CONTINUOUS = (
    "params:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}\n"
    "  train.batch_size: {type: int, low: 8, high: 32}\n"
    "  model.head_init: {type: choice, values: [random, text]}\n"
)
# A's grid: 3 lrs x 2 alphas; B's space adds a third alpha, so 3 points are left to train
GRID_A = (
    "searcher: grid\nparams:\n  train.lr: {type: choice, values: [0.003, 0.01, 0.03]}\n"
    "  train.alpha.text: {type: choice, values: [0.5, 1.0]}\n"
)
CHOICES_B = (
    "searcher: tpe\nparams:\n  train.lr: {type: choice, values: [0.003, 0.01, 0.03]}\n"
    "  train.alpha.text: {type: choice, values: [0.5, 1.0, 1.5]}\n"
)


def space_from(folder: Path, text: str, name: str = "s.yaml"):
    path = folder / name
    path.write_text(text)
    return load_space(path)


def record(score, source="exp:a", acc=None, loss=None, **params):
    metrics = {k: v for k, v in (("best_val_acc", acc), ("best_val_loss", loss)) if v is not None}
    return WarmRecord({k.replace("__", "."): v for k, v in params.items()}, score, source, metrics)


def test_same_task_tells_every_fitting_config_best_first_and_skips_the_rest(tmp_path):
    space = space_from(tmp_path, CONTINUOUS)
    fits = {"train__lr": 0.01, "train__batch_size": 16, "model__head_init": "text"}
    records = [
        record(0.70, **fits),
        record(0.80, **{**fits, "train__lr": 0.5}),  # lr above the range
        record(0.90, **{**fits, "train__batch_size": 16.5}),  # not an int
        record(0.85, **{**fits, "model__head_init": "clip"}),  # not a choice
        record(0.60, train__lr=0.02, train__batch_size=8),  # head_init missing
        record(0.75, **{**fits, "train__lr": 0.002}),
        record(0.75, **{**fits, "train__lr": 0.004}, acc=0.9),  # same score, higher val acc: ranks first
        record(0.65, **fits),  # the same config again
    ]
    plan = plan_warm_start(records, space, same_task=True)
    assert [(p["train.lr"], score) for p, score in plan.told] == [(0.004, 0.75), (0.002, 0.75), (0.01, 0.70)]
    assert plan.told[0][0] == {"train.lr": 0.004, "train.batch_size": 16, "model.head_init": "text"}
    assert plan.enqueued == [] and plan.skipped == 5


def test_transfer_enqueues_the_top_k_clipped_into_the_space(tmp_path):
    space = space_from(tmp_path, CONTINUOUS)
    records = [
        record(0.9, train__lr=0.5, train__batch_size=40.4, model__head_init="text"),
        record(0.8, train__lr=0.0001, train__batch_size=9.6, model__head_init="clip"),
        record(0.7, train__lr=0.1, train__batch_size=32, model__head_init="text"),  # the first, clipped
        record(0.6, train__lr=0.02, train__batch_size=12, model__head_init="random"),
        record(0.5, train__lr=0.03, train__batch_size=12, model__head_init="random"),  # below the top 3
        record(0.95, other__key=1),  # holds no searched key
    ]
    plan = plan_warm_start(records, space, same_task=False, top_k=3)
    assert plan.enqueued == [
        {"train.lr": 0.1, "train.batch_size": 32, "model.head_init": "text"},
        {"train.lr": 0.001, "train.batch_size": 10},  # the choice it lacks is left to the searcher
        {"train.lr": 0.02, "train.batch_size": 12, "model.head_init": "random"},
    ]
    assert plan.told == [] and plan.skipped == 2


def test_a_source_with_no_searched_key_or_no_fitting_config_is_refused(tmp_path):
    space = space_from(tmp_path, CONTINUOUS)
    with pytest.raises(ConfigError, match=r"exp:a: its configs set none of the searched keys"):
        plan_warm_start([record(0.9, train__weight_decay=0.1)], space, same_task=True)
    with pytest.raises(ConfigError, match=r"exp:a: none of its 1 configs fits the space"):
        plan_warm_start([record(0.9, train__lr=0.5)], space, same_task=True)


def test_merged_sources_tell_a_config_once_and_do_not_enqueue_a_told_one():
    a = {"train.lr": 0.01}
    b = {"train.lr": 0.02}
    merged = merge_plans([WarmPlan(told=[(a, 0.8)]), WarmPlan(told=[(a, 0.7)], enqueued=[a, b, b])])
    assert merged.told == [(a, 0.8)] and merged.enqueued == [b] and merged.skipped == 3


def test_the_distributions_are_those_ray_gives_optuna(tmp_path):
    from ray.tune.search.optuna import OptunaSearch

    from uml_ray.driver.searcher import tune_space

    space = space_from(
        tmp_path, CONTINUOUS + "  train.warmup_steps: {type: int, low: 1, high: 50, log: true}\n"
    )
    assert space_distributions(space) == OptunaSearch.convert_search_space(tune_space(space))


def test_apply_warm_plan_adds_completed_trials_and_asks_the_enqueued_first(tmp_path):
    import optuna

    space = space_from(tmp_path, CONTINUOUS)
    told = {"train.lr": 0.01, "train.batch_size": 16, "model.head_init": "text"}
    first = {"train.lr": 0.05, "train.batch_size": 20, "model.head_init": "random"}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    distributions = space_distributions(space)
    apply_warm_plan(study, WarmPlan(told=[(told, 0.8)], enqueued=[first]), distributions)
    (done,) = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert (done.params, done.value) == (told, 0.8)
    assert study.ask(distributions).params == first


@pytest.fixture
def plan(synthetic_manifest, tmp_path):
    return build_plan(load_config(write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path)))


def test_the_task_is_the_data_and_the_config_outside_the_space(plan, tmp_path):
    from uml_ray.driver.warm_start import task_difference
    from uml_ray.tracking.store import param_value

    space = space_from(tmp_path, CONTINUOUS)
    base = plan.cfg.flat()
    params = {key: param_value(value) for key, value in base.items()}
    run = {"params": params, "tags": {"uml_ray.data": "abc"}}

    def differs(fingerprint="abc", tags=None, **changed):
        changed = {k.replace("__", "."): v for k, v in changed.items()}
        return task_difference(
            {"params": {**params, **changed}, "tags": tags or run["tags"]}, base, fingerprint, space
        )

    assert differs() == ""
    # a searched key, and fields that change no result, may differ
    assert differs(train__lr="0.5", resources__num_cpus="8", tracking__experiment="other") == ""
    assert differs(train__seed="1") == "train.seed 1 → 0"
    assert differs(resources__num_workers="2") == "resources.num_workers 2 → 1"
    assert differs(fingerprint="new") == (
        f"the data at {base['data.manifest']} changed (fingerprint abc → new)"
    )
    # a run from before the data tag: its manifest path decides
    assert differs(tags={"uml_ray.seed": "0"}) == ""
    assert differs(tags={"uml_ray.seed": "0"}, data__manifest="/elsewhere/m.yaml").startswith(
        "data.manifest /elsewhere/m.yaml → "
    )
    per_trial = space_from(tmp_path, "seed_policy: per_trial\n" + CONTINUOUS, "p.yaml")
    assert (
        task_difference(
            {"params": {**params, "train.seed": "7"}, "tags": run["tags"]}, base, "abc", per_trial
        )
        == ""
    )


def told_of_a(space) -> WarmPlan:
    """A's six grid points told with made-up scores (the searcher only needs them to be distinct)."""
    points = [
        {"train.lr": lr, "train.alpha.text": alpha} for lr in (0.003, 0.01, 0.03) for alpha in (0.5, 1.0)
    ]
    return WarmPlan(told=[(p, 0.5 + i / 100) for i, p in enumerate(points)])


def told_trials(study) -> list:
    from uml_ray.driver.warm_start import TOLD_ATTR

    return [t for t in study.trials if t.user_attrs.get(TOLD_ATTR)]


def test_a_warm_searcher_holds_the_told_trials_and_trains_none_of_them(plan, tmp_path):
    from uml_ray.driver.searcher import build_searcher, tune_space

    space = space_from(tmp_path, CHOICES_B)
    warm = told_of_a(space)
    searcher = build_searcher(space, plan, "fixed", trials=9, fuse=1, concurrency=0, warm=warm)
    searcher.set_search_properties(space.metric, "max", tune_space(space))
    handed = drain(searcher, 20, lambda config: 0.9, space.metric)
    # the space's 9 points less the 6 told: exactly the three alpha-1.5 points, then finished
    assert sorted(c["train.lr"] for c in handed) == [0.003, 0.01, 0.03]
    assert {c["train.alpha.text"] for c in handed} == {1.5}
    study = searcher.inner._ot_study
    told = sorted((json.dumps(p, sort_keys=True), s) for p, s in warm.told)
    assert sorted((json.dumps(t.params, sort_keys=True), t.value) for t in told_trials(study)) == told
    # TPE proposed told points too: each was told its recorded value and resampled, never handed out
    complete = {json.dumps(t.params, sort_keys=True) for t in study.trials if t.state.name == "COMPLETE"}
    assert len(complete) == 9


def test_a_resumed_warm_searcher_tells_the_trials_once(plan, tmp_path):
    """Tune pickles the searcher into tuner.pkl before the sweep starts and saves its state as it runs;
    a resumed sweep unpickles the first and restores the second. Neither adds the warm trials again."""
    from uml_ray.driver.searcher import build_searcher, tune_space

    space = space_from(tmp_path, CHOICES_B)
    searcher = build_searcher(space, plan, "fixed", 9, 1, 0, warm=told_of_a(space))
    tuner_pkl = pickle.dumps(searcher)
    searcher.set_search_properties(space.metric, "max", tune_space(space))
    assert len(drain(searcher, 2, lambda config: 0.9, space.metric)) == 2
    folder = tmp_path / "state"
    folder.mkdir()
    searcher.save_to_dir(str(folder), session_str="s")

    never_saved = pickle.loads(tuner_pkl)  # a driver killed before the searcher's first save
    never_saved.set_search_properties(space.metric, "max", tune_space(space))
    assert len(told_trials(never_saved.inner._ot_study)) == 6

    restored = pickle.loads(tuner_pkl)
    restored.set_search_properties(space.metric, "max", tune_space(space))
    restored.restore_from_dir(str(folder))
    assert len(told_trials(restored.inner._ot_study)) == 6
    assert restored.handed == searcher.handed  # and the two trained configs came back
    handed = drain(restored, 20, lambda config: 0.9, space.metric)
    assert len(handed) == 1 and handed[0]["train.alpha.text"] == 1.5  # the last point left


def test_a_transferred_searcher_hands_the_enqueued_configs_first(plan, tmp_path):
    from uml_ray.driver.searcher import build_searcher, tune_space

    space = space_from(
        tmp_path,
        "params:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}\n"
        "  train.alpha.text: {type: uniform, low: 0.0, high: 1.5}\n",
    )
    first = [{"train.lr": 0.01, "train.alpha.text": 0.5}, {"train.lr": 0.003, "train.alpha.text": 1.0}]
    searcher = build_searcher(space, plan, "fixed", 5, 1, 0, warm=WarmPlan(enqueued=first))
    searcher.set_search_properties(space.metric, "max", tune_space(space))
    handed = drain(searcher, 5, lambda config: 0.9, space.metric)
    assert handed[:2] == first and len(handed) == 5 and all(c not in first for c in handed[2:])


# --- real sweeps: A on the synthetic case, then B warm-started from it ---------------------------


def runs_of(workdir: Path, sweep: str | None = None, kind: str | None = None) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    found = client.get_experiment_by_name("tests")
    runs = [] if found is None else client.search_runs([found.experiment_id], max_results=1000)
    return [
        r
        for r in runs
        if (sweep is None or r.data.tags.get("uml_ray.sweep") == sweep)
        and (kind is None or r.data.tags.get("uml_ray.kind") == kind)
    ]


def sampled(run) -> dict:
    return json.loads(run.data.tags["uml_ray.sampled"])


def tune(config: Path, space: Path, name: str, *flags: str, overrides: tuple = ()) -> int:
    return main(["tune", str(config), *overrides, "--space", str(space), "--name", name, *flags])


@pytest.fixture(scope="module")
def history(synthetic_manifest, tmp_path_factory):
    """Sweep A: a 6-point grid on the synthetic case, every point trained to the end."""
    import ray

    from uml_ray.cluster import start_local_ray

    if not ray.is_initialized():
        start_local_ray(2)
    workdir = tmp_path_factory.mktemp("warm")
    config = write_config(workdir / "c.yaml", synthetic_manifest, workdir)
    (workdir / "a.yaml").write_text(GRID_A)
    assert tune(config, workdir / "a.yaml", "A") == 0
    return workdir, config


def test_same_task_sweep_holds_the_sources_trials_and_trains_none_of_them(ray_session, history, capsys):
    workdir, config = history
    capsys.readouterr()
    (workdir / "b.yaml").write_text(CHOICES_B)
    assert tune(config, workdir / "b.yaml", "B", "--trials", "9", "--warm-start", "tests:A") == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "warm start" in line]
    assert line == "[uml-ray] warm start: tests:A same-task: told 6 of 6 finished trials, skipped 0"

    a_configs = [sampled(r) for r in runs_of(workdir, "A", "trial")]
    b_configs = [sampled(r) for r in runs_of(workdir, "B", "trial")]
    assert len(a_configs) == 6
    # the 9 points less A's 6: exactly the three alpha-1.5 points, none of A's again
    assert sorted(c["train.lr"] for c in b_configs) == [0.003, 0.01, 0.03]
    assert {c["train.alpha.text"] for c in b_configs} == {1.5}

    (parent,) = runs_of(workdir, "B", "sweep")
    assert json.loads(parent.data.params["warm_start"]) == [
        {
            "source": "tests:A",
            "mode": "same-task",
            "why": "",
            "trials": 6,
            "told": 6,
            "enqueued": 0,
            "skipped": 0,
        }
    ]
    assert (parent.data.params["warm_start.told"], parent.data.params["warm_start.enqueued"]) == ("6", "0")
    # every trial run carries the data's fingerprint, the same for A and B
    assert len({r.data.tags["uml_ray.data"] for r in runs_of(workdir, kind="trial")}) == 1

    # the searcher's saved state: A's six trials completed with their recorded scores
    (state,) = (workdir / "runs" / "B").glob("searcher-state-*.pkl")
    study = pickle.loads(state.read_bytes())["inner"]._ot_study
    recorded = sorted(
        (json.dumps(sampled(r), sort_keys=True), r.data.metrics["selection_score"])
        for r in runs_of(workdir, "A", "trial")
    )
    assert sorted((json.dumps(t.params, sort_keys=True), t.value) for t in told_trials(study)) == recorded

    # resuming it reads no source again (this one names none that exists) and tells nothing twice
    code = tune(config, workdir / "b.yaml", "B", "--resume", "--warm-start", "tests:no-such-sweep")
    assert code == 0 and "keeps the warm start it began with" in capsys.readouterr().out


def test_another_seed_is_a_transfer_whose_first_configs_are_the_sources_best(ray_session, history, capsys):
    from uml_ray.tracking.runs import ranked_runs

    workdir, config = history
    capsys.readouterr()
    (workdir / "t.yaml").write_text(
        "searcher: tpe\nparams:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}\n"
        "  train.alpha.text: {type: uniform, low: 0.25, high: 1.5}\n"
    )
    code = tune(
        config,
        workdir / "t.yaml",
        "T",
        "--trials",
        "4",
        "--warm-start",
        "tests:A",
        "--warm-start-top",
        "2",
        overrides=("train.seed=1",),
    )
    assert code == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "warm start" in line]
    assert line.endswith("tests:A transfer (train.seed 0 → 1): enqueued 2 of 6 finished trials, skipped 0")

    best = ranked_runs(f"sqlite:///{workdir / 'mlflow.db'}", "tests", sweep="A", trials_only=True)
    top = [json.loads(r["tags"]["uml_ray.sampled"]) for r in best[:2]]
    runs = sorted(runs_of(workdir, "T", "trial"), key=lambda r: r.data.tags["uml_ray.trial_id"])
    assert len(runs) == 4
    assert [sampled(r) for r in runs[:2]] == top  # members m0, m1 of the first fused trial
    (parent,) = runs_of(workdir, "T", "sweep")
    (source,) = json.loads(parent.data.params["warm_start"])
    assert (source["mode"], source["why"], source["enqueued"]) == ("transfer", "train.seed 0 → 1", 2)


@pytest.mark.parametrize(
    "space, source, message",
    [
        (
            CHOICES_B,
            "tests:no-such-sweep",
            "--warm-start tests:no-such-sweep: no sweep named 'no-such-sweep'",
        ),
        (CHOICES_B, "nowhere", "--warm-start nowhere: no MLflow experiment named 'nowhere'"),
        (
            "params:\n  train.weight_decay: {type: loguniform, low: 1.0e-4, high: 1.0}\n",
            "tests:A",
            "--warm-start tests:A: its trials searched ['train.alpha.text', 'train.lr'], none of the space's",
        ),
        (
            "params:\n  train.lr: {type: loguniform, low: 0.1, high: 1.0}\n",
            "tests:A",
            "--warm-start tests:A: none of its 6 configs fits the space",
        ),
        (GRID_A, "tests:A", "is a grid, which trains every point once"),
    ],
)
def test_a_source_that_cannot_serve_is_refused_before_any_work(
    ray_session, history, capsys, space, source, message
):
    workdir, config = history
    capsys.readouterr()
    (workdir / "r.yaml").write_text(space)
    before = len(runs_of(workdir))
    assert tune(config, workdir / "r.yaml", "R", "--warm-start", source) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert len(runs_of(workdir)) == before and not (workdir / "runs" / "R").exists()
