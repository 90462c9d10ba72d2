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
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from uml_ray.errors import UserError

SWEEP_TAG = "uml_ray.sweep"
TRIAL_TAG = "uml_ray.trial_id"
KIND_TAG = "uml_ray.kind"
OUTCOME_TAG = "uml_ray.outcome"
SAMPLED_TAG = "uml_ray.sampled"
SEED_TAG = "uml_ray.seed"
PARENT_TAG = "mlflow.parentRunId"
STUDY_TAG = "uml_ray.study"


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute (trials and later commands run elsewhere)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix) :])
    if "://" not in uri:
        return os.path.abspath(uri)
    return uri


def default_artifact_location(uri: str, artifact_location: str) -> str | None:
    """Artifacts beside a SQLite store (``./mlartifacts``) unless configured."""
    if artifact_location:
        return artifact_location
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).resolve().parent.joinpath("mlartifacts").as_uri()
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
        raise UserError(
            f"tracking.uri={uri}: cannot reach the MLflow store ({_one_line(exc)}); "
            "start the server or fix tracking.uri"
        ) from None


# What MLflow's tracking-store registry accepts; its file store (a plain folder, file:) is refused
# by MLflow 3 unless MLFLOW_ALLOW_FILE_STORE is set.
TRACKING_SCHEMES = (
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "http",
    "https",
    "databricks",
    "databricks-uc",
    "uc",
)
# the pre-launch checks and `uml-ray best` give up on an unreachable server in seconds; MLflow's
# defaults (7 retries with backoff, 120 s timeout) took over 4 minutes to say so
CHECK_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# a sweep's writes give up on an unreachable server within seconds too, and are held and sent
# later (SweepTracker): waiting out MLflow's minutes of backoff would stall the driver and with
# it every trial waiting for its report to be taken
WRITE_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
# how often held writes try an unreachable server again, and how long the last ones wait for it
RETRY_WRITES_S = 5.0
FINAL_WAIT_S = 300.0


@contextlib.contextmanager
def bounded_http(settings: dict = CHECK_HTTP):
    """MLflow HTTP requests inside the block retry and time out as ``settings`` say (by default: once,
    10 s; MLflow reads these variables at every request); the variables are restored afterwards."""
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
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
        raise UserError(
            f"tracking URI {uri!r} is a folder (MLflow's file store), which MLflow 3 no longer accepts; {hint}"
        )
    raise UserError(
        f"tracking URI {uri!r}: unsupported scheme '{scheme}'; {hint} "
        f"(MLflow also takes postgresql://, mysql://, mssql:// and databricks)"
    )


def _check_sqlite_uri(uri: str, hint: str) -> None:
    """A SQLite store needs a file path whose folder exists (SQLAlchemy's own error is a page of text)."""
    path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        raise UserError(f"tracking URI {uri!r} names no file: an in-memory store loses every run; {hint}")
    folder = Path(resolve_tracking_uri(uri)[len("sqlite:///") :]).parent
    if not folder.is_dir():
        raise UserError(
            f"tracking URI {uri!r}: folder {folder} does not exist; create it or point the URI elsewhere"
        )


def _one_line(exc: Exception) -> str:
    """An exception as one short line: the OS error under MLflow's HTTP wrapping when there is one
    (e.g. "Connection refused"), else its type and the start of its message."""
    text = " ".join(str(exc).split())
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text) or re.search(r"(Read timed out|timed out)", text)
    return found.group(1).strip() if found else f"{type(exc).__name__}: {text[:200]}"


