"""What the chaos suite relies on, case by case and without Ray: the MLflow tracker after a driver died
(orphan runs continued, ended runs left alone, lost ones closed), its sorting of unreachable-server
errors, and checkpoint reads that fall back or name the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from uml_ray.tracking.loggers import SweepTracker
from uml_ray.tracking.outbox import is_unreachable
from uml_ray.tracking.store import WRITE_HTTP, bounded_http
from uml_ray.tracking.tags import OUTCOME_TAG, SAMPLED_TAG, SEED_TAG, TRIAL_TAG

PARAMS = {"train.lr": 0.01, "train.seed": 0}
SAMPLED = {SAMPLED_TAG: json.dumps({"train.lr": 0.01})}


@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store, made once and copied per test (its schema migrations cost seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").create_experiment("recovery")
    return path


@pytest.fixture(autouse=True)
def store(store_template, tmp_path) -> Path:
    shutil.copyfile(store_template, tmp_path / "mlflow.db")
    return tmp_path / "mlflow.db"


def tracker(tmp_path, sweep="s"):
    """A fresh tracker on the test's SQLite store: each call is a new driver of the same sweep."""
    found = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "recovery", "", sweep)
    found.start_sweep({"p": 1})
    return found


def children(tracker_):
    return tracker_.client.search_runs([tracker_.experiment_id], "tags.`uml_ray.kind` = 'trial'")


def val_steps(tracker_, run_id):
    return [m.step for m in tracker_.client.get_metric_history(run_id, "val_acc")]


def test_resumed_trial_continues_the_run_its_killed_driver_opened(tmp_path):
    """Tune's snapshot missed a trial the killed driver had opened: the re-suggested config (same
    params, same seed) continues that run under its new trial id; nothing is logged twice."""
    first = tracker(tmp_path)
    orphan = first.start_trial("old", PARAMS, SAMPLED)
    first.log_metrics("old", {"val_acc": 0.5, "step": 20}, step=20)

    second = tracker(tmp_path)
    assert second.start_trial("new", PARAMS, SAMPLED) == orphan
    second.log_metrics("new", {"val_acc": 0.5, "step": 20}, step=20)  # replayed from step 0: skipped
    second.log_metrics("new", {"val_acc": 0.6, "step": 40}, step=40)
    (run,) = children(second)
    assert run.data.tags[TRIAL_TAG] == "new" and run.data.tags["uml_ray.continues_trial"] == "old"
    assert run.info.run_name == "s-new" and val_steps(second, orphan) == [20, 40]


def test_run_opened_without_params_is_continued_and_completed(tmp_path):
    """A driver killed between creating a run and logging its params: the run is still found by its
    tags, and gets its params."""
    first = tracker(tmp_path)
    run_id = first.client.create_run(
        first.experiment_id,
        tags={TRIAL_TAG: "old", "uml_ray.sweep": "s", "uml_ray.kind": "trial", SEED_TAG: "0", **SAMPLED},
    ).info.run_id
    second = tracker(tmp_path)
    assert second.start_trial("new", PARAMS, SAMPLED) == run_id
    assert second.client.get_run(run_id).data.params == {"train.lr": "0.01", "train.seed": "0"}


def test_another_seed_or_config_opens_its_own_run(tmp_path):
    first = tracker(tmp_path)
    orphan = first.start_trial("old", PARAMS, SAMPLED)
    second = tracker(tmp_path)
    assert second.start_trial("seed1", {**PARAMS, "train.seed": 1}, SAMPLED) != orphan
    assert second.start_trial("lr", PARAMS, {SAMPLED_TAG: json.dumps({"train.lr": 0.02})}) != orphan
    assert len(children(second)) == 3


def test_trial_that_ended_before_the_resume_is_left_as_recorded(tmp_path):
    """A trial MLflow saw end (finished, pruned) is not reopened: its re-report changes nothing; a failed
    one is reopened, since --resume runs it again."""
    first = tracker(tmp_path)
    done = first.start_trial("done", PARAMS, SAMPLED)
    first.log_metrics("done", {"val_acc": 0.5}, step=20)
    first.end_trial("done", "FINISHED", "finished")
    failed = first.start_trial("failed", {**PARAMS, "train.seed": 1}, SAMPLED)
    first.end_trial("failed", "FAILED", "failed")
    ended_at = first.client.get_run(done).info.end_time

    second = tracker(tmp_path)
    assert second.ended_trials() == {"done"}
    assert second.start_trial("done", PARAMS, SAMPLED) == done
    second.log_metrics("done", {"val_acc": 0.9}, step=40)
    second.end_trial("done", "KILLED", "pruned")
    run = second.client.get_run(done)
    assert (
        run.info.status == "FINISHED"
        and run.info.end_time == ended_at
        and run.data.tags[OUTCOME_TAG] == "finished"
    )
    assert val_steps(second, done) == [20]
    second.start_trial("failed", {**PARAMS, "train.seed": 1}, SAMPLED)
    assert second.client.get_run(failed).info.status == "RUNNING"


