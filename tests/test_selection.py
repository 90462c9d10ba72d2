"""The selection statistic: lexicographic (accuracy, then lower val loss) in one number, reported by the
loop, ranked by `uml-ray best` over an MLflow store of tied runs, with the val split's standard error."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write_config

from uml_ray.selection import (
    SCORE,
    VAL_ROWS,
    selection_key,
    selection_score,
    separation,
    standard_error,
)

LOSSES = [0.0, 1e-6, 0.05, 0.3, 1.0, 2.5, 40.0, 1e9, math.inf, math.nan]


@pytest.mark.parametrize("rows", [1, 3, 40, 1000, 10000])
def test_score_is_accuracy_then_lower_loss(rows):
    """Any config with a higher val accuracy scores higher whatever the losses; at equal accuracy the
    lower loss scores higher; the score never reaches the next accuracy step."""
    for correct in range(rows):
        acc, above = correct / rows, (correct + 1) / rows
        for loss in LOSSES:
            low = selection_score(acc, loss, rows)
            assert acc <= low < above
            for other in LOSSES:
                assert selection_score(above, other, rows) > low
        finite = [loss for loss in LOSSES if math.isfinite(loss)]
        scores = [selection_score(acc, loss, rows) for loss in finite]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
        # a diverged loss adds nothing: it ranks after every finite loss at the same accuracy
        assert (
            selection_score(acc, math.nan, rows) == selection_score(acc, math.inf, rows) == acc < scores[-1]
        )


def test_standard_error_and_separation():
    assert standard_error(0.875, 40) == pytest.approx(math.sqrt(0.875 * 0.125 / 40))
    assert standard_error(1.0, 40) == 0.0
    best = {"best_val_acc": 0.875, "best_val_loss": 0.4, VAL_ROWS: 40}
    # one SE is 0.0523: 0.85 (one step below) is within it, 0.8 (three steps) is not
    others = [{"best_val_acc": a} for a in (0.875, 0.875, 0.85, 0.825, 0.8)]
    facts = separation(best, [best, *others])
    assert facts["within_1se"] == 5 and facts["tied_top"] == 3 and facts["completed"] == 6
    assert separation({"best_val_acc": 0.9}, others) is None  # no val rows recorded: no SE


def test_key_falls_back_for_runs_recorded_before_the_score():
    old = {"best_val_acc": 0.9, "best_val_loss": 0.2}
    new = {"best_val_acc": 0.875, "best_val_loss": 0.1, SCORE: selection_score(0.875, 0.1, 40)}
    old_tied = {"best_val_acc": 0.9, "best_val_loss": 0.5}
    ranked = sorted([new, old_tied, old], key=lambda m: selection_key(m, SCORE), reverse=True)
    assert ranked == [old, old_tied, new]


def test_loop_reports_the_score_at_every_validation(synthetic_manifest, tmp_path):
    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan
    from uml_ray.train.context import LocalContext
    from uml_ray.train.loop import train_supervised

    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path, train={"max_steps": 60})
    plan = build_plan(load_config(str(config)))
    ctx = LocalContext(plan)
    final = train_supervised(plan, ctx)
    rows = plan.streams[f"{plan.dataset.target}.val"].rows
    reports = ctx.reports
    assert len(reports) == 3
    for metrics in [*reports, final]:
        assert metrics[VAL_ROWS] == rows
        assert metrics[SCORE] == selection_score(metrics["best_val_acc"], metrics["best_val_loss"], rows)


def _write_run(tracker, trial_id: str, metrics: dict, config_file) -> None:
    tracker.start_trial(trial_id, {"train.lr": 0.01})
    tracker.log_metrics(trial_id, metrics, step=1)
    tracker.end_trial(trial_id, "FINISHED", "finished", {"": str(config_file)})


def test_best_picks_the_lowest_loss_of_the_tied_top_and_says_what_the_split_cannot_tell(tmp_path, capsys):
    """Runs tied on the top val accuracy (40 val rows): `best` ranks them by val loss, whatever order
    they were recorded in, and says the SE and how many configs lie within it."""
    from uml_ray.cli import main
    from uml_ray.tracking.loggers import SweepTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(uri, "ties", "", "tied")
    tracker.start_sweep({})
    config_file = tmp_path / "config.yaml"
    rows = 40
    # (best_val_acc, best_val_loss): three tied at 0.875, the lowest loss recorded neither first nor last
    recorded = [(0.875, 0.61), (0.85, 0.20), (0.875, 0.35), (0.875, 0.48), (0.8, 0.1), (0.825, 0.3)]
    for k, (acc, loss) in enumerate(recorded):
        config_file.write_text(f"train:\n  lr: {0.001 * (k + 1)}\n")
        metrics = {
            "best_val_acc": acc,
            "best_val_loss": loss,
            SCORE: selection_score(acc, loss, rows),
            VAL_ROWS: rows,
            "test_acc": 0.5 + k / 100,
        }
        _write_run(tracker, f"t{k}", metrics, config_file)
    # a run recorded before the score: ranked by its accuracy in the score's place, no SE of its own
    _write_run(tracker, "old", {"best_val_acc": 0.85, "best_val_loss": 0.1, "test_acc": 0.4}, config_file)

    output = tmp_path / "best.yaml"
    argv = ["best", "--experiment", "ties", "--tracking-uri", uri, "--sweep", "tied", "--output", str(output)]
    assert main([*argv, "--top", "7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:7] == ["rank", "run", SCORE, "best_val_acc", "best_val_loss", "val_se", "test_acc"]
    table = [dict(zip(header, line.split())) for line in lines[1:8]]
    # the tied top by loss, then 0.85 (the new run's score above the old run's bare accuracy), ...
    assert [(float(r["best_val_acc"]), float(r["best_val_loss"])) for r in table] == [
        (0.875, 0.35),
        (0.875, 0.48),
        (0.875, 0.61),
        (0.85, 0.2),
        (0.85, 0.1),
        (0.825, 0.3),
        (0.8, 0.1),
    ]
    assert float(table[0]["test_acc"]) == pytest.approx(0.52)  # t2: the tied run with the lowest loss
    se = math.sqrt(0.875 * 0.125 / rows)
    assert float(table[0]["val_se"]) == pytest.approx(se, abs=1e-4)
    assert table[4]["val_se"] == "-"  # the old run recorded no val rows
    # within 1 SE (0.0523) of 0.875: the three tied, both runs at 0.85, and 0.825 (0.05 below)
    assert (
        f"chosen config's val accuracy 0.8750 ± {se:.4f} (1 SE over 40 val rows; 3 of 7 completed configs "
        "tie at it); 6 configs within 1 SE of the best val accuracy: the val split cannot tell them apart"
    ) in lines
    assert "lr: 0.003" in output.read_text()  # t2's config written

    # ranked by accuracy alone, the first recorded of the tie is no longer chosen blindly either:
    # ties still go to the lower loss
    assert main([*argv, "--metric", "best_val_acc", "--top", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["rank", "run", "best_val_acc", "best_val_loss", "val_se"]
    assert lines[1].split()[2:4] == ["0.8750", "0.3500"]


def test_space_default_metric_is_the_selection_score(tmp_path):
    from uml_ray.search.space import METRICS, load_space

    path = tmp_path / "space.yaml"
    path.write_text("params:\n  train.lr: {type: uniform, low: 0.001, high: 0.1}\n")
    assert load_space(str(path)).metric == SCORE
    path.write_text("metric: best_val_acc\nparams:\n  train.lr: {type: uniform, low: 0.001, high: 0.1}\n")
    assert load_space(str(path)).metric == "best_val_acc"
    assert SCORE in METRICS and "best_val_acc" in METRICS


@pytest.mark.slow
def test_sweep_searches_and_summarises_by_the_score(ray_session, synthetic_manifest, tmp_path, capsys):
    """A real 6-trial sweep (TPE + ASHA) on the score: every trial reports it, the summary's pick is the
    completed trial with the highest score, and the SE line is printed."""
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from uml_ray.cli import main

    space = Path(__file__).resolve().parents[1] / "search_spaces" / "supervised_linear_probe.yaml"
    config = write_config(tmp_path / "c.yaml", synthetic_manifest, tmp_path)
    assert main(["tune", str(config), "--space", str(space), "--trials", "6", "--name", "by-score"]) == 0
    out = capsys.readouterr().out
    summary = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    assert "configs within 1 SE of the best val accuracy" in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    completed = [
        r for r in runs if r.data.tags.get("uml_ray.kind") == "trial" and r.info.status == "FINISHED"
    ]
    assert completed and all(SCORE in r.data.metrics and VAL_ROWS in r.data.metrics for r in completed)
    top = max(completed, key=lambda r: r.data.metrics[SCORE])
    assert summary[SCORE] == pytest.approx(top.data.metrics[SCORE])
    assert summary["best_val_acc"] == pytest.approx(top.data.metrics["best_val_acc"])
    parent = next(r for r in runs if r.data.tags.get("uml_ray.kind") == "sweep")
    assert parent.data.metrics["best_selection_score"] == pytest.approx(top.data.metrics[SCORE])
    assert parent.data.metrics["within_1se_configs"] >= parent.data.metrics["tied_top_configs"] >= 1
