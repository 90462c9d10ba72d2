"""Chaos: faults injected by killing processes by pid mid-run, and what must survive them.

Each test kills real processes — a Ray Train worker, a Tune trial process, the driver, every
process of a Ray node, the MLflow server — found through Ray's state API (or Tune's record of the
trial process, checked against it) or as the process the test started, then checks figures: the
run resumes from its checkpoint and ends where an uninterrupted run ends, no trial is lost or run
twice, MLflow holds one run per trial with every validation step. ``make test-chaos`` runs them;
the README's reliability table quotes them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import checkpointed_config, kill_pids

from uml_ray.cli import main
from uml_ray.cluster import local_ray_records, session_processes

pytestmark = pytest.mark.chaos

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "search_spaces" / "supervised_linear_probe.yaml"


def fusable_space(path: Path) -> Path:
    """A space whose every config fuses with every other (alpha > 0, lr, weight decay): fused trials of
    --fuse members."""
    import yaml

    path.write_text(
        yaml.safe_dump(
            {
                "recipe": "supervised",
                "metric": "best_val_acc",
                "params": {
                    "train.alpha.text": {"type": "uniform", "low": 0.2, "high": 1.5},
                    "train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
                    "train.weight_decay": {"type": "choice", "values": [0.0, 0.01]},
                },
            }
        )
    )
    return path


def tune_argv(config: Path, space: Path, trials: int, sweep: str, fuse: int = 1) -> list[str]:
    """``uml-ray tune`` of ``trials`` configs of ``space``, one trial at a time, as sweep ``sweep``."""
    return [
        "tune",
        str(config),
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--fuse",
        str(fuse),
        "--concurrency",
        "1",
        "--name",
        sweep,
    ]


class Background:
    """``main(argv)`` in a thread (the driver stays in this process, so its Ray is the shared one)."""

    def __init__(self, argv: list[str]):
        self.code: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(argv,), daemon=True)
        self.thread.start()

    def _run(self, argv):
        try:
            self.code = main(argv)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc

    def running(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout: float) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the run did not end within {timeout:.0f} s"
        if self.error is not None:
            raise self.error
        return self.code


def wait_for(what: str, check, run: Background | None = None, timeout: float = 300, every: float = 0.2):
    """Poll ``check()`` until it returns something truthy; fail if ``run`` ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        if run is not None and not run.running():
            raise AssertionError(f"the run ended before {what}: exit {run.code}, {run.error!r}")
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def actor_pids(class_name: str, alive: bool = True) -> list[tuple[int, str]]:
    """(pid, node id) of every actor of ``class_name`` (alive, or any state), from Ray's state API."""
    import ray
    from ray.util.state import list_actors

    # this process's Ray, by address: other Rays on the machine would make the default ambiguous
    filters = [("class_name", "=", class_name)] + ([("state", "=", "ALIVE")] if alive else [])
    actors = list_actors(
        address=ray.get_runtime_context().gcs_address, filters=filters, detail=True, limit=10000
    )
    return [(a.pid, a.node_id) for a in actors]


def report(capsys, line: str) -> None:
    """A test's figures on the console even while pytest captures output (the README's table quotes them)."""
    with capsys.disabled():
        print(line, flush=True)


def kill(pid: int) -> float:
    """SIGKILL one process; returns when it was sent (time.time())."""
    os.kill(pid, signal.SIGKILL)
    return time.time()


def last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def mlflow_client(workdir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")


def tracked_runs(workdir: Path, experiment: str = "tests") -> list:
    client = mlflow_client(workdir)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


def metric_steps(client, run, key: str = "val_acc") -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, key)]


def first_new_step_after(client, run, killed_at: float, key: str = "val_acc") -> float:
    """Seconds from a kill to the first validation step MLflow got that no one had reached before it."""
    history = client.get_metric_history(run.info.run_id, key)
    reached = max((m.step for m in history if m.timestamp / 1000 <= killed_at), default=-1)
    return min((m.timestamp / 1000 for m in history if m.step > reached), default=float("inf")) - killed_at


def results(folder: Path) -> list[dict]:
    """Every result a Tune trial reported, in order, retries included (its result.json)."""
    try:
        return [
            json.loads(line) for line in (folder / "result.json").read_text().splitlines() if line.strip()
        ]
    except (OSError, ValueError):  # being written
        return []


