"""Sweeps: fused trials (one MLflow child run and one Optuna trial per member), grid and random
modes, no config trained twice, invalid sampled combinations resampled, trial failures told apart."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import write_config
from helpers import best_config, drain

from uml_ray.cli import main
from uml_ray.config import load_config
from uml_ray.driver.plan import build_plan
from uml_ray.driver.searcher import CheckedSearcher, grid_members, tune_space
from uml_ray.driver.sweep import fused_rungs
from uml_ray.driver.trial import check_sample
from uml_ray.search.space import load_space


def space_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def written_space(folder: Path, text: str):
    """The search space of YAML ``text``, written to ``folder``/s.yaml and loaded."""
    return load_space(space_file(folder / "s.yaml", text))


def optuna_searcher(plan, space, trials, fuse, max_concurrent=0):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    inner = OptunaSearch(
        space=None, sampler=optuna.samplers.TPESampler(seed=0), metric="best_val_acc", mode="max"
    )
    limit = min(trials, space.size() or trials)
    searcher = CheckedSearcher(inner, plan, "fixed", "best_val_acc", limit, fuse, max_concurrent)
    searcher.set_search_properties("best_val_acc", "max", tune_space(space))
    return searcher, inner


def configs_handed(plan, space, trials: int) -> list:
    """The configs a one-config-per-trial searcher over ``space`` hands out for up to ``trials`` trials."""
    searcher, _ = optuna_searcher(plan, space, trials=trials, fuse=1)
    return drain(searcher, trials, lambda c: c["train.lr"])


@pytest.fixture
def plan(synthetic_manifest, tmp_path):
    return build_plan(load_config(write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path)))


def test_fused_searcher_tells_optuna_every_member(plan, tmp_path):
    space = written_space(
        tmp_path,
        "params:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}\n"
        "  train.alpha.text: {type: uniform, low: 0.1, high: 1.5}\n",
    )
    searcher, inner = optuna_searcher(plan, space, trials=12, fuse=4)
    handed = drain(searcher, 10, lambda m: round(m["train.lr"], 6))
    assert [len(c["members"]) for c in handed] == [4, 4, 4]  # 12 configs, then finished
    study = inner._ot_study
    told = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(told) == 12  # one Optuna trial per member, each with its own value
    assert sorted(t.value for t in told) == sorted(
        round(m["train.lr"], 6) for c in handed for m in c["members"]
    )


def test_restored_searcher_hands_a_trial_tune_never_held_to_the_next_trial(plan, tmp_path):
    """A driver killed between Tune's trial table and the searcher's state: the restored searcher holds
    a live trial Tune does not. It must not count it against the concurrency limit for ever (the
    resumed sweep would wait on it), and its config, still open in Optuna, goes to the next trial."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial

    space = load_space(
        space_file(
            tmp_path / "s.yaml", "params:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}\n"
        )
    )
    searcher, _ = optuna_searcher(plan, space, trials=4, fuse=1, max_concurrent=1)
    first = searcher.suggest("t0")
    searcher.on_trial_complete("t0", result={"best_val_acc": 0.5})
    ghost = searcher.suggest("t1")
    assert searcher.suggest("t2") is None  # one live trial at a time
    folder = tmp_path / "snapshot"
    folder.mkdir()
    searcher.save_to_dir(str(folder), session_str="s")
    # Tune's table as the killed driver last wrote it: t0 ended, t1 never recorded
    held = Trial("trial", config=first, trial_id="t0", stub=True)
    held.set_status(Trial.TERMINATED)
    held.run_metadata.last_result = {"best_val_acc": 0.5}
    (folder / TuneController.CKPT_FILE_TMPL.format("s")).write_text(
        json.dumps({"trial_data": [list(held.get_json_state())]})
    )

    restored, _ = optuna_searcher(plan, space, trials=4, fuse=1, max_concurrent=1)
    restored.restore_from_dir(str(folder))
    assert restored.suggest("t3") == ghost  # handed again, not lost and not resampled
    assert restored.suggest("t4") is None  # t3 is live
    restored.on_trial_complete("t3", result={"best_val_acc": 0.7})
    fresh = restored.suggest("t4")
    assert fresh is not None and fresh not in (first, ghost)
    study = restored.inner._ot_study
    assert sorted(t.value for t in study.trials if t.state.name == "COMPLETE") == [0.5, 0.7]
    assert len(study.trials) == 3  # first, ghost and fresh: the ghost's config was not sampled again
    (ghost_trial,) = [t for t in study.trials if t.params == ghost]
    assert (ghost_trial.state.name, ghost_trial.value) == ("COMPLETE", 0.7)  # completed by t3, not abandoned


def test_choice_space_is_never_trained_twice_and_invalid_combinations_are_resampled(plan, tmp_path):
    # 2 x 3 points, of which the three with warmup 500 >= max_steps 120 are invalid: 3 valid points in all
    space = written_space(
        tmp_path,
        "params:\n  train.warmup_steps: {type: choice, values: [5, 500]}\n"
        "  train.lr: {type: choice, values: [0.001, 0.01, 0.1]}\n",
    )
    handed = configs_handed(plan, space, 10)
    valid = [{"train.warmup_steps": 5, "train.lr": lr} for lr in (0.001, 0.01, 0.1)]
    # every valid point handed exactly once, no invalid one
    assert sorted(json.dumps(c, sort_keys=True) for c in handed) == sorted(
        json.dumps(c, sort_keys=True) for c in valid
    )


