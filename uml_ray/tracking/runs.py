"""Run queries: a sweep's runs found again by their tags, and the best runs ``uml-ray best`` ranks.

MLflow filter strings quote a value in ' or " and escape neither, so the names matched here are
checked (``check_run_name``) before any run is opened under them.
"""

from __future__ import annotations

from pathlib import Path

from uml_ray.errors import UserError
from uml_ray.selection import SCORE, rankable, selection_key
from uml_ray.tracking.store import bounded_http, check_tracking_uri, client, one_line, resolve_tracking_uri
from uml_ray.tracking.tags import (
    FUSED_TRIAL_TAG,
    KIND_TAG,
    OUTCOME_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
)
from uml_ray.uri import redact

# runs read per MLflow search request when ranking (a server's page limit is far above it)
RUNS_PAGE = 1000


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
    """A string literal for an MLflow filter string: MLflow has no escapes, so the quote kind the value
    lacks."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(
        f"name ({value}) holds both ' and \"; MLflow searches cannot match it: drop one kind of quote"
    )


def is_ended(run) -> bool:
    """Whether a trial's run ended for good (finished, stopped early or pruned): not running, not failed."""
    return run.info.status != "RUNNING" and run.data.tags.get(OUTCOME_TAG) not in (None, "failed")


def every_run(mlflow_client, experiment_id: str, filter_string: str) -> list:
    """Every run of an experiment that ``filter_string`` matches, read page by page."""
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=RUNS_PAGE, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


class RunFinder:
    """The runs of one sweep in one experiment, found by their tags."""

    def __init__(self, mlflow_client, experiment_id: str, sweep: str):
        self.client = mlflow_client
        self.experiment_id = experiment_id
        self.sweep = sweep

    def _of_sweep(self) -> str:
        return f"tags.`{SWEEP_TAG}` = {quote_value(self.sweep)}"

    def _search(self, filter_string: str, max_results: int) -> list:
        return self.client.search_runs(
            [self.experiment_id], max_results=max_results, filter_string=filter_string
        )

    def _first(self, filter_string: str):
        runs = self._search(filter_string, 1)
        return runs[0] if runs else None

    def parent(self):
        """The sweep's parent run, or None."""
        return self._first(f"{self._of_sweep()} and tags.`{KIND_TAG}` = 'sweep'")

    def trial(self, trial_id: str):
        """The run of a trial (by its run key), or None."""
        return self._first(f"tags.`{TRIAL_TAG}` = {quote_value(trial_id)} and {self._of_sweep()}")

    def top_run(self, sweep: str):
        """The top run of another sweep in the experiment (its parent run, or a single training's run)."""
        return self._first(f"tags.`{SWEEP_TAG}` = {quote_value(sweep)} and tags.`{KIND_TAG}` != 'trial'")

    def trial_runs(self) -> list:
        """Every trial (or single training) run of the sweep, newest first."""
        return every_run(
            self.client, self.experiment_id, f"{self._of_sweep()} and tags.`{KIND_TAG}` != 'sweep'"
        )

    def running_trials(self) -> list:
        """The sweep's trial runs still RUNNING."""
        return self._search(
            f"{self._of_sweep()} and tags.`{KIND_TAG}` = 'trial' and attributes.status = 'RUNNING'", 1000
        )

    def ended_trials(self) -> set[str]:
        """Tune trial ids whose runs all ended (finished, stopped early or pruned; not failed): a fused
        trial's when every member's run did."""
        ended: dict[str, bool] = {}
        for run in self.trial_runs():
            trial_id = run.data.tags.get(FUSED_TRIAL_TAG) or run.data.tags.get(TRIAL_TAG, "")
            ended[trial_id] = ended.get(trial_id, True) and is_ended(run)
        return {trial_id for trial_id, done in ended.items() if done and trial_id}


def best_runs(
    uri: str, experiment: str, metric: str = SCORE, top: int = 5, sweep: str | None = None
) -> list[dict]:
    """The top ``top`` trial/training runs of an experiment (optionally one sweep) by a metric, best
    first (``ranked_runs``)."""
    return ranked_runs(uri, experiment, metric, sweep)[:top]