# --- a Ray Train worker --------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_killed_train_worker_resumes_from_checkpoint_with_identical_metrics(
    ray_session, synthetic_manifest, tmp_path, capsys
):
    """2 workers (0.5 CPU each): one SIGKILLed once the driver recorded a validation past a checkpoint;
    Ray Train restarts the group from that checkpoint, the validations after it are reported again,
    and the run ends bit-identical to an uninterrupted one (same batches on CPU)."""
    # 400 steps: nine validations past a checkpoint (60, 100, ..., 380) for the watcher to catch on a
    # loaded machine; with 200 a run on a busy CI machine could end between two looks
    max_steps = 400
    config = checkpointed_config(
        tmp_path,
        synthetic_manifest,
        max_steps=max_steps,
        resources={"num_workers": 2, "cpus_per_worker": 0.5},
    )
    started = time.monotonic()
    assert main(["train", str(config), "--name", "whole"]) == 0
    whole = last_json(capsys.readouterr().out)
    whole_s = time.monotonic() - started

    def past_a_checkpoint() -> tuple[Path, int] | None:
        """(trial folder, last step) once the driver recorded a validation from step 60 on that is
        not a checkpoint's (60, 100, ...): the newest checkpoint is behind it."""
        for path in (tmp_path / "runs" / "killed").glob("*/result.json"):
            reported = results(path.parent)
            if reported and reported[-1]["step"] >= 60 and reported[-1]["step"] % 40 == 20:
                return path.parent, reported[-1]["step"]
        return None

    workers_before = len(actor_pids("RayTrainWorker", alive=False))
    started = time.monotonic()
    run = Background(["train", str(config), "--name", "killed"])
    trial_folder, killed_step = wait_for("a validation past a checkpoint", past_a_checkpoint, run, every=0.05)
    pid = actor_pids("RayTrainWorker")[-1][0]
    killed_at = kill(pid)
    assert run.join(600) == 0
    killed = last_json(capsys.readouterr().out)
    killed_s = time.monotonic() - started

    # one new worker group (2 fresh workers), resumed from a checkpoint (a multiple of 40) behind the
    # step the driver had recorded, not from step 0: what the group reported after that checkpoint
    # is reported again, once
    assert len(actor_pids("RayTrainWorker", alive=False)) - workers_before == 4
    steps = [r["step"] for r in results(trial_folder)]
    replays = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    every_validation = list(range(20, max_steps + 1, 20))
    assert len(replays) <= 1 and steps[-1] == max_steps and sorted(set(steps)) == every_validation, steps
    if replays:
        (replay,) = replays
        resumed_at = steps[replay] - 20
        assert 40 <= resumed_at < killed_step <= steps[replay - 1] and resumed_at % 40 == 0, (
            killed_step,
            steps,
        )
        assert steps[replay:] == list(range(resumed_at + 20, max_steps + 1, 20)), steps
    else:
        # the kill landed after the group had saved a checkpoint at the last step it reported (the
        # watcher saw the run late on a loaded machine): resumed there, nothing to report again
        assert steps == every_validation, steps
        resumed_at = killed_step

    for key in ("best_val_acc", "test_acc", "best_step", "step"):
        assert killed[key] == whole[key], (key, killed, whole)

    client = mlflow_client(tmp_path)
    runs = {r.info.run_name: r for r in tracked_runs(tmp_path)}
    assert sorted(runs) == ["killed", "whole"]  # one MLflow run for the killed run, not two
    assert runs["killed"].info.status == "FINISHED"
    assert metric_steps(client, runs["killed"]) == list(range(20, max_steps + 1, 20))  # every validation once
    for key in ("val_loss", "test_loss", "train_loss", "test_acc", "best_val_loss"):
        assert runs["killed"].data.metrics[key] == runs["whole"].data.metrics[key], key
    recovered = first_new_step_after(client, runs["killed"], killed_at)
    replayed = list(range(resumed_at + 20, steps[replay - 1] + 1, 20)) if replays else []
    report(
        capsys,
        f"CHAOS worker: killed pid {pid} after step {killed_step}; resumed from step {resumed_at} "
        f"(replayed steps {replayed}); first new validation {recovered:.1f} s after the kill; "
        f"uninterrupted {whole_s:.1f} s, with the kill {killed_s:.1f} s; final metrics identical: {killed}",
    )


# --- a trial process ------------------------------------------------------------------------------


def sweep_children(workdir: Path, sweep: str) -> list:
    return [
        r
        for r in tracked_runs(workdir)
        if r.data.tags.get("uml_ray.sweep") == sweep and r.data.tags.get("uml_ray.kind") == "trial"
    ]


def running_trial(workdir: Path, sweep: str, step: int, max_steps: int) -> tuple[Path, int] | None:
    """(Tune trial folder, trial process pid) of a trial of ``sweep`` past ``step`` and not done, the pid
    checked against the alive actors of Ray's state API."""
    import ray
    from ray.util.state import list_actors

    for path in (workdir / "runs" / sweep).glob("*/result.json"):
        reported = results(path.parent)
        if (
            reported
            and step <= reported[-1].get("step", 0) < max_steps - 100
            and not reported[-1].get("done")
        ):
            alive = list_actors(
                address=ray.get_runtime_context().gcs_address,
                filters=[("state", "=", "ALIVE")],
                detail=True,
                limit=10000,
            )
            if reported[-1]["pid"] in [a.pid for a in alive]:
                return path.parent, reported[-1]["pid"]
    return None


