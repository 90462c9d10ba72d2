"""MLflow: runs, params, metrics, artifacts and best-config queries (the only module that imports MLflow).

One writer: the driver process holds the only ``MlflowClient`` that writes — trials report to Tune,
and the driver forwards — so a local SQLite store is never written by many processes at once.
A sweep is one parent run with one child run per trial; a retried or resumed trial finds its own
run again by its ``uml_ray.trial_id`` tag instead of opening a duplicate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import urllib.parse
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
    """Reach the tracking store before any cluster work (a typo'd server URI fails here, clearly, within seconds)."""
    check_tracking_uri(uri)
    try:
        with bounded_http(), _quiet_store_creation():
            _client(uri).get_experiment_by_name(experiment)
    except Exception as exc:  # MLflow raises many types for unreachable/unauthorised stores
        raise UserError(f"tracking.uri={uri}: cannot reach the MLflow store ({_one_line(exc)}); "
                        "start the server or fix tracking.uri") from None


# What MLflow's tracking-store registry accepts; its file store (a plain folder, file:) is refused
# by MLflow 3 unless MLFLOW_ALLOW_FILE_STORE is set.
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc")
# the pre-launch checks and `uml-ray best` give up on an unreachable server in seconds; MLflow's
# defaults (7 retries with backoff, 120 s timeout) took over 4 minutes to say so
CHECK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def bounded_http():
    """MLflow HTTP requests inside the block retry once and time out after 10 s (MLflow reads these
    variables at every request); the variables are restored afterwards, so a running sweep keeps
    MLflow's patient defaults."""
    saved = {key: os.environ.get(key) for key in CHECK_HTTP}
    os.environ.update(CHECK_HTTP)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_store_creation():
    """Hide MLflow's "Creating initial MLflow database tables..." lines: the check may create an empty
    SQLite store, and a refusal that follows must still be the only line on stderr."""
    logger = logging.getLogger("mlflow.store.db.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_tracking_uri(uri: str) -> None:
    """Refuse a tracking URI MLflow cannot use, naming the supported schemes (MLflow's own errors speak of
    the model registry or the file store's maintenance mode)."""
    scheme = urllib.parse.urlparse(uri).scheme.lower().split("+")[0]  # postgresql+psycopg2 is postgresql
    hint = "use sqlite:///path/to/mlflow.db (a local file) or http(s)://host:port (an MLflow server)"
    if uri == "databricks" or scheme in TRACKING_SCHEMES:
        if scheme == "sqlite":
            _check_sqlite_uri(uri, hint)
        return
    if scheme in ("", "file"):
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
            return
        raise UserError(f"tracking URI {uri!r} is a folder (MLflow's file store), which MLflow 3 no longer accepts; {hint}")
    raise UserError(f"tracking URI {uri!r}: unsupported scheme '{scheme}'; {hint} "
                    f"(MLflow also takes postgresql://, mysql://, mssql:// and databricks)")


def _check_sqlite_uri(uri: str, hint: str) -> None:
    """A SQLite store needs a file path whose folder exists (SQLAlchemy's own error is a page of text)."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        raise UserError(f"tracking URI {uri!r} names no file: an in-memory store loses every run; {hint}")
    folder = Path(resolve_tracking_uri(uri)[len("sqlite:///"):]).parent
    if not folder.is_dir():
        raise UserError(f"tracking URI {uri!r}: folder {folder} does not exist; create it or point the URI elsewhere")


def _one_line(exc: Exception) -> str:
    """An exception as one short line: the OS error under MLflow's HTTP wrapping when there is one
    (e.g. "Connection refused"), else its type and the start of its message."""
    text = " ".join(str(exc).split())
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(r"(Read timed out|timed out)", text)
    return found.group(1).strip() if found else f"{type(exc).__name__}: {text[:200]}"


def check_run_name(name: str) -> None:
    """Refuse a run or sweep name that cannot be a folder or be matched in an MLflow filter string.

    A name becomes a folder under ``tracking.storage_path`` and a tag value matched in MLflow
    searches, where a value is quoted in ' or " and neither can be escaped: a name may hold
    one kind of quote, not both.
    """
    if "'" in name and '"' in name:
        raise UserError(f"run name ({name}) holds both ' and \"; MLflow searches cannot match it: drop one kind of quote")
    bad = sorted({c for c in name if c in "/\\" or not c.isprintable()})
    if bad or name in (".", ".."):
        raise UserError(f"run name {name!r} cannot be a folder name{f' (it holds {bad})' if bad else ''}; "
                        "use letters, digits, '-', '_' or '.'")


def quote_value(value: str) -> str:
    """A string literal for an MLflow filter string: MLflow has no escapes, so the quote kind the value lacks."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(f"name ({value}) holds both ' and \"; MLflow searches cannot match it: drop one kind of quote")


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

    def _log_params(self, run_id: str, params: dict) -> None:
        """All params in a few batched writes (one write per param made a trial's start cost seconds)."""
        from mlflow.entities import Param

        items = [Param(key, _clean(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit of params per batch
            self.client.log_batch(run_id, params=items[start:start + 100])

    def start_sweep(self, params: dict, tags: dict | None = None) -> str | None:
        """Open (or, on resume, reopen) the sweep's parent run; None for a single training run."""
        if self.single_run:
            return None
        existing = self._find(f"tags.`{SWEEP_TAG}` = {quote_value(self.sweep)} and tags.`{KIND_TAG}` = 'sweep'")
        if existing is not None:
            self.parent_id = existing.info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
            return self.parent_id
        run = self.client.create_run(
            self.experiment_id, run_name=self.sweep, tags={SWEEP_TAG: self.sweep, KIND_TAG: "sweep", **(tags or {})}
        )
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, params)
        return self.parent_id

    def start_trial(self, trial_id: str, params: dict, tags: dict | None = None) -> str:
        """The trial's run: found again by its tag when the trial is retried or the sweep resumed."""
        if trial_id in self.trial_runs:
            return self.trial_runs[trial_id]
        existing = self._find(f"tags.`{TRIAL_TAG}` = {quote_value(trial_id)} and tags.`{SWEEP_TAG}` = {quote_value(self.sweep)}")
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
            self._log_params(run_id, params)
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
    """The top trial/training runs of an experiment (optionally one sweep) by a metric, best first.

    Read-only and quick to fail: a missing SQLite file is not created, an unreachable server is
    given up on within seconds; every failure is a UserError naming the URI.
    """
    if "`" in metric:
        raise UserError(f"metric {metric!r}: a metric name cannot hold a backtick; use e.g. best_val_acc")
    filters = [f"tags.`{KIND_TAG}` != 'sweep'", "attributes.status = 'FINISHED'"]
    if sweep:
        filters.append(f"tags.`{SWEEP_TAG}` = {quote_value(sweep)}")
    check_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(resolve_tracking_uri(uri)[len("sqlite:///"):]).is_file():
        raise UserError(f"tracking URI {uri!r}: no such SQLite file; point --tracking-uri at the store the runs were recorded in")
    client = _client(uri)
    try:
        with bounded_http():
            found = client.get_experiment_by_name(experiment)
            if found is None:
                names = [e.name for e in client.search_experiments()]
                raise UserError(f"no MLflow experiment named '{experiment}' at {uri}; experiments there: {names}")
            runs = client.search_runs(
                [found.experiment_id], filter_string=" and ".join(filters),
                order_by=[f"metrics.`{metric}` DESC", "metrics.`best_val_loss` ASC"], max_results=max(top, 1) * 4
            )
    except UserError:
        raise
    except Exception as exc:  # MLflow raises many types for unreachable/unauthorised stores
        raise UserError(f"tracking URI {uri}: cannot query the MLflow store ({_one_line(exc)}); "
                        "start the server or fix --tracking-uri") from None
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