def ranked_runs(
    uri: str, experiment: str, metric: str = SCORE, sweep: str | None = None, trials_only: bool = False
) -> list[dict]:
    """Every finished trial/training run of an experiment (optionally one sweep; ``trials_only``: a
    sweep's trial runs, not single trainings) that can be ranked by a metric, best first by
    ``selection_key``: the metric (runs recorded before the selection score rank by best val accuracy
    in its place), then best val accuracy, then the lower best val loss. All of them, not a top few:
    the count of configs the val split cannot tell from the best needs every completed run.

    Read-only and quick to fail: a missing SQLite file is not created, an unreachable server is
    given up on within seconds; every failure is a UserError naming the URI, the experiment or the
    sweep (one that holds no run at all is named as not there).
    """
    if "`" in metric:
        raise UserError(f"metric {metric!r}: a metric name cannot hold a backtick; use e.g. best_val_acc")
    kind = f"tags.`{KIND_TAG}` = 'trial'" if trials_only else f"tags.`{KIND_TAG}` != 'sweep'"
    filters = [kind, "attributes.status = 'FINISHED'"]
    of_sweep = f"tags.`{SWEEP_TAG}` = {quote_value(sweep)}" if sweep else ""
    if sweep:
        filters.append(of_sweep)
    check_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(resolve_tracking_uri(uri)[len("sqlite:///") :]).is_file():
        raise UserError(
            f"tracking URI {redact(uri)!r}: no such SQLite file; "
            "point --tracking-uri at the store the runs were recorded in"
        )
    store = client(uri)
    runs: list = []
    try:
        with bounded_http():
            found = store.get_experiment_by_name(experiment)
            if found is None:
                names = [e.name for e in store.search_experiments()]
                raise UserError(
                    f"no MLflow experiment named '{experiment}' at {redact(uri)}; experiments there: {names}"
                )
            runs = every_run(store, found.experiment_id, " and ".join(filters))
            if not runs and sweep and not store.search_runs([found.experiment_id], of_sweep, max_results=1):
                raise UserError(f"no sweep named '{sweep}' in experiment '{experiment}' at {redact(uri)}")
    except UserError:
        raise
    except Exception as exc:  # MLflow raises many types for unreachable/unauthorised stores
        raise UserError(
            f"tracking URI {redact(uri)}: cannot query the MLflow store ({one_line(exc)}); "
            "start the server or fix --tracking-uri"
        ) from None
    runs = sorted(
        (r for r in runs if rankable(r.data.metrics, metric)),
        key=lambda r: selection_key(r.data.metrics, metric),
        reverse=True,
    )
    if not runs:
        where = f" in sweep '{sweep}'" if sweep else ""
        what = "trial run" if trials_only else "run"
        raise UserError(f"no finished {what} with metric '{metric}' in experiment '{experiment}'{where}")
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


# a run's product: its best-val weights with their config and dataset (``train/skeleton.py``)
PRODUCT = "checkpoint/best.pt"


def download_product(uri: str, run: dict, folder: str) -> str:
    """A ranked run's best-val product (``PRODUCT``) copied into ``folder``; a UserError naming the run
    when it has none (a run recorded before products were, or its artifacts were deleted)."""
    from uml_ray.tracking.store import download_artifact

    try:
        with bounded_http():
            return download_artifact(uri, run["run_id"], PRODUCT, folder)
    except Exception as exc:  # MLflow raises many types for a missing artifact or an unreachable store
        raise UserError(
            f"run {run['run_name']} ({run['run_id']}): its best-val weights ({PRODUCT}) cannot be read "
            f"from {run['artifact_uri']} ({one_line(exc)})"
        ) from None


def sweep_parent(mlflow_client, experiment: str, sweep: str):
    """A sweep's parent run in the named experiment, or None (no such experiment, or no parent run)."""
    found = mlflow_client.get_experiment_by_name(experiment)
    return None if found is None else RunFinder(mlflow_client, found.experiment_id, sweep).parent()


def sweep_metrics(uri: str, experiment: str, sweep: str) -> dict:
    """The metrics recorded on a sweep's parent run (its summary: counts, the k-fold refit); empty when
    the sweep has none."""
    store = client(uri)
    with bounded_http():
        parent = sweep_parent(store, experiment, sweep)
    return {} if parent is None else dict(parent.data.metrics)


def log_sweep_results(uri: str, experiment: str, sweep: str, metrics: dict, tags: dict) -> str | None:
    """Add ``metrics`` (at step 0) and ``tags`` to a sweep's parent run; returns its run id, or None
    when the sweep has no parent run (a single training)."""
    import time

    from uml_ray.tracking.store import metric, tag

    store = client(uri)
    with bounded_http():
        parent = sweep_parent(store, experiment, sweep)
        if parent is None:
            return None
        now = int(time.time() * 1000)
        store.log_batch(
            parent.info.run_id,
            metrics=[metric(key, value, now, 0) for key, value in metrics.items()],
            tags=[tag(key, value) for key, value in tags.items()],
        )
    return parent.info.run_id
