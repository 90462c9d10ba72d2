"""Reading what Tune saved of a sweep: where it lives, its trial table, ended trials' results, checkpoints.

Ray-free at import. Every storage URI is opened through ``uri.filesystem_for``.
"""

from __future__ import annotations

import glob
import json
import os

from uml_ray.train.context import BEST_FILE
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


def ended_results(plan: RunPlan, name: str, path: str) -> dict[str, dict]:
    """On ``--resume``: the last result of every trial MLflow recorded as ended (finished, stopped
    early or pruned), by trial id. Tune snapshots the sweep every ~10 s, so a driver killed soon
    after a trial ended leaves it running in the snapshot; without this it would train again."""
    from pyarrow import fs as pafs
    from ray.tune.result import AUTO_RESULT_KEYS

    from uml_ray.tracking.loggers import SweepTracker

    tracking = plan.cfg.tracking
    ended = SweepTracker(tracking.uri, tracking.experiment, tracking.artifact_location, name).ended_trials()
    if not ended:
        return {}
    filesystem, base = filesystem_for(path)
    folders = [
        info.path
        for info in filesystem.get_file_info(pafs.FileSelector(base))
        if info.type == pafs.FileType.Directory
    ]
    tune_keys = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint"}
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
                results[trial_id] = {k: v for k, v in json.loads(lines[-1]).items() if k not in tune_keys}
    return results


def fetch_best_weights(trial, last: dict, storage: str, folder: str) -> str | None:
    """The trial's best-val weights file from its latest checkpoint (inline or Ray Train)."""
    import ray.train

    checkpoint = trial.checkpoint
    if last.get("checkpoint_path"):
        filesystem = filesystem_for(storage)[0] if is_remote(storage) else None
        checkpoint = ray.train.Checkpoint(last["checkpoint_path"], filesystem=filesystem)
    if checkpoint is None:
        return None
    local = checkpoint.to_directory(os.path.join(folder, "checkpoint"))
    best = os.path.join(local, BEST_FILE)
    return best if os.path.exists(best) else None
