"""Reading what Tune saved of a sweep: where it lives, its trial table, ended trials' results, checkpoints.

Ray-free at import. Every storage URI is opened through ``uri.filesystem_for``.
"""

from __future__ import annotations

import glob
import json
import os

from uml_ray.driver.bridge import MEMBERS
from uml_ray.train.checkpoints import BEST_FILE
from uml_ray.train.context import NOTICE_KEY
from uml_ray.train.plan import RunPlan
from uml_ray.uri import filesystem_for, is_remote, join_uri


def experiment_path(plan: RunPlan, name: str) -> str:
    """Where Tune keeps a sweep's state (the folder ``--resume`` restores)."""
    return join_uri(plan.cfg.tracking.storage_path, name)


def snapshot_trials(folder: str) -> dict[str, tuple[str, dict]] | None:
    """Trial id -> (status, last result) in the newest Tune experiment snapshot in ``folder`` (Tune
    copies the one it restores there), or None when there is none."""
    from ray.tune.execution.tune_controller import TuneController

    paths = glob.glob(os.path.join(folder, TuneController.CKPT_FILE_TMPL.format("*")))
    if not paths:
        return None
    with open(max(paths)) as handle:
        state = json.load(handle)
    held = {}
    for trial_json, metadata_json in state.get("trial_data", []):
        trial, metadata = json.loads(trial_json), json.loads(metadata_json)
        last = metadata.get("last_result")
        held[trial["trial_id"]] = (trial.get("status", ""), last if isinstance(last, dict) else {})
    return held


def finished_sweep(plan: RunPlan, name: str) -> int | None:
    """The number of trials of sweep ``name`` when its parent MLflow run ended FINISHED with its summary
    logged (a ``--resume`` of it has nothing to do), else None. Reads only: no experiment or run is
    created; an unreachable tracking server answers None (the resume goes on, its writes held)."""
    from uml_ray.tracking.runs import RunFinder
    from uml_ray.tracking.store import client

    tracking = plan.cfg.tracking
    try:
        mlflow = client(tracking.uri)
        experiment = mlflow.get_experiment_by_name(tracking.experiment)
        parent = None if experiment is None else RunFinder(mlflow, experiment.experiment_id, name).parent()
    except Exception:  # noqa: BLE001 - whatever MLflow raised, the resume itself will say it
        return None
    if parent is None or parent.info.status != "FINISHED" or "trials" not in parent.data.metrics:
        return None
    return int(parent.data.metrics["trials"])


def ended_results(plan: RunPlan, name: str, path: str) -> dict[str, dict]:
    """On ``--resume``: the last result of every trial MLflow recorded as ended (finished, stopped
    early or pruned), by trial id. Tune snapshots the sweep every ~10 s, so a driver killed soon
    after a trial ended leaves it running in the snapshot; without this it would train again.

    The trial's MLflow run is the record: Tune's result.json of a killed driver may lack the last
    lines it had buffered (its final, completed result among them), so a one-config trial's result is
    its result.json's last line overlaid with the latest value of every metric its run recorded."""
    from pyarrow import fs as pafs
    from ray.tune.result import AUTO_RESULT_KEYS

    from uml_ray.tracking.loggers import SweepTracker

    tracking = plan.cfg.tracking
    tracker = SweepTracker(tracking.uri, tracking.experiment, tracking.artifact_location, name)
    ended = tracker.ended_trials()
    if not ended:
        return {}
    filesystem, base = filesystem_for(path)
    folders = [
        info.path
        for info in filesystem.get_file_info(pafs.FileSelector(base))
        if info.type == pafs.FileType.Directory
    ]
    # what Tune adds, and a console line said when it was first reported
    tune_keys = set(AUTO_RESULT_KEYS) | {
        "done",
        "trial_id",
        "experiment_tag",
        "should_checkpoint",
        NOTICE_KEY,
    }
    results = {}
    for trial_id in ended:
        for folder in folders:
            if f"_{trial_id}_" not in os.path.basename(folder):
                continue
            try:
                with filesystem.open_input_stream(f"{folder}/result.json") as handle:
                    lines = handle.read().decode().strip().splitlines()
            except OSError:  # a trial folder without results yet
                continue
            if lines:
                last = {k: v for k, v in json.loads(lines[-1]).items() if k not in tune_keys}
                run = None if MEMBERS in last else tracker.runs.trial(trial_id)
                results[trial_id] = last if run is None else _recorded(last, run.data.metrics)
    return results


def _recorded(last: dict, metrics: dict) -> dict:
    """``last`` (a result.json line) overlaid with a run's recorded metrics; MLflow keeps every metric as
    a float, so a whole number comes back as the int it was reported as (``step``, ``completed``)."""
    merged = dict(last)
    for key, value in metrics.items():
        whole = isinstance(value, float) and value.is_integer() and not isinstance(last.get(key), float)
        merged[key] = int(value) if whole else value
    return merged


def fetch_best_weights(trial, last: dict, storage: str, folder: str) -> str | None:
    """The trial's best-val weights file (``best.pt``) of its latest checkpoint (inline or Ray Train): read
    where it lies on a local disk, else copied into ``folder``; None when there is none."""
    import ray.train
    from pyarrow import fs as pafs

    checkpoint = trial.checkpoint
    if last.get("checkpoint_path"):
        filesystem = filesystem_for(storage)[0] if is_remote(storage) else None
        checkpoint = ray.train.Checkpoint(last["checkpoint_path"], filesystem=filesystem)
    if checkpoint is None:
        return None
    best = f"{checkpoint.path.rstrip('/')}/{BEST_FILE}"
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return best if os.path.exists(best) else None
    local = os.path.join(folder, "checkpoint", BEST_FILE)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    try:
        pafs.copy_files(best, local, source_filesystem=checkpoint.filesystem)
    except (FileNotFoundError, OSError):
        return None
    return local


def drop_checkpoints(trial) -> None:
    """Remove a trial's Tune checkpoints (the latest and those kept beside it) once its products are
    recorded in MLflow: an ended trial is never restored from them (``--resume`` reports its recorded
    result again, ``Trial.restore``). Its results, params and logs stay. Best effort: a folder that
    cannot be removed is left."""
    from uml_ray.train.checkpoints import kept_checkpoints

    checkpoint = trial.checkpoint
    if checkpoint is None:
        return
    for each in [checkpoint, *kept_checkpoints(checkpoint)]:
        try:
            each.filesystem.delete_dir(each.path)
        except OSError:
            pass
