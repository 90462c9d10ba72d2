"""MLflow: runs, params, metrics, artifacts and best-config queries (the only module that imports MLflow).

One writer: the driver process holds the only ``MlflowClient`` that writes — trials report to Tune,
and the driver forwards — so a local SQLite store is never written by many processes at once.
A sweep is one parent run with one child run per trial; a retried or resumed trial finds its own
run again by its ``uml_ray.trial_id`` tag instead of opening a duplicate.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from uml_ray.errors import UserError

SWEEP_TAG = "uml_ray.sweep"
TRIAL_TAG = "uml_ray.trial_id"
KIND_TAG = "uml_ray.kind"
OUTCOME_TAG = "uml_ray.outcome"
PARENT_TAG = "mlflow.parentRunId"


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute (trials and later commands run elsewhere)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    if "://" not in uri:
        return os.path.abspath(uri)
    return uri


def default_artifact_location(uri: str, artifact_location: str) -> str | None:
    """Artifacts beside a SQLite store (``./mlartifacts``) unless configured."""
    if artifact_location:
        return artifact_location
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).resolve().parent.joinpath("mlartifacts").as_uri()
    return None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve_tracking_uri(uri))


def _clean(value):
    """MLflow params are strings of bounded length; metrics are finite floats."""
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text[:6000]


def check_tracking(uri: str, experiment: str) -> None:
    """Reach the tracking store before any cluster work (a typo'd server URI fails here, clearly)."""
    try:
        _client(uri).get_experiment_by_name(experiment)
    except Exception as exc:  # MLflow raises many types for unreachable/unauthorised stores
        raise UserError(f"tracking.uri={uri}: cannot reach the MLflow store ({type(exc).__name__}: {str(exc)[:300]})") from None


class SweepTracker:
    """Writes one sweep (parent run + child run per trial) or one single training run to MLflow."""

    def __init__(self, uri: str, experiment: str, artifact_location: str, sweep: str, single_run: bool = False):
        self.uri = resolve_tracking_uri(uri)
        self.client = _client(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=default_artifact_location(self.uri, artifact_location)
            )
        else:
            self.experiment_id = found.experiment_id
        self.sweep = sweep
        self.single_run = single_run
        self.parent_id: str | None = None
        self.trial_runs: dict[str, str] = {}
        self.last_step: dict[str, int] = {}

    def _find(self, filter_string: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1)
        return runs[0] if runs else None

    def start_sweep(self, params: dict, tags: dict | None = None) -> str | None:
        """Open (or, on resume, reopen) the sweep's parent run; None for a single training run."""
        if self.single_run:
            return None
        existing = self._find(f"tags.`{SWEEP_TAG}` = '{self.sweep}' and tags.`{KIND_TAG}` = 'sweep'")
        if existing is not None:
            self.parent_id = existing.info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
            return self.parent_id
        run = self.client.create_run(
            self.experiment_id, run_name=self.sweep, tags={SWEEP_TAG: self.sweep, KIND_TAG: "sweep", **(tags or {})}
        )
        self.parent_id = run.info.run_id
        for key, value in params.items():
            self.client.log_param(self.parent_id, key, _clean(value))
        return self.parent_id

    def start_trial(self, trial_id: str, params: dict, tags: dict | None = None) -> str:
        """The trial's run: found again by its tag when the trial is retried or the sweep resumed."""
        if trial_id in self.trial_runs:
            return self.trial_runs[trial_id]
        existing = self._find(f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{SWEEP_TAG}` = '{self.sweep}'")
        if existing is not None:
            run_id = existing.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            history = existing.data.metrics.get("step")
            self.last_step[run_id] = int(history) if history is not None else -1
        else:
            run_tags = {TRIAL_TAG: trial_id, SWEEP_TAG: self.sweep, KIND_TAG: "train" if self.single_run else "trial", **(tags or {})}
            if self.parent_id:
                run_tags[PARENT_TAG] = self.parent_id
            name = self.sweep if self.single_run else f"{self.sweep}-{trial_id}"
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=run_tags).info.run_id
            for key, value in params.items():
                self.client.log_param(run_id, key, _clean(value))
            self.last_step[run_id] = -1
        self.trial_runs[trial_id] = run_id
        return run_id

    def log_metrics(self, trial_id: str, metrics: dict, step: int) -> None:
        """Numeric metrics at a training step; steps already logged before a resume are not repeated."""
        run_id = self.trial_runs[trial_id]
        if step <= self.last_step.get(run_id, -1):
            return
        self.last_step[run_id] = step
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
        ]
        self.client.log_batch(run_id, metrics=batch)

    def end_trial(self, trial_id: str, status: str, outcome: str, artifacts: dict[str, str] | None = None) -> None:
        """Close a trial run: FINISHED / KILLED (pruned or stopped) / FAILED, with its artifacts."""
        run_id = self.trial_runs.get(trial_id)
        if run_id is None:
            return
        for artifact_path, local in (artifacts or {}).items():
            if local and os.path.exists(local):
                self.client.log_artifact(run_id, local, artifact_path=artifact_path or None)
        self.client.set_tag(run_id, OUTCOME_TAG, outcome)
        self.client.set_terminated(run_id, status=status)

    def end_sweep(self, metrics: dict, params: dict, artifacts: list[str], status: str = "FINISHED") -> None:
        """Close the parent run with the sweep's best result, study summary and plots."""
        if self.parent_id is None:
            return
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}
        if clean:
            from mlflow.entities import Metric
            import time

            now = int(time.time() * 1000)
            self.client.log_batch(self.parent_id, metrics=[Metric(k, v, now, 0) for k, v in clean.items()])
        for key, value in params.items():
            self.client.set_tag(self.parent_id, f"uml_ray.best.{key}", _clean(value))
        for path in artifacts:
            self.client.log_artifact(self.parent_id, path)
        self.client.set_terminated(self.parent_id, status=status)


def best_runs(uri: str, experiment: str, metric: str = "best_val_acc", top: int = 5, sweep: str | None = None) -> list[dict]:
    """The top trial/training runs of an experiment (optionally one sweep) by a metric, best first."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in client.search_experiments()]
        raise UserError(f"no MLflow experiment named '{experiment}' at {uri}; experiments there: {names}")
    filters = [f"tags.`{KIND_TAG}` != 'sweep'", "attributes.status = 'FINISHED'"]
    if sweep:
        filters.append(f"tags.`{SWEEP_TAG}` = '{sweep}'")
    runs = client.search_runs(
        [found.experiment_id], filter_string=" and ".join(filters), order_by=[f"metrics.`{metric}` DESC", "metrics.`best_val_loss` ASC"], max_results=max(top, 1) * 4
    )
    runs = [r for r in runs if metric in r.data.metrics][:top]
    if not runs:
        where = f" in sweep '{sweep}'" if sweep else ""
        raise UserError(f"no finished run with metric '{metric}' in experiment '{experiment}'{where}")
    return [
        {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "sweep": r.data.tags.get(SWEEP_TAG, ""),
            "trial_id": r.data.tags.get(TRIAL_TAG, ""),
            "metrics": dict(r.data.metrics),
            "params": dict(r.data.params),
            "tags": dict(r.data.tags),
            "artifact_uri": r.info.artifact_uri,
        }
        for r in runs
    ]


def download_artifact(uri: str, run_id: str, path: str, dst: str) -> str:
    """Fetch one artifact of a run to a local folder; returns the local path."""
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst, tracking_uri=resolve_tracking_uri(uri))