def test_fused_trial_ended_only_when_every_member_did(tmp_path):
    first = tracker(tmp_path)
    for k, trial in enumerate(["f1", "f1", "f2", "f2"]):
        first.start_trial(f"{trial}-m{k % 2}", {**PARAMS, "train.seed": k}, {"uml_ray.fused_trial": trial})
    first.end_trial("f1-m0", "FINISHED", "finished")
    first.end_trial("f1-m1", "KILLED", "pruned")
    first.end_trial("f2-m0", "FINISHED", "finished")
    assert tracker(tmp_path).ended_trials() == {"f1"}


def test_runs_of_lost_trials_are_closed_at_the_sweeps_end(tmp_path):
    first = tracker(tmp_path)
    lost = first.start_trial("lost", PARAMS, SAMPLED)
    second = tracker(tmp_path)
    mine = second.start_trial("mine", {**PARAMS, "train.seed": 7}, SAMPLED)
    second.close_lost_trials()
    assert second.client.get_run(lost).info.status == "KILLED"
    assert second.client.get_run(lost).data.tags[OUTCOME_TAG] == "lost"
    assert second.client.get_run(mine).info.status == "RUNNING"

    # the sweep's counts come from the record: the lost trial counts, so the counts sum to every run
    from uml_ray.driver.summary import recorded_outcomes

    second.end_trial("mine", "FINISHED", "finished")
    counts = recorded_outcomes(second)
    assert counts["lost_trials"] == 1 and counts["completed_trials"] == 1
    assert sum(counts.values()) == len(children(second)) == 2


def test_unreachable_server_errors_are_told_apart_from_refused_requests(tmp_path):
    """MLflow raises both as a bare MlflowException: a closed port's (the requests error only in its
    context) is unreachable, a refused filter's is not."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    with bounded_http(), pytest.raises(MlflowException, match="Max retries exceeded") as unreachable:
        MlflowClient("http://127.0.0.1:1").get_experiment_by_name("x")
    assert isinstance(unreachable.value.__context__, requests.exceptions.ConnectionError)
    assert is_unreachable(unreachable.value)
    store = tracker(tmp_path)
    with pytest.raises(MlflowException, match=r"Invalid clause\(s\) in filter string") as refused:
        store.client.search_runs([store.experiment_id], "no such filter")
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    assert not is_unreachable(refused.value)


def test_bounded_http_settings_hold_for_the_calling_context_only():
    """Inside ``bounded_http`` MLflow reads our retry and timeout settings; the environment, other threads
    and the code after the block read MLflow's own."""
    import os
    import threading

    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES as retries
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT as timeout

    environment = dict(os.environ)
    outside = (retries.get(), timeout.get())
    seen = {}
    with bounded_http():
        assert (retries.get(), timeout.get()) == (1, 10)
        other = threading.Thread(target=lambda: seen.update(other=(retries.get(), timeout.get())))
        other.start()
        other.join()
        with bounded_http(WRITE_HTTP):
            assert (retries.get(), timeout.get()) == (2, 30)
        assert (retries.get(), timeout.get()) == (1, 10)
        assert dict(os.environ) == environment
    assert seen["other"] == outside and (retries.get(), timeout.get()) == outside