def resumed_from(reported: list[dict], cadence: int = 40) -> tuple[int, int]:
    """(last step the first trial process reported, step of the checkpoint its successor began from).

    A retry resumes from the newest durable checkpoint: at least the last one the driver had seen
    reported, possibly a later one a train worker wrote before its report reached the driver (the
    node went away in between). Either way it starts right after a step on the checkpoint cadence."""
    first_pid = reported[0]["pid"]
    switch = next(i for i, r in enumerate(reported) if r["pid"] != first_pid)
    checkpointed = [r["step"] for r in reported[:switch] if r.get("checkpoint_dir_name")]
    resumed_at = reported[switch]["step"] - 20
    trace = [(r["step"], r["pid"]) for r in reported]
    assert resumed_at >= max(checkpointed) and resumed_at % cadence == 0, trace
    return reported[switch - 1]["step"], resumed_at


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fuse, trials", [(1, 3), (2, 4)], ids=["one-config-trials", "fused-trials"])
def test_killed_trial_process_is_retried_from_checkpoint(
    ray_session, synthetic_manifest, tmp_path, capsys, fuse, trials
):
    """A sweep's trial process SIGKILLed after step 60 (checkpoints every 40 steps): Tune retries the
    trial from its checkpoint; the sweep ends with every requested config tracked once, none failed."""
    config = checkpointed_config(tmp_path, synthetic_manifest)
    sweep = f"kill-trial-{fuse}"
    started = time.monotonic()
    space = SPACE if fuse == 1 else fusable_space(tmp_path / "space.yaml")
    run = Background(tune_argv(config, space, trials, sweep, fuse))
    folder, pid = wait_for(
        "a trial past step 60", lambda: running_trial(tmp_path, sweep, 60, 600), run, every=0.05
    )
    killed_at = kill(pid)
    assert run.join(600) == 0
    summary = last_json(capsys.readouterr().out)
    took = time.monotonic() - started

    reported = results(folder)
    killed_step, resumed_at = resumed_from(reported)
    assert resumed_at >= 40  # from a checkpoint, not from step 0
    trial_id = reported[0]["trial_id"]

    client = mlflow_client(tmp_path)
    children = sweep_children(tmp_path, sweep)
    keys = [r.data.tags["uml_ray.trial_id"] for r in children]
    assert summary["trials"] == trials and len(keys) == trials and len(set(keys)) == trials, (
        keys
    )  # none lost, none twice
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children), [
        r.info.status for r in children
    ]  # none failed
    for child in children:  # every validation a trial reached, once
        history = metric_steps(client, child)
        assert history == list(range(20, history[-1] + 1, 20)), (child.data.tags["uml_ray.trial_id"], history)
    (parent,) = [
        r
        for r in tracked_runs(tmp_path)
        if r.data.tags.get("uml_ray.sweep") == sweep and r.data.tags.get("uml_ray.kind") == "sweep"
    ]
    assert parent.info.status == "FINISHED" and parent.data.metrics["failed_trials"] == 0
    victims = [
        r
        for r in children
        if trial_id in (r.data.tags["uml_ray.trial_id"], r.data.tags.get("uml_ray.fused_trial"))
    ]
    assert len(victims) == fuse
    recovered = min(first_new_step_after(client, victim, killed_at) for victim in victims)
    report(
        capsys,
        f"CHAOS trial (fuse {fuse}): killed pid {pid} of trial {trial_id} ({len(victims)} config(s)) after "
        f"step {killed_step}, resumed from step {resumed_at}; first new validation {recovered:.1f} s after "
        f"the kill; {len(set(keys))} of {trials} configs tracked once; sweep {took:.1f} s",
    )


# --- the driver -----------------------------------------------------------------------------------


def searcher_history(experiment: Path) -> list:
    """Optuna's trials as the sweep's searcher saved them in the experiment folder (the newest session's save;
    each session's file is named by its start time)."""
    import pickle

    newest = max(experiment.glob("searcher-state-*.pkl"), key=lambda p: p.name)
    with open(newest, "rb") as handle:
        state = pickle.load(handle)  # the checked searcher's fields, Optuna's searcher among them
    return state["inner"]._ot_study.trials


def same_config(params: dict, sampled: dict) -> bool:
    """Optuna's params of a trial are the sampled config MLflow recorded (floats to rounding)."""
    return params.keys() == sampled.keys() and all(
        params[k] == pytest.approx(v) if isinstance(v, float) else params[k] == v for k, v in sampled.items()
    )


def drop_live_trials_from_snapshot(experiment: Path, ended: set[str]) -> set[str]:
    """What a driver killed between writing the searcher's state and Tune's trial table leaves: the
    trials in flight (live in the searcher's saved state, not ended in MLflow) taken out of Tune's
    newest snapshot. Returns their ids."""
    import pickle

    with open(max(experiment.glob("searcher-state-*.pkl"), key=lambda p: p.name), "rb") as handle:
        live = set(pickle.load(handle)["live"])
    snapshot = max(experiment.glob("experiment_state-*.json"), key=lambda p: p.name)
    state = json.loads(snapshot.read_text())
    dropped = {json.loads(entry[0])["trial_id"] for entry in state["trial_data"]} & live - ended
    state["trial_data"] = [
        entry for entry in state["trial_data"] if json.loads(entry[0])["trial_id"] not in dropped
    ]
    snapshot.write_text(json.dumps(state))
    return dropped