def is_unreachable(exc: BaseException) -> bool:
    """Whether an MLflow error means the server did not answer (refused, timed out, kept failing with
    5xx/429): worth sending again later, unlike a refused request. MLflow re-raises these as a bare
    MlflowException, the requests error only in ``__context__``."""
    import requests

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(
            exc,
            (
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                requests.exceptions.RetryError,
            ),
        ):
            return True
        if "Max retries exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def check_run_name(name: str) -> None:
    """Refuse a run or sweep name that cannot be a folder or be matched in an MLflow filter string.

    A name becomes a folder under ``tracking.storage_path`` and a tag value matched in MLflow
    searches, where a value is quoted in ' or " and neither can be escaped: a name may hold
    one kind of quote, not both.
    """
    if "'" in name and '"' in name:
        raise UserError(
            f"run name ({name}) holds both ' and \"; MLflow searches cannot match it: drop one kind of quote"
        )
    bad = sorted({c for c in name if c in "/\\" or not c.isprintable()})
    if bad or name in (".", ".."):
        raise UserError(
            f"run name {name!r} cannot be a folder name{f' (it holds {bad})' if bad else ''}; "
            "use letters, digits, '-', '_' or '.'"
        )


def quote_value(value: str) -> str:
    """A string literal for an MLflow filter string: MLflow has no escapes, so the quote kind the value lacks."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(
        f"name ({value}) holds both ' and \"; MLflow searches cannot match it: drop one kind of quote"
    )


class SweepTracker:
    """Writes one sweep (parent run + child run per trial) or one single training run to MLflow.

    Every write goes through ``_write``: while the server is unreachable, writes are held in order
    (artifacts copied aside) and sent once it answers again, so a tracking outage neither stalls
    nor fails the sweep. Opening a trial's run looks for it by its tag first, so a write sent twice
    never duplicates a run.
    """

    def __init__(
        self, uri: str, experiment: str, artifact_location: str, sweep: str, single_run: bool = False
    ):
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
        self.trial_runs: dict[str, str | None] = {}  # None while the write opening the run is held
        self.last_step: dict[str, int] = {}  # per trial key: steps at or below it were logged already
        self.ended: set[str] = set()  # trial keys whose runs had ended before this driver: left as they are
        self._held: list[tuple[str, object]] = []  # (what, write) not yet sent, in order
        self._retry_at = 0.0
        self._spool: str | None = None  # copies of held artifacts (the caller's files are temporary)

    def _write(self, what: str, write) -> None:
        """Send ``write`` (a no-argument call) after any held ones; hold it while the server is unreachable."""
        self._held.append((what, write))
        self.flush()

    def flush(self, wait_s: float = 0.0) -> bool:
        """Send held writes in order, waiting up to ``wait_s`` for an unreachable server; True when none is left.

        A write that fails for another reason than an unreachable server is dropped and its error raised.
        """
        deadline = time.monotonic() + wait_s
        while self._held:
            pause = self._retry_at - time.monotonic()
            if pause > 0:
                if time.monotonic() + pause > deadline:
                    return False
                time.sleep(pause)
            what, write = self._held[0]
            try:
                with bounded_http(WRITE_HTTP):
                    write()
            except Exception as exc:  # noqa: BLE001 - MLflow raises many types; is_unreachable sorts them
                if not is_unreachable(exc):
                    self._held.pop(0)
                    raise
                if not self._retry_at:
                    _note(
                        f"MLflow at {self.uri} is unreachable ({_one_line(exc)}); holding its writes "
                        f"and trying again every {RETRY_WRITES_S:g} s"
                    )
                self._retry_at = time.monotonic() + RETRY_WRITES_S
                continue
            self._held.pop(0)
            if self._retry_at and not self._held:
                _note(f"MLflow at {self.uri} answers again: held writes sent")
                self._retry_at = 0.0
        if self._spool:
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None
        return True

    def close(self, wait_s: float = FINAL_WAIT_S) -> None:
        """Send what is held, waiting up to ``wait_s`` for the server; say what could not be sent."""
        if not self.flush(wait_s):
            _note(
                f"MLflow at {self.uri} stayed unreachable for {wait_s:g} s: {len(self._held)} write(s) not recorded "
                f"({', '.join(sorted({what for what, _ in self._held}))})"
            )

    def _spooled(self, paths: dict[str, str]) -> dict[str, str]:
        """Copies of local files that a held write will send after their owner deleted them."""
        if self._spool is None:
            self._spool = tempfile.mkdtemp(prefix="uml-ray-mlflow-")
        copies = {}
        for key, path in paths.items():
            folder = tempfile.mkdtemp(dir=self._spool)
            copies[key] = shutil.copy(path, folder)
        return copies

    def _find(self, filter_string: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1)
        return runs[0] if runs else None

    def _log_params(self, run_id: str, params: dict) -> None:
        """All params in a few batched writes (one write per param made a trial's start cost seconds)."""
        from mlflow.entities import Param

        items = [Param(key, _clean(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit of params per batch
            self.client.log_batch(run_id, params=items[start : start + 100])

    def start_sweep(self, params: dict, tags: dict | None = None) -> str | None:
        """Open (or, on resume, reopen) the sweep's parent run; None for a single training run (or while held)."""
        if self.single_run:
            return None

        def open_parent():
            existing = self._find(
                f"tags.`{SWEEP_TAG}` = {quote_value(self.sweep)} and tags.`{KIND_TAG}` = 'sweep'"
            )
            if existing is not None:
                self.parent_id = existing.info.run_id
                self.client.update_run(self.parent_id, status="RUNNING")
                return
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.sweep,
                tags={SWEEP_TAG: self.sweep, KIND_TAG: "sweep", **(tags or {})},
            )
            self.parent_id = run.info.run_id
            self._log_params(self.parent_id, params)

        self._write("the sweep's parent run", open_parent)
        return self.parent_id

    def start_trial(self, trial_id: str, params: dict, tags: dict | None = None) -> str | None:
        """The trial's run: found again by its tag when the trial is retried or the sweep resumed (None while held)."""
        if trial_id in self.trial_runs:
            return self.trial_runs[trial_id]
        self.trial_runs[trial_id] = None

        def open_run():
            existing = self._find(
                f"tags.`{TRIAL_TAG}` = {quote_value(trial_id)} and tags.`{SWEEP_TAG}` = {quote_value(self.sweep)}"
            )
            adopted = existing is None and (existing := self._adopt(trial_id, params, tags or {})) is not None
            if adopted:
                self._log_params(
                    existing.info.run_id, params
                )  # the same values again: its driver may have died first
            if existing is not None:
                run_id = existing.info.run_id
                if existing.info.status != "RUNNING" and existing.data.tags.get(OUTCOME_TAG) not in (
                    None,
                    "failed",
                ):
                    self.ended.add(trial_id)  # a resumed sweep's trial that had ended: it only reports again
                else:
                    self.client.update_run(run_id, status="RUNNING")
                history = existing.data.metrics.get("step")
                self.last_step[trial_id] = int(history) if history is not None else -1
            else:
                run_tags = {
                    TRIAL_TAG: trial_id,
                    SWEEP_TAG: self.sweep,
                    KIND_TAG: "train" if self.single_run else "trial",
                    **(tags or {}),
                }
                if (
                    "train.seed" in params
                ):  # with the run, not its params: a driver may die before those are logged
                    run_tags[SEED_TAG] = _clean(params["train.seed"])
                if self.parent_id:
                    run_tags[PARENT_TAG] = self.parent_id
                name = self.sweep if self.single_run else f"{self.sweep}-{trial_id}"
                run_id = self.client.create_run(self.experiment_id, run_name=name, tags=run_tags).info.run_id
                self._log_params(run_id, params)
                self.last_step[trial_id] = -1
            self.trial_runs[trial_id] = run_id

        self._write(f"trial {trial_id}'s run", open_run)
        return self.trial_runs[trial_id]

    def _adopt(self, trial_id: str, params: dict, tags: dict):
        """The run of a trial the driver opened just before it was killed, when Tune's last snapshot
        missed that trial: on ``--resume`` the restored searcher suggests the same config again
        under a new trial id, and that trial continues the run instead of duplicating it.

        Matched by sampled config and seed (the same seed gives the same metrics at every step);
        never a run this driver opened itself.
        """
        if SAMPLED_TAG not in tags or "train.seed" not in params or self.single_run:
            return None
        try:
            sampled = quote_value(tags[SAMPLED_TAG])
        except UserError:  # a config holding both quote kinds cannot be matched
            return None
        runs = self.client.search_runs(
            [self.experiment_id],
            max_results=50,
            filter_string=f"tags.`{SWEEP_TAG}` = {quote_value(self.sweep)} and tags.`{SAMPLED_TAG}` = {sampled} "
            f"and tags.`{SEED_TAG}` = '{_clean(params['train.seed'])}' and attributes.status = 'RUNNING'",
        )
        mine = set(self.trial_runs.values())
        orphan = next((run for run in runs if run.info.run_id not in mine), None)
        if orphan is not None:
            self.client.set_tag(
                orphan.info.run_id, "uml_ray.continues_trial", orphan.data.tags.get(TRIAL_TAG, "")
            )
            self.client.set_tag(orphan.info.run_id, TRIAL_TAG, trial_id)
            self.client.update_run(orphan.info.run_id, name=f"{self.sweep}-{trial_id}")
        return orphan

    def ended_trials(self) -> set[str]:
        """Tune trial ids whose MLflow runs all ended (finished, stopped early or pruned; not failed):
        a fused trial's when every member's run did."""
        runs = self.client.search_runs(
            [self.experiment_id],
            max_results=10000,
            filter_string=f"tags.`{SWEEP_TAG}` = {quote_value(self.sweep)} and tags.`{KIND_TAG}` != 'sweep'",
        )
        ended: dict[str, bool] = {}
        for run in runs:
            trial_id = run.data.tags.get("uml_ray.fused_trial") or run.data.tags.get(TRIAL_TAG, "")
            done = run.info.status != "RUNNING" and run.data.tags.get(OUTCOME_TAG) not in (None, "failed")
            ended[trial_id] = ended.get(trial_id, True) and done
        return {trial_id for trial_id, done in ended.items() if done and trial_id}

    def close_lost_trials(self) -> None:
        """At a sweep's end: a trial run still RUNNING belongs to a trial the sweep lost (its driver was
        killed before Tune recorded it, and no trial continued it): closed as KILLED, outcome ``lost``."""
        if self.single_run:
            return

        def close_lost():
            mine = set(self.trial_runs.values())
            running = f"tags.`{SWEEP_TAG}` = {quote_value(self.sweep)} and tags.`{KIND_TAG}` = 'trial' and attributes.status = 'RUNNING'"
            runs = self.client.search_runs([self.experiment_id], max_results=1000, filter_string=running)
            for run in runs:
                if run.info.run_id not in mine:
                    self.client.set_tag(run.info.run_id, OUTCOME_TAG, "lost")
                    self.client.set_terminated(run.info.run_id, status="KILLED")

        self._write("runs of lost trials", close_lost)

    def log_metrics(self, trial_id: str, metrics: dict, step: int) -> None:
        """Numeric metrics at a training step, stamped now even when held; steps already logged
        (before a retry or resume) are not repeated."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
        ]

        def send():
            if step <= self.last_step.get(trial_id, -1) or trial_id in self.ended:
                return
            self.client.log_batch(self.trial_runs[trial_id], metrics=batch)
            self.last_step[trial_id] = step

        self._write(f"trial {trial_id}'s metrics", send)

    def end_trial(
        self, trial_id: str, status: str, outcome: str, artifacts: dict[str, str] | None = None
    ) -> None:
        """Close a trial run: FINISHED / KILLED (pruned or stopped) / FAILED, with its artifacts."""
        if trial_id not in self.trial_runs:
            return
        files = {path: local for path, local in (artifacts or {}).items() if local and os.path.exists(local)}

        def close_run():
            if trial_id in self.ended:
                return
            run_id = self.trial_runs[trial_id]
            for artifact_path, local in files.items():
                self.client.log_artifact(run_id, local, artifact_path=artifact_path or None)
            self.client.set_tag(run_id, OUTCOME_TAG, outcome)
            self.client.set_terminated(run_id, status=status)

        self._write(f"trial {trial_id}'s end", close_run)
        if self._held:
            files.update(self._spooled(files))

    def end_sweep(self, metrics: dict, params: dict, artifacts: list[str], status: str = "FINISHED") -> None:
        """Close the parent run with the sweep's best result, study summary and plots; waits for held writes."""
        if self.single_run:
            return
        clean = {
            k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))
        }
        files = [path for path in artifacts if os.path.exists(path)]

        def close_parent():
            if self.parent_id is None:
                return
            if clean:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                self.client.log_batch(
                    self.parent_id, metrics=[Metric(k, v, now, 0) for k, v in clean.items()]
                )
            for key, value in params.items():
                self.client.set_tag(self.parent_id, f"uml_ray.best.{key}", _clean(value))
            for path in files:
                self.client.log_artifact(self.parent_id, path)
            self.client.set_terminated(self.parent_id, status=status)

        self._write("the sweep's summary", close_parent)
        self.close()  # the caller's artifact files live only until it returns


def _note(line: str) -> None:
    print(f"[uml-ray] {line}", file=sys.stderr, flush=True)


class StudyTracker(SweepTracker):
    """A study (``uml-ray compare``, ``uml-ray study``): one parent run over several sweeps. Each
    sweep's parent run (or a single training's run) becomes its child through ``mlflow.parentRunId``,
    so the MLflow UI nests study → sweep → trial."""

    def start_study(self, kind: str, params: dict) -> str:
        """Open the study's run (tag ``uml_ray.kind=<kind>``) with its settings as params."""
        run = self.client.create_run(
            self.experiment_id, run_name=self.sweep, tags={STUDY_TAG: self.sweep, KIND_TAG: kind}
        )
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, params)
        return self.parent_id

    def adopt(self, sweep: str) -> None:
        """Make the top run of ``sweep`` (its sweep parent run, or a single training's run) a child of the study."""
        found = self._find(f"tags.`{SWEEP_TAG}` = {quote_value(sweep)} and tags.`{KIND_TAG}` != 'trial'")
        if found is None:
            raise UserError(f"no MLflow run of sweep '{sweep}' in the experiment; the study cannot record it")
        self.client.set_tag(found.info.run_id, PARENT_TAG, self.parent_id)
        self.client.set_tag(found.info.run_id, STUDY_TAG, self.sweep)

    def end_study(self, metrics: dict, tags: dict, artifacts: list[str], status: str = "FINISHED") -> None:
        """Close the study's run with its summary metrics, tags and artifacts (tables, plots)."""
        import time

        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        clean = {
            k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))
        }
        self.client.log_batch(
            self.parent_id,
            metrics=[Metric(k, v, now, 0) for k, v in clean.items()],
            tags=[RunTag(k, _clean(v)) for k, v in tags.items()],
        )
        for path in artifacts:
            self.client.log_artifact(self.parent_id, path)
        self.client.set_terminated(self.parent_id, status=status)