def test_unreadable_checkpoint_falls_back_to_another_kept_or_names_the_file(tmp_path):
    from ray.train import Checkpoint

    from uml_ray.train.checkpoints import CheckpointError, restore_state

    for n in range(3):
        (tmp_path / f"checkpoint_00000{n}").mkdir()
        torch.save({"step": n}, tmp_path / f"checkpoint_00000{n}" / "state.pt")
        torch.save(
            {"model": {"w": torch.full((2,), float(n))}}, tmp_path / f"checkpoint_00000{n}" / "best.pt"
        )
    newest = tmp_path / "checkpoint_000002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:40])
    # the loop state with its products (best.pt, the one copy of the best weights) beside it
    restored = restore_state(Checkpoint(str(tmp_path / "checkpoint_000002")))
    assert restored["step"] == 1 and torch.equal(restored["best"]["model"]["w"], torch.full((2,), 1.0))
    assert (
        restore_state(Checkpoint(str(tmp_path / "checkpoint_000000")))["step"] == 0
    )  # itself, when it reads
    # an unreadable best.pt is as unreadable a checkpoint as its state.pt
    (tmp_path / "checkpoint_000001" / "best.pt").write_bytes(b"")
    assert restore_state(Checkpoint(str(tmp_path / "checkpoint_000002")))["step"] == 0
    # a checkpoint written before best.pt held the only copy of the best weights needs none
    torch.save({"step": 1, "best_weights": []}, tmp_path / "checkpoint_000001" / "state.pt")
    assert restore_state(Checkpoint(str(tmp_path / "checkpoint_000002"))) == {"step": 1, "best_weights": []}
    for n in (0, 1):
        (tmp_path / f"checkpoint_00000{n}" / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        restore_state(Checkpoint(str(tmp_path / "checkpoint_000002")))
    message = str(error.value)
    assert (
        message.startswith(f"checkpoint file {newest} is unreadable (")
        and "so are the 2 other(s) kept beside it" in message
    )
    assert "\n" not in message and "start it again under a new --name" in message


def test_held_metrics_go_in_one_write_at_a_checkpoint_or_the_trials_end(tmp_path):
    """A sweep trial's validations held (``hold=True``) reach MLflow together: with the next one not held
    (a report carrying a checkpoint), at the trial's end, or when the driver closes; each step once."""
    first = tracker(tmp_path)
    run_id = first.start_trial("t", PARAMS, SAMPLED)
    first.log_metrics("t", {"val_acc": 0.5}, step=20, hold=True)
    first.log_metrics("t", {"val_acc": 0.6}, step=40, hold=True)
    assert val_steps(first, run_id) == []  # held
    first.log_metrics("t", {"val_acc": 0.7}, step=60)  # a checkpoint's report: everything so far
    assert val_steps(first, run_id) == [20, 40, 60]
    first.log_metrics("t", {"val_acc": 0.8}, step=80, hold=True)
    first.end_trial("t", "FINISHED", "finished")
    run = first.client.get_run(run_id)
    assert val_steps(first, run_id) == [20, 40, 60, 80] and run.data.tags[OUTCOME_TAG] == "finished"
    assert run.data.metrics["val_acc"] == 0.8 and run.info.status == "FINISHED"

    # a trial that never ended (the sweep was stopped): its held metrics are sent when the driver closes
    other = first.start_trial("u", {**PARAMS, "train.seed": 1}, SAMPLED)
    first.log_metrics("u", {"val_acc": 0.5}, step=20, hold=True)
    first.close()
    assert val_steps(first, other) == [20]


def test_a_retried_trial_process_reporting_held_steps_again_logs_each_once(tmp_path):
    """The trial process killed while the driver still held its validations past the checkpoint at 20:
    Tune retries it from that checkpoint and it reports 40 again before the held 40 was sent. MLflow
    gets step 40 once, as first reported (the chaos test's ``[20, 40, 40, 60]`` before)."""
    driver = tracker(tmp_path)
    run_id = driver.start_trial("t", PARAMS, SAMPLED)
    driver.log_metrics("t", {"val_acc": 0.5}, step=20)  # with a checkpoint
    driver.log_metrics("t", {"val_acc": 0.6}, step=40, hold=True)  # then the process is killed
    for step in (40, 60):  # the retry, from the checkpoint at 20
        driver.log_metrics("t", {"val_acc": step / 100 + 0.01}, step=step, hold=True)
    driver.end_trial("t", "FINISHED", "finished")
    history = driver.client.get_metric_history(run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(20, 0.5), (40, 0.6), (60, 0.61)]


def test_a_resumed_trial_logs_the_held_steps_its_killed_driver_lost(tmp_path):
    """The driver killed while it held validations past the last checkpoint: they never reached MLflow;
    the trial, resumed from that checkpoint, reports them again and they are logged, each step once."""
    first = tracker(tmp_path)
    run_id = first.start_trial("t", PARAMS, SAMPLED)
    first.log_metrics("t", {"val_acc": 0.5, "step": 20}, step=20)  # with a checkpoint
    first.log_metrics("t", {"val_acc": 0.6, "step": 40}, step=40, hold=True)  # lost with the driver

    second = tracker(tmp_path)
    assert second.start_trial("t", PARAMS, SAMPLED) == run_id
    for step in (20, 40, 60):  # resumed from the checkpoint at 20: reported from there
        second.log_metrics("t", {"val_acc": step / 100, "step": step}, step=step, hold=True)
    second.end_trial("t", "FINISHED", "finished")
    history = second.client.get_metric_history(run_id, "val_acc")
    assert [(m.step, m.value) for m in history] == [(20, 0.5), (40, 0.4), (60, 0.6)]