def revive_in_snapshot(experiment: Path, ended: set[str]) -> set[str]:
    """What a driver killed after trials ended but before Tune's next snapshot leaves: those trials still
    RUNNING in Tune's newest snapshot, their checkpoints gone (removed once MLflow held their products).
    Returns the trials revived."""
    snapshot = max(experiment.glob("experiment_state-*.json"), key=lambda p: p.name)
    state = json.loads(snapshot.read_text())
    revived = set()
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        if trial["trial_id"] in ended:
            trial["status"] = "RUNNING"
            entry[0] = json.dumps(trial)
            revived.add(trial["trial_id"])
    snapshot.write_text(json.dumps(state))
    for folder in experiment.glob("*/checkpoint_*"):
        if any(f"_{trial_id}_" in folder.parent.name for trial_id in revived):
            shutil.rmtree(folder)
    return revived


@pytest.mark.timeout(600)
@pytest.mark.parametrize("snapshot", ["as written", "lagging the searcher", "lagging the trials' ends"])
def test_killed_driver_resumes_sweep_without_rerunning_or_losing_trials(
    ray_session, synthetic_manifest, tmp_path, capsys, snapshot
):
    """The driver SIGKILLed after 2 of 5 trials finished, then ``--resume``: the finished trials are
    not run again, no trial is lost or tracked twice, and Optuna's history holds every trial's result.
    Lagging: Tune's snapshot lacks the trial in flight that the searcher's state holds (the kill fell
    between the two files): the resumed sweep neither waits for it for ever nor loses its config; the
    next trial takes the config over and continues its MLflow run. Lagging the ends: the finished trials
    are still running in Tune's snapshot, their checkpoints removed: each reports its recorded result
    again, restoring nothing, and is neither trained nor recorded again."""
    import subprocess
    import sys

    config = checkpointed_config(tmp_path, synthetic_manifest)
    trials, sweep = 5, "kill-driver"
    args = tune_argv(config, SPACE, trials, sweep)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the driver starts a Ray of its own
    started = time.monotonic()
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "uml_ray.cli", *args],
            cwd=tmp_path,
            env=env,
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # one trial at a time: a third trial folder means two trials ended (MLflow is not read while the
        # driver may still be creating its store)
        experiment = tmp_path / "runs" / sweep
        deadline = time.monotonic() + 300
        while len(list(experiment.glob("*/result.json"))) < 3:
            assert driver.poll() is None, (
                "the sweep ended before it could be killed:\n" + (tmp_path / "driver.log").read_text()[-3000:]
            )
            assert time.monotonic() < deadline
            time.sleep(0.1)
        (session,) = [
            (held["session"], held["folder"])
            for held in map(json.loads, (p.read_text() for p in local_ray_records().glob("*.json")))
            if held["driver"] == driver.pid
        ]
        kill(driver.pid)  # the driver alone: its local Ray's GCS and raylet die with it, the rest lingers
        driver.wait()
    except BaseException:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's own local Ray goes with it
        raise
    left_behind = session_processes(*session)
    finished = [r for r in sweep_children(tmp_path, sweep) if r.info.status in ("FINISHED", "KILLED")]
    before = {r.data.tags["uml_ray.trial_id"]: r for r in finished}
    assert 2 <= len(before) < trials
    folders = {
        json.loads(p.read_text().splitlines()[0])["trial_id"]: p.parent
        for p in (tmp_path / "runs" / sweep).glob("*/result.json")
        if p.read_text().strip()
    }
    lines_before = {trial_id: len(results(folders[trial_id])) for trial_id in before}
    dropped = set()
    if snapshot == "lagging the searcher":
        dropped = drop_live_trials_from_snapshot(tmp_path / "runs" / sweep, set(before))
        assert dropped  # the trial in flight was live in the searcher's state
    elif snapshot == "lagging the trials' ends":
        assert revive_in_snapshot(tmp_path / "runs" / sweep, set(before)) == set(before)

    resumed = time.monotonic()
    assert main([*args, "--resume"]) == 0
    console = capsys.readouterr()
    summary = last_json(console.out)
    resume_s = time.monotonic() - resumed
    # the next command stopped what the killed driver's Ray left behind (agents, workers)
    assert session_processes(*session) == [], session
    assert "Error handling checkpoint" not in console.out + console.err, console.err[-3000:]
    assert "does not exist on storage" not in console.out + console.err, console.err[-3000:]
    for trial_id in before:  # ended before the kill: neither announced again nor re-recorded
        assert f"trial {trial_id} " not in console.out, console.out

    children = sweep_children(tmp_path, sweep)
    keys = [r.data.tags["uml_ray.trial_id"] for r in children]
    assert summary["trials"] == trials and len(keys) == trials and len(set(keys)) == trials, (
        keys
    )  # none lost, none twice
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    parents = [
        r
        for r in tracked_runs(tmp_path)
        if r.data.tags.get("uml_ray.sweep") == sweep and r.data.tags.get("uml_ray.kind") == "sweep"
    ]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # the parent's summary counts are the child runs' recorded outcomes, each logged once
    client = mlflow_client(tmp_path)
    outcomes = [r.data.tags["uml_ray.outcome"] for r in children]
    counted = {
        "trials": len(children),
        "completed_trials": sum(o in ("finished", "stopped_early") for o in outcomes),
        "pruned_trials": outcomes.count("pruned"),
        "failed_trials": 0,
    }
    for key, count in counted.items():
        history = client.get_metric_history(parents[0].info.run_id, key)
        assert [m.value for m in history] == [count], (key, history, outcomes)
    for run in children:  # every validation a trial reached, once
        history = metric_steps(client, run)
        assert history == list(range(20, history[-1] + 1, 20)), (run.data.tags["uml_ray.trial_id"], history)
    for run in children:
        trial_id = run.data.tags["uml_ray.trial_id"]
        if trial_id in before:  # finished before the kill: not run again, neither in Tune nor in MLflow
            assert run.info.end_time == before[trial_id].info.end_time
            # a trial revived in the snapshot reports its recorded result once more, and trains nothing
            again = int(snapshot == "lagging the trials' ends")
            assert len(results(folders[trial_id])) == lines_before[trial_id] + again

    # Optuna's history: every trial's config told with its result, the 2+ finished before the kill included;
    # no config sampled twice
    history = [t for t in searcher_history(tmp_path / "runs" / sweep) if t.state.name == "COMPLETE"]
    for run in children:
        sampled = json.loads(run.data.tags["uml_ray.sampled"])
        (told,) = [t for t in history if same_config(t.params, sampled)]
        assert told.value == pytest.approx(run.data.metrics["selection_score"])  # the space's default metric
    assert len(history) == trials
    continued = [
        r.data.tags["uml_ray.continues_trial"] for r in children if "uml_ray.continues_trial" in r.data.tags
    ]
    assert (
        set(continued) == dropped
    )  # the dropped trial's run was continued by the trial that took its config
    report(
        capsys,
        f"CHAOS driver ({snapshot}): killed pid {driver.pid} after {len(before)} of {trials} trials "
        f"finished ({time.monotonic() - started - resume_s:.1f} s in); --resume ran the other "
        f"{trials - len(before)} in {resume_s:.1f} s; {len(set(keys))} trials tracked once, {len(history)} "
        f"results in Optuna's history; {len(left_behind)} processes of the killed driver's Ray stopped "
        "by the resume",
    )