def best_runs(
    uri: str, experiment: str, metric: str = "best_val_acc", top: int = 5, sweep: str | None = None
) -> list[dict]:
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
    if uri.startswith("sqlite:///") and not Path(resolve_tracking_uri(uri)[len("sqlite:///") :]).is_file():
        raise UserError(
            f"tracking URI {uri!r}: no such SQLite file; point --tracking-uri at the store the runs were recorded in"
        )
    client = _client(uri)
    try:
        with bounded_http():
            found = client.get_experiment_by_name(experiment)
            if found is None:
                names = [e.name for e in client.search_experiments()]
                raise UserError(
                    f"no MLflow experiment named '{experiment}' at {uri}; experiments there: {names}"
                )
            runs = client.search_runs(
                [found.experiment_id],
                filter_string=" and ".join(filters),
                order_by=[f"metrics.`{metric}` DESC", "metrics.`best_val_loss` ASC"],
                max_results=max(top, 1) * 4,
            )
    except UserError:
        raise
    except Exception as exc:  # MLflow raises many types for unreachable/unauthorised stores
        raise UserError(
            f"tracking URI {uri}: cannot query the MLflow store ({_one_line(exc)}); "
            "start the server or fix --tracking-uri"
        ) from None
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

    return mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=path, dst_path=dst, tracking_uri=resolve_tracking_uri(uri)
    )