def test_grid_points_grouped_into_fusable_trials(plan, tmp_path):
    space = written_space(
        tmp_path,
        "searcher: grid\nseeds: [0, 1]\nparams:\n"
        "  train.lr: {type: choice, values: [0.001, 0.01]}\n"
        "  train.batch_size: {type: choice, values: [16, 32]}\n",
    )
    groups = grid_members(space, plan, fuse=16)
    points = [json.dumps(m, sort_keys=True) for g in groups for m in g]
    assert len(points) == len(set(points)) == 8
    # batch size and seed are structural: four fused trials of the two lrs each
    assert sorted(len(g) for g in groups) == [2, 2, 2, 2]
    assert all(len({(m["train.batch_size"], m["train.seed"]) for m in g}) == 1 for g in groups)


def test_fused_sweep_lands_one_child_run_per_member(ray_session, synthetic_manifest, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    config = write_config(
        tmp_path / "c.yaml", synthetic_manifest, tmp_path, train={"max_steps": 80, "val_every": 10}
    )
    space = space_file(
        tmp_path / "s.yaml",
        "params:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}\n"
        "  train.alpha.text: {type: uniform, low: 0.0, high: 1.5}\n",
    )
    assert (
        main(["tune", str(config), "--space", str(space), "--trials", "8", "--fuse", "4", "--name", "fused"])
        == 0
    )
    summary = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    assert summary["trials"] == 8

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    children = [r for r in runs if r.data.tags.get("uml_ray.kind") == "trial"]
    assert len(children) == 8 and len({r.data.tags["uml_ray.trial_id"] for r in children}) == 8
    assert len({r.data.tags["uml_ray.fused_trial"] for r in children}) == 2
    # in-trial halving at ASHA's rungs (validations 2 and 4 of 8): 4 -> 2 -> 1 finish per trial
    assert fused_rungs(build_plan(load_config(config))) == [2, 4]
    outcomes = sorted(r.data.tags["uml_ray.outcome"] for r in children)
    assert outcomes.count("finished") == 2 and outcomes.count("pruned") == 6
    for child in children:
        history = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert history[:2] == [10, 20] and history == sorted(history)
        assert float(child.data.params["train.lr"]) == pytest.approx(
            json.loads(child.data.tags["uml_ray.sampled"])["train.lr"]
        )
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)} | {
            a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")
        }
        assert {"config.yaml", "checkpoint/best.pt"} <= artifacts
    finished = [r for r in children if r.data.tags["uml_ray.outcome"] == "finished"]
    assert max(r.data.metrics["best_val_acc"] for r in finished) == pytest.approx(summary["best_val_acc"])
    assert best_config(tmp_path, "fused", tmp_path / "best.yaml") == 0
    # MLflow holds each member's best-val weights: the ended trials' Tune checkpoints are gone, their
    # results stay
    trial_folders = [folder for folder in (tmp_path / "runs" / "fused").iterdir() if folder.is_dir()]
    assert len(trial_folders) == 2 and all((folder / "result.json").is_file() for folder in trial_folders)
    assert list((tmp_path / "runs" / "fused").glob("*/checkpoint_*")) == []


def test_a_crashing_trial_is_not_retried_and_exits_1_with_its_traceback(
    ray_session, synthetic_manifest, tmp_path, capsys, monkeypatch
):
    import dataclasses

    from uml_ray.driver import sweep

    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path, resources={"max_failures": 2})
    original = sweep.load_tables

    def broken_tables(
        plan,
    ):  # a share that is not a table: the trial's loop crashes on it (a bug, not a lost node)
        plan = original(plan)
        return dataclasses.replace(
            plan, tables={**plan.tables, "image.train": ray_session.put("not a table")}
        )

    monkeypatch.setattr(sweep, "load_tables", broken_tables)
    assert main(["train", str(config), "--name", "crash"]) == 1
    err = capsys.readouterr().err
    assert "trial crashed: 1 of 1 trial(s) of 'crash' failed" in err
    assert re.search(r"trial \w+: \w+Error: ", err), err  # the exception's type and message, not "crashed"
    traceback_file = Path(err.split("(traceback: ")[1].split(")")[0])
    assert "Traceback" in traceback_file.read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    assert run.info.status == "FAILED"
    # not retried: the trial reported its error once, as its only result
    assert len(client.get_metric_history(run.info.run_id, "training_iteration")) <= 1


def test_sampled_project_target_off_is_checked_like_the_base_config(synthetic_manifest, tmp_path):
    """project_target=false where the target's width is not the shared width would be trained as
    project_target=true: a sampled config is refused and resampled, as the base config is refused."""
    from uml_ray.errors import ConfigError

    plan = build_plan(
        load_config(write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path, model={"shared_dim": 16}))
    )
    with pytest.raises(ConfigError, match="model.project_target=false"):
        check_sample(plan, "fixed", {"model.project_target": False})
    check_sample(
        plan, "fixed", {"model.project_target": False, "model.shared_dim": 32}
    )  # the target's own width
    space = written_space(
        tmp_path,
        "params:\n  model.project_target: {type: choice, values: [true, false]}\n"
        "  train.lr: {type: choice, values: [0.001, 0.01, 0.1]}\n",
    )
    handed = configs_handed(plan, space, 6)
    assert len(handed) == 3 and all(c["model.project_target"] is True for c in handed)