# --- a truncated checkpoint -----------------------------------------------------------------------


def stop_trial_at_checkpoint(run: Background, experiment: Path) -> tuple[Path, int, list[Path], Path]:
    """Freeze (SIGSTOP) the run's trial process once it wrote three checkpoints; returns (trial folder,
    pid, the checkpoints on disk newest first, the one Tune holds as the trial's latest: what a retry gets).

    A reported checkpoint becomes Tune's only when the trial process answers Tune's ``save`` call,
    which a frozen process never does, though the driver may have written its result line already
    (under CI load the test once truncated a checkpoint Tune never took). Tune keeps two and deletes
    the older on taking a new one, so once three were written, Tune's latest is the newer of the two
    on disk, or the middle one of three (the newest then never became Tune's)."""

    def three_written():
        for path in experiment.glob("*/result.json"):
            reported = results(path.parent)
            if (
                len([r for r in reported if r.get("checkpoint_dir_name")]) >= 3
                and reported[-1].get("step", 0) < 400
            ):
                return path.parent, reported[-1]["pid"]
        return None

    folder, pid = wait_for("three checkpoints", three_written, run, every=0.02)
    os.kill(pid, signal.SIGSTOP)
    time.sleep(3)  # the driver takes in what the trial sent before it froze
    kept = sorted(folder.glob("checkpoint_*"), reverse=True)
    assert len(kept) in (2, 3), kept
    return folder, pid, kept, kept[-2]


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


