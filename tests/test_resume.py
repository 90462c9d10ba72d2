"""``--resume`` in its quiet cases: a finished sweep resumed is a no-op that says so, Tune's handling of
a checkpoint the killed driver deleted stays off the console, and a killed driver's local Ray is stopped
by the next command."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

from conftest import write_config

from uml_ray.cli import main


def test_resuming_a_finished_sweep_says_so_and_writes_nothing(
    ray_session, synthetic_manifest, tmp_path, capsys
):
    from mlflow.tracking import MlflowClient

    config = write_config(
        tmp_path / "c.yaml",
        synthetic_manifest,
        tmp_path,
        train={"max_steps": 40, "val_every": 20, "batch_size": 16},
    )
    space = tmp_path / "s.yaml"
    space.write_text("params:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}\n")
    args = ["tune", str(config), "--space", str(space), "--trials", "3", "--fuse", "1", "--name", "done"]
    assert main(args) == 0
    capsys.readouterr()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tests").experiment_id

    def parent():
        (found,) = client.search_runs([experiment], "tags.`uml_ray.kind` = 'sweep'")
        return found

    before = parent()
    assert before.info.status == "FINISHED" and before.data.metrics["trials"] == 3

    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["[uml-ray] sweep done already finished (3 trials); nothing to resume"], out
    after = parent()
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.info.end_time)
    for key in ("trials", "completed_trials", "pruned_trials", "failed_trials", "best_best_val_acc"):
        assert len(client.get_metric_history(after.info.run_id, key)) == 1, key  # the summary, once
    # the counts are the child runs' recorded outcomes
    children = client.search_runs([experiment], "tags.`uml_ray.kind` = 'trial'")
    outcomes = [r.data.tags["uml_ray.outcome"] for r in children]
    assert after.data.metrics["completed_trials"] == sum(o in ("finished", "stopped_early") for o in outcomes)
    assert after.data.metrics["pruned_trials"] == outcomes.count("pruned") and len(children) == 3


def test_tune_checkpoint_errors_go_to_the_sweep_log_not_the_console(tmp_path, capsys):
    from uml_ray.driver.tune_logs import tune_errors_to_file

    logger = logging.getLogger("ray.tune.execution.tune_controller")
    console = logging.StreamHandler()
    logger.addHandler(console)
    try:
        with tune_errors_to_file(str(tmp_path)):
            try:
                raise FileNotFoundError("checkpoint_000026")
            except FileNotFoundError:
                logger.exception("Trial %s: Error handling checkpoint %s", "t1", "result")
            logger.warning("Trial %s: something else", "t1")
            try:
                raise ConnectionError("The actor died unexpectedly before finishing this task.")
            except ConnectionError as exc:
                logger.error("Trial task failed for trial t3", exc_info=exc)
        during = capsys.readouterr()
        with_filter = during.err
        logger.warning("Trial %s: Error handling checkpoint %s", "t2", "result")
        without = capsys.readouterr().err
    finally:
        logger.removeHandler(console)
    assert "Error handling checkpoint" not in with_filter and "something else" in with_filter
    # a trial process that died: one console line naming it, the traceback only in the file
    assert "Traceback" not in with_filter and "The actor died" not in with_filter
    assert during.out.count("trial t3: its process failed (ConnectionError); retried from its last") == 1
    assert "Error handling checkpoint" in without  # only while the sweep runs
    logged = (tmp_path / "tune-errors.log").read_text()
    assert "Trial t1: Error handling checkpoint result" in logged and "FileNotFoundError" in logged
    assert "Trial task failed for trial t3" in logged and "The actor died unexpectedly" in logged


def test_a_killed_drivers_leftover_ray_processes_are_stopped_by_the_next_command(tmp_path):
    from uml_ray.cluster import local_ray_records, session_processes, stop_leftover_rays

    session = f"session_test_{os.getpid()}_{time.time_ns()}"
    # a driver (gone) and a process of its session left behind (named by the session, like Ray's agents)
    driver = subprocess.Popen([sys.executable, "-c", "pass"])
    driver.wait()
    leftover = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", f"--session-dir=/tmp/{session}"]
    )
    alive = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(600)",
            f"--session-name={session.replace('test', 'other')}",
        ]
    )
    records = local_ray_records()
    records.mkdir(parents=True, exist_ok=True)
    record = records / f"{session}.json"
    record.write_text(json.dumps({"driver": driver.pid, "started": "1", "session": session}))
    try:
        assert leftover.pid in session_processes(session)
        assert leftover.pid in stop_leftover_rays()
        assert leftover.wait(timeout=30) == -9 and not record.exists()
        assert alive.poll() is None  # another session's process is left alone
    finally:
        for process in (leftover, alive):
            if process.poll() is None:
                process.kill()
                process.wait()
        record.unlink(missing_ok=True)


def test_a_command_that_started_its_own_ray_leaves_none_of_it_running(synthetic_manifest, tmp_path):
    """A ``uml-ray train`` that started a local Ray: once it exits, no process of that Ray's session
    is left (Ray's agents and dashboard modules outlive ``ray.shutdown()`` by themselves)."""
    import tempfile
    from pathlib import Path

    from uml_ray.cluster import local_ray_records, session_processes

    config = write_config(
        tmp_path / "c.yaml", synthetic_manifest, tmp_path, train={"max_steps": 20, "batch_size": 16}
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    driver = subprocess.Popen(
        [sys.executable, "-m", "uml_ray.cli", "train", str(config), "--name", "own-ray"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = driver.communicate(timeout=600)
    assert driver.returncode == 0, out[-3000:]
    # Ray names a local session after its driver's pid
    (folder,) = Path(tempfile.gettempdir(), "ray").glob(f"session_*_{driver.pid}")
    assert session_processes(folder.name, str(folder)) == []
    assert not (local_ray_records() / f"{folder.name}.json").exists()
