"""Search: spaces checked before launch, a real Tune+Optuna+ASHA sweep in MLflow, best configs, resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_config
from helpers import best_config

from uml_ray.cli import main

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "supervised_linear_probe.yaml"


def write_space(path: Path, params: dict, **extra) -> Path:
    path.write_text(yaml.safe_dump({"recipe": "supervised", "params": params, **extra}))
    return path


@pytest.mark.parametrize(
    "params, message",
    [
        (
            {"train.lr": {"type": "loguniform", "low": 0.1, "high": 0.001}},
            "low=0.1 is greater than high=0.001; swap them",
        ),
        (
            {"train.lr": {"type": "loguniform", "low": 0.0, "high": 0.1}},
            "a log range must be strictly positive, got low=0.0",
        ),
        (
            {"train.weight_decay": {"type": "choice", "values": []}},
            "a choice needs a non-empty list 'values'",
        ),
        (
            {"train.batch_size": {"type": "uniform", "low": "a", "high": 64}},
            "params.train.batch_size.low: expected a number, got 'a'",
        ),
        (
            {"train.lr": {"type": "int", "low": 1, "high": 5}},
            "type int needs an integer field; 'train.lr' is a float",
        ),
        (
            {"model.head_init": {"type": "uniform", "low": 0, "high": 1}},
            "'model.head_init' is a str field; use type: choice",
        ),
        ({"train.lrate": {"type": "uniform", "low": 0.1, "high": 0.2}}, "unknown config key 'train.lrate'"),
        (
            {"train.lr": {"type": "normal", "low": 0.1, "high": 0.2}},
            "type 'normal' is not one of ['loguniform', 'uniform', 'int', 'choice']",
        ),
        (
            {"train.alpha.audio": {"type": "uniform", "low": 0, "high": 1}},
            "'audio' is not an auxiliary modality; choose from ['text']",
        ),
        (
            {"model.head_init": {"type": "choice", "values": ["random", "clip"]}},
            "value 'clip' is invalid for the config",
        ),
        (
            {"train.lr": {"type": "uniform", "low": -1.0, "high": 0.1}},
            "value -1.0 is invalid for the config: train.lr: -1.0 is out of range",
        ),
    ],
)
def test_bad_space_rejected_before_launch(synthetic_manifest, tmp_path, capsys, params, message):
    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path)
    space = write_space(tmp_path / "space.yaml", params)
    code = main(["tune", str(config), "--space", str(space), "--trials", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and str(space) in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing launched


def test_duplicate_space_key_rejected(synthetic_manifest, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path)
    space = tmp_path / "dup.yaml"
    space.write_text(
        "params:\n  train.lr: {type: uniform, low: 0.1, high: 0.2}\n"
        "  train.lr: {type: uniform, low: 0.3, high: 0.4}\n"
    )
    assert main(["tune", str(config), "--space", str(space)]) == 2
    assert "duplicate key 'train.lr'" in capsys.readouterr().err


def mlflow_runs(workdir: Path, experiment="tests"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client, ([] if found is None else client.search_runs([found.experiment_id], max_results=1000))


@pytest.mark.slow
def test_sweep_tracks_trials_and_best_config_reproduces(
    ray_session, synthetic_manifest, tmp_path, capsys, monkeypatch
):
    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path)
    trials = 6
    # the manifest given relative to the working folder, as users type it on the command line
    monkeypatch.chdir(Path(synthetic_manifest).parent)
    assert (
        main(
            [
                "tune",
                str(config),
                f"data.manifest={Path(synthetic_manifest).name}",
                "--space",
                str(SPACE),
                "--trials",
                str(trials),
                "--name",
                "sweep-a",
            ]
        )
        == 0
    )
    summary = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])

    client, runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("uml_ray.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("uml_ray.kind") == "trial"]
    assert len(parents) == 1 and len(children) == trials
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert len({c.data.tags["uml_ray.trial_id"] for c in children}) == trials
    outcomes = [c.data.tags["uml_ray.outcome"] for c in children]
    assert "pruned" in outcomes, f"ASHA stopped no trial: {outcomes}"
    assert all(
        c.info.status == ("KILLED" if c.data.tags["uml_ray.outcome"] == "pruned" else "FINISHED")
        for c in children
    )
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_acc")]
        assert steps == sorted(steps) and steps[0] == 20
        # a finished trial validated at every val_every step; a pruned one stopped before the end
        if child.data.tags["uml_ray.outcome"] == "finished":
            assert steps == [20, 40, 60, 80, 100, 120]
        else:
            assert len(steps) < 6
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "optimization_history.png",
        "param_importances.png",
        "val_acc_vs_alpha.png",
        "study_summary.json",
    } <= artifacts
    assert parent.data.metrics["trials"] == trials and parent.data.metrics["pruned_trials"] >= 1

    best_yaml = tmp_path / "best.yaml"
    assert best_config(tmp_path, "sweep-a", best_yaml) == 0
    table = capsys.readouterr().out
    assert "train.alpha.text" in table and "best_val_acc" in table
    best = yaml.safe_load(best_yaml.read_text())
    for key, value in summary["best_config"].items():
        section, field, *rest = key.split(".")
        got = best[section][field][rest[0]] if rest else best[section][field]
        assert got == pytest.approx(value), key
    monkeypatch.chdir(tmp_path)  # the best config runs as is from another folder
    assert main(["train", str(best_yaml), "--name", "reproduce"]) == 0
    reproduced = json.loads(
        [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1]
    )
    # same seed, same data order: the retrained best matches the sweep's figure (tolerance 0.02)
    assert reproduced["best_val_acc"] == pytest.approx(summary["best_val_acc"], abs=0.02)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stopped_torchtrainer_trials_free_their_workers(ray_session, synthetic_manifest, tmp_path, capsys):
    """ASHA stops trials whose TorchTrainer is still running (here every trial, at max_t=1): each
    stopped trial's worker placement group must go, or the next trial waits for its CPUs for ever."""
    from ray.util import placement_group_table

    config = write_config(
        tmp_path / "c.yaml",
        synthetic_manifest,
        tmp_path,
        resources={"trainer": "ray_train"},
        train={"max_steps": 8, "warmup_steps": 1, "val_every": 8},
    )
    assert (
        main(
            [
                "tune",
                str(config),
                "--space",
                str(SPACE),
                "--trials",
                "2",
                "--name",
                "sweep-t",
                "--concurrency",
                "1",
            ]
        )
        == 0
    )
    _, runs = mlflow_runs(tmp_path)
    children = [r for r in runs if r.data.tags.get("uml_ray.kind") == "trial"]
    assert len(children) == 2 and all(r.data.metrics["step"] == 8 for r in children)

    deadline = time.time() + 60
    while (
        left := [g for g in placement_group_table().values() if g["state"] != "REMOVED"]
    ) and time.time() < deadline:
        time.sleep(1)
    assert left == [], f"placement groups left behind: {left}"