@pytest.mark.timeout(600)
def test_truncated_checkpoint_falls_back_or_stops_with_one_line(
    ray_session, synthetic_manifest, tmp_path, capsys
):
    """The newest checkpoint's state.pt truncated, then the trial process SIGKILLed: the retry resumes
    from the other checkpoint kept and ends exactly where an uninterrupted run ends. Every kept state.pt
    truncated: the run stops with exit 2 and one line naming the file, never torch's own error."""
    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan
    from uml_ray.train.context import LocalContext
    from uml_ray.train.loop import train_supervised

    config = checkpointed_config(tmp_path, synthetic_manifest)
    plan = build_plan(load_config(config))
    uninterrupted = train_supervised(plan, LocalContext(plan))

    started = time.monotonic()
    run = Background(["train", str(config), "--name", "newest-truncated"])
    folder, pid, kept, newest = stop_trial_at_checkpoint(run, tmp_path / "runs" / "newest-truncated")
    registered = results(folder)[-1]
    # Tune's latest, and a newer one the trial wrote that Tune never took (the newest durable
    # checkpoint would serve then): the retry must fall back to the oldest kept
    for checkpoint in kept[: kept.index(newest) + 1]:
        truncate(checkpoint / "state.pt")
    killed_at = kill(pid)
    assert run.join(600) == 0
    captured = capsys.readouterr()
    resumed = last_json(captured.out)
    took = time.monotonic() - started

    reported = results(folder)
    switch = next(i for i, r in enumerate(reported) if r["pid"] != pid)
    fallback_step = reported[switch]["step"] - 20
    assert fallback_step < registered["step"] and fallback_step % 40 == 0, [
        (r["step"], r["pid"]) for r in reported
    ]
    # the fallback said in one console line naming both steps; nothing of Tune's on the console
    lost_step = next(r["step"] for r in reported if r.get("checkpoint_dir_name") == newest.name)
    console = (captured.out + captured.err).splitlines()
    said = [line for line in console if "unreadable" in line]
    assert len(said) == 1 and said[0].startswith(
        f"[uml-ray] state.pt at step {lost_step} unreadable: resumed from step {fallback_step} ("
    ), said
    assert "Traceback" not in captured.err and "Error handling checkpoint" not in captured.err, captured.err[
        -3000:
    ]
    for key in ("best_val_acc", "test_acc", "best_step", "step"):
        assert resumed[key] == uninterrupted[key], (key, resumed, uninterrupted)
    client = mlflow_client(tmp_path)
    (tracked,) = [r for r in tracked_runs(tmp_path) if r.info.run_name == "newest-truncated"]
    assert tracked.info.status == "FINISHED" and metric_steps(client, tracked) == list(range(20, 601, 20))
    recovered = first_new_step_after(client, tracked, killed_at)

    # every kept state.pt truncated: the retry cannot resume; one line, exit 2, the file named
    run = Background(["train", str(config), "--name", "all-truncated"])
    folder, pid, kept, recorded = stop_trial_at_checkpoint(run, tmp_path / "runs" / "all-truncated")
    for checkpoint in kept:
        truncate(checkpoint / "state.pt")
    kill(pid)
    assert run.join(600) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("uml-ray")]
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err[-3000:]
    # one error line on the whole console: the failed trial is not also said on stdout
    said = [line for line in (captured.out + captured.err).splitlines() if "is unreadable" in line]
    assert said == err, said
    assert f"{recorded}/state.pt is unreadable" in err[0] and "start it again under a new --name" in err[0], (
        err[0]
    )
    assert f"so are the {len(kept) - 1} other(s) kept beside it" in err[0], err[0]
    assert (
        "is unreadable (OSError: " in err[0] or "is unreadable (RuntimeError: PytorchStreamReader" in err[0]
    )  # torch's reason, in short
    (failed,) = [r for r in tracked_runs(tmp_path) if r.info.run_name == "all-truncated"]
    assert failed.info.status == "FAILED"
    report(
        capsys,
        f"CHAOS truncated checkpoint: newest ({newest.name}, step {registered['step']}) truncated, the "
        f"retry resumed from step {fallback_step}; first new validation {recovered:.1f} s after the kill; "
        f"final metrics identical to an uninterrupted run ({resumed['test_acc']}); {took:.1f} s. All kept "
        f"truncated: exit 2, '{err[0][:160]}...'",
    )


@pytest.mark.timeout(600)
def test_checkpoint_tune_recorded_but_gone_is_replaced_by_the_newest_kept(
    ray_session, synthetic_manifest, tmp_path, capsys
):
    """What a driver killed mid-rotation leaves (its snapshot names a checkpoint the rotation deleted):
    the trial's recorded checkpoint folder removed, then its process SIGKILLed; the retry resumes from
    the checkpoint kept beside it instead of failing with "does not exist on storage anymore"."""
    import shutil

    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan
    from uml_ray.train.context import LocalContext
    from uml_ray.train.loop import train_supervised

    config = checkpointed_config(tmp_path, synthetic_manifest)
    plan = build_plan(load_config(config))
    uninterrupted = train_supervised(plan, LocalContext(plan))

    run = Background(["train", str(config), "--name", "recorded-gone"])
    folder, pid, kept, recorded = stop_trial_at_checkpoint(run, tmp_path / "runs" / "recorded-gone")
    shutil.rmtree(recorded)
    kept.remove(recorded)  # newest first: what serves instead is kept[0], newer than the recorded one or not
    killed_at = kill(pid)
    assert run.join(600) == 0
    resumed = last_json(capsys.readouterr().out)
    (tracked,) = [r for r in tracked_runs(tmp_path) if r.info.run_name == "recorded-gone"]
    recovered = first_new_step_after(mlflow_client(tmp_path), tracked, killed_at)

    reported = results(folder)
    switch = next(i for i, r in enumerate(reported) if r["pid"] != pid)
    other = int(
        kept[0].name.split("_")[1]
    )  # Tune's checkpoint_00000N holds the (N+1)th checkpoint: step 40 (N+1)
    assert reported[switch]["step"] == 40 * (other + 1) + 20, [(r["step"], r["pid"]) for r in reported]
    for key in ("best_val_acc", "test_acc", "best_step", "step"):
        assert resumed[key] == uninterrupted[key], (key, resumed, uninterrupted)
    report(
        capsys,
        f"CHAOS checkpoint gone: {recorded.name} removed after Tune recorded it; the retry resumed from "
        f"{kept[0].name} (step {reported[switch]['step'] - 20}); first new validation {recovered:.1f} s "
        "after the kill; final metrics identical to an uninterrupted run",
    )


# --- the MLflow server ----------------------------------------------------------------------------


def start_mlflow_server(root: Path, port: int):
    """``mlflow server`` on 127.0.0.1:``port`` in its own process session (SQLite store and artifacts under
    ``root``, kept across restarts); returns once it answers."""
    from test_cluster_runtime import MLFLOW, start_in_session, subprocess_env, wait_for_http

    env = subprocess_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    cmd = [
        MLFLOW,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--serve-artifacts",
        "--allowed-hosts",
        f"127.0.0.1:{port},localhost:{port}",
        "--workers",
        "1",
    ]
    log = root / f"server-{time.time():.0f}.log"
    server = start_in_session(cmd, env, log)
    wait_for_http(f"http://127.0.0.1:{port}/health", server, log, timeout=180)
    return server


def kill_session(server) -> list[int]:
    """SIGKILL every process of the server's session (the server and its workers), by pid."""
    from test_cluster_runtime import session_members

    pids = session_members(server.pid)
    kill_pids(pids)
    server.wait(timeout=30)
    return pids


@pytest.mark.timeout(600)
def test_sweep_survives_mlflow_server_outage_and_delivers_held_metrics(
    ray_session, synthetic_manifest, tmp_path, capsys
):
    """The tracking server SIGKILLed after the first validation reached it, back on the same port ~30 s later:
    the sweep goes on meanwhile (its writes held, in order), no trial fails, and every validation step
    of every trial arrives once the server is back, with no run duplicated."""
    from mlflow.tracking import MlflowClient
    from test_cluster_runtime import free_ports

    (port,) = free_ports(1)
    root = tmp_path / "server"
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(root, port)
    trials, sweep = 3, "outage"
    config = checkpointed_config(tmp_path, synthetic_manifest, tracking={"uri": uri, "experiment": "outage"})
    client = MlflowClient(uri)
    try:
        started = time.monotonic()
        run = Background(tune_argv(config, SPACE, trials, sweep))

        def first_validation():
            found = client.get_experiment_by_name("outage")
            runs = (
                []
                if found is None
                else client.search_runs([found.experiment_id], "tags.`uml_ray.kind` = 'trial'")
            )
            return any("val_acc" in r.data.metrics for r in runs)

        wait_for("the first validation in MLflow", first_validation, run, every=0.2)
        killed = kill_session(server)
        killed_at = time.time()
        time.sleep(20)  # the server's own start-up brings the outage to about 30 s
        assert run.running()  # the sweep did not stop for it
        server = start_mlflow_server(root, port)
        back_at = time.time()
        assert run.join(600) == 0  # no trial failed because of tracking
        done_at = time.time()
        out = capsys.readouterr()
        took = time.monotonic() - started
    finally:
        kill_session(server)

    assert "is unreachable" in out.err and "answers again: held writes sent" in out.err, out.err[-3000:]
    summary = last_json(out.out)
    assert summary["trials"] == trials
    # read back from the store itself (the server is gone again)
    store = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = store.get_experiment_by_name("outage")
    runs = store.search_runs([found.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("uml_ray.kind") == "trial"]
    parents = [r for r in runs if r.data.tags.get("uml_ray.kind") == "sweep"]
    keys = [r.data.tags["uml_ray.trial_id"] for r in children]
    assert (
        len(parents) == 1
        and parents[0].info.status == "FINISHED"
        and parents[0].data.metrics["failed_trials"] == 0
    )
    assert len(keys) == trials and len(set(keys)) == trials, keys  # one run per trial, none duplicated
    held = 0
    for child in children:
        assert child.info.status in ("FINISHED", "KILLED"), child.info.status
        history = store.get_metric_history(child.info.run_id, "val_acc")
        steps = [m.step for m in history]
        assert steps == list(range(20, steps[-1] + 1, 20)), steps  # every validation, once, in order
        held += sum(1 for m in history if killed_at <= m.timestamp / 1000 <= back_at)
    assert held > 0  # validations stamped while the server was down arrived afterwards

    # artifacts, held ones included (copied aside while their files were temporary), in the server's folder
    def stored(run, name):
        return (root / "artifacts" / found.experiment_id / run.info.run_id / "artifacts" / name).is_file()

    assert stored(parents[0], "study_summary.json") and all(
        stored(child, "config.yaml") for child in children
    )
    report(
        capsys,
        f"CHAOS mlflow: killed {len(killed)} server processes after the first validation; back after "
        f"{back_at - killed_at:.1f} s; {held} validations logged during the outage arrived afterwards; "
        f"sweep ended {done_at - back_at:.1f} s after the restart; {trials} trials, one run each, none "
        f"failed; {took:.1f} s",
    )


# --- a node ---------------------------------------------------------------------------------------


@pytest.fixture
def head_and_two_nodes():
    """``test_cluster_runtime.two_node_cluster`` (a head with no CPUs and two 2-CPU nodes, this process
    attached as the driver) with node failures detected within seconds.

    The nodes inherit this process's Ray auth mode (token, once the shared local Ray started in it),
    so driver and cluster agree (see test_cluster_runtime.driver_auth_mode for what a mismatch does).
    """
    from test_cluster_runtime import two_node_cluster

    # a dead raylet is declared dead after ~3 missed 1 s health checks instead of Ray's ~30 s
    health = {
        "health_check_period_ms": 1000,
        "health_check_timeout_ms": 1000,
        "health_check_failure_threshold": 3,
    }
    with two_node_cluster(health) as cluster:
        yield cluster


def node_processes(node) -> list[int]:
    """Pids of every process of a Ray node: its raylet and agents, and the workers the state API lists
    on it."""
    import ray
    from ray.util.state import list_workers

    own = [info.process.pid for infos in node.all_processes.values() for info in infos]
    workers = list_workers(
        address=ray.get_runtime_context().gcs_address,
        filters=[("node_id", "=", node.node_id)],
        detail=True,
        limit=10000,
    )
    return own + [w.pid for w in workers if w.is_alive and w.pid]


@pytest.mark.cluster
@pytest.mark.timeout(600)
def test_lost_node_reschedules_trial_on_the_other_node(
    head_and_two_nodes, synthetic_manifest, tmp_path, capsys
):
    """Every process of the node running a training's trial SIGKILLed (a lost machine): Tune retries the
    trial on the other node from its last checkpoint, and the run ends as an uninterrupted one."""
    import ray
    from ray.util.state import list_actors

    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan
    from uml_ray.train.context import LocalContext
    from uml_ray.train.loop import train_supervised

    config = checkpointed_config(tmp_path, synthetic_manifest, resources={"cpus_per_worker": 2})
    plan = build_plan(load_config(config))
    uninterrupted = train_supervised(plan, LocalContext(plan))
    gcs = ray.get_runtime_context().gcs_address

    started = time.monotonic()
    run = Background(["train", str(config), "--name", "node-lost"])
    folder, pid = wait_for(
        "the trial past step 60", lambda: running_trial(tmp_path, "node-lost", 60, 600), run, every=0.05
    )
    (actor,) = [
        a
        for a in list_actors(address=gcs, filters=[("state", "=", "ALIVE")], detail=True, limit=10000)
        if a.pid == pid
    ]
    (lost,) = [n for n in head_and_two_nodes.worker_nodes if n.node_id == actor.node_id]
    pids = node_processes(lost)
    assert pid in pids
    killed_at = time.time()
    kill_pids(pids)
    assert run.join(600) == 0
    result = last_json(capsys.readouterr().out)
    took = time.monotonic() - started

    reported = results(folder)
    killed_step, resumed_at = resumed_from(reported)
    assert resumed_at >= 40
    retried = reported[-1]["pid"]
    (again,) = [
        a
        for a in list_actors(address=gcs, detail=True, limit=10000)
        if a.pid == retried and a.class_name == actor.class_name
    ]
    assert again.node_id != lost.node_id  # rescheduled on the surviving node
    assert not [n for n in ray.nodes() if n["NodeID"] == lost.node_id and n["Alive"]]
    for key in ("best_val_acc", "test_acc", "best_step", "step"):
        assert result[key] == uninterrupted[key], (key, result, uninterrupted)
    client = mlflow_client(tmp_path)
    (tracked,) = tracked_runs(tmp_path)
    assert tracked.info.status == "FINISHED" and metric_steps(client, tracked) == list(range(20, 601, 20))
    recovered = first_new_step_after(client, tracked, killed_at)
    report(
        capsys,
        f"CHAOS node: killed {len(pids)} processes of node {lost.node_id[:8]} (trial pid {pid}) after step "
        f"{killed_step}; the retry on node {again.node_id[:8]} resumed from step {resumed_at}; first new "
        f"validation {recovered:.1f} s after the kill; final metrics identical to an uninterrupted run; "
        f"{took:.1f} s",
    )
