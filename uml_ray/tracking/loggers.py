"""The loggers: a sweep, a single training or a study written to MLflow, every write through the outbox.

One writer: the driver process holds the only ``MlflowClient`` that writes — trials report to Tune,
and the driver forwards — so a local SQLite store is never written by many processes at once.
A sweep is one parent run with one child run per trial; a retried or resumed trial finds its own
run again by its ``uml_ray.trial_id`` tag instead of opening a duplicate.
"""

from __future__ import annotations

import math
import os
import time

from uml_ray.tracking.outbox import FINAL_WAIT_S, Outbox
from uml_ray.tracking.runs import RunFinder, is_ended
from uml_ray.tracking.store import (
    client,
    default_artifact_location,
    metric,
    param,
    param_value,
    resolve_tracking_uri,
    tag,
)
from uml_ray.tracking.tags import (
    CONTINUES_TRIAL_TAG,
    KIND_TAG,
    OUTCOME_TAG,
    PARENT_TAG,
    SAMPLED_TAG,
    SEED_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    best_tag,
)
from uml_ray.uri import redact

# how long after a trial's last write its metrics may be held (``log_metrics(hold=True)``): a fused trial
# of seconds writes its validations in one batch at its end, a long run's still appear as they come
METRICS_HOLD_S = 10.0


class SweepTracker:
    """Writes one sweep (parent run + child run per trial) or one single training run to MLflow.

    Every write goes through the outbox: while the server is unreachable, writes are held in order
    (artifacts copied aside) and sent once it answers again, so a tracking outage neither stalls
    nor fails the sweep. Opening a trial's run looks for it by its tag first, so a write sent twice
    never duplicates a run.
    """

    def __init__(
        self, uri: str, experiment: str, artifact_location: str, sweep: str, single_run: bool = False
    ):
        self.uri = resolve_tracking_uri(uri)
        self.client = client(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(
                # the server records it for every reader: no credentials (the artifact store takes its own
                # from the environment)
                experiment,
                artifact_location=default_artifact_location(self.uri, redact(artifact_location)),
            )
        else:
            self.experiment_id = found.experiment_id
        self.sweep = sweep
        self.single_run = single_run
        self.parent_id: str | None = None
        self.trial_runs: dict[str, str | None] = {}  # None while the write opening the run is held
        self.last_step: dict[str, int] = {}  # per trial key: steps at or below it were logged already
        self.ended: set[str] = set()  # trial keys whose runs had ended before this driver: left as they are
        self.held: dict[str, list] = {}  # per trial key: (step, metrics) not yet sent (``log_metrics``)
        self.sent_at: dict[str, float] = {}  # per trial key: when its metrics were last sent
        self._recorded: list | None = None  # the sweep's runs recorded before this driver (``_before``)
        self.runs = RunFinder(self.client, self.experiment_id, sweep)
        self.outbox = Outbox(redact(self.uri))  # the URI its console notes name

    def close(self, wait_s: float = FINAL_WAIT_S) -> None:
        """Send what is held, waiting up to ``wait_s`` for the server; say what could not be sent."""
        for trial_id in list(self.held):
            self.send_metrics(trial_id)
        self.outbox.close(wait_s)

    def _before(self) -> list:
        """The sweep's trial runs as recorded when this driver first opened one, newest first: one query
        serves every trial's look-up (a query per trial cost more as the experiment grew). Only a
        resumed sweep's can be there: no other driver writes the sweep meanwhile."""
        if self._recorded is None:
            self._recorded = self.runs.trial_runs()
        return self._recorded

    def ended_trials(self) -> set[str]:
        """Tune trial ids whose MLflow runs all ended (finished, stopped early or pruned; not failed):
        a fused trial's when every member's run did."""
        return self.runs.ended_trials()

    def _log_batches(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        """Metrics, params and tags in as few writes as MLflow's limits per batch allow (100 params,
        100 tags, 1000 values in all): one write per value made a trial's start cost seconds."""
        metrics, params, tags = list(metrics), list(params), list(tags)
        while metrics or params or tags:
            self.client.log_batch(run_id, metrics=metrics[:800], params=params[:100], tags=tags[:100])
            metrics, params, tags = metrics[800:], params[100:], tags[100:]

    def _log_params(self, run_id: str, params: dict) -> None:
        self._log_batches(run_id, params=[param(key, value) for key, value in params.items()])

    def _create_parent(self, tags: dict, params: dict) -> None:
        """The parent run (a sweep's or a study's), named after it, with its settings as params."""
        run = self.client.create_run(self.experiment_id, run_name=self.sweep, tags=_tag_values(tags))
        self.parent_id = run.info.run_id
        self._log_params(self.parent_id, params)

    def start_sweep(self, params: dict, tags: dict | None = None) -> str | None:
        """Open (or, on resume, reopen) the sweep's parent run; None for a single training run (or while
        held)."""
        if self.single_run:
            return None

        def open_parent():
            existing = self.runs.parent()
            if existing is not None:
                self.parent_id = existing.info.run_id
                self.client.update_run(self.parent_id, status="RUNNING")
                return
            self._create_parent({SWEEP_TAG: self.sweep, KIND_TAG: "sweep", **(tags or {})}, params)

        self.outbox.send("the sweep's parent run", open_parent)
        return self.parent_id

    def start_trial(self, trial_id: str, params: dict, tags: dict | None = None) -> str | None:
        """The trial's run: found again by its tag when the trial is retried or the sweep resumed (None
        while held)."""
        if trial_id in self.trial_runs:
            return self.trial_runs[trial_id]
        self.trial_runs[trial_id] = None

        def open_run():
            existing = next((run for run in self._before() if run.data.tags.get(TRIAL_TAG) == trial_id), None)
            if existing is None and (existing := self._adopt(trial_id, params, tags or {})) is not None:
                # the same values again: its driver may have died before logging them
                self._log_params(existing.info.run_id, params)
            if existing is not None:
                run_id = existing.info.run_id
                if is_ended(existing):
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
                if "train.seed" in params:  # with the run, not its params: a driver may die before those
                    run_tags[SEED_TAG] = param_value(params["train.seed"])
                if self.parent_id:
                    run_tags[PARENT_TAG] = self.parent_id
                name = self.sweep if self.single_run else f"{self.sweep}-{trial_id}"
                run_id = self.client.create_run(
                    self.experiment_id, run_name=name, tags=_tag_values(run_tags)
                ).info.run_id
                self._log_params(run_id, params)
                self.last_step[trial_id] = -1
            self.trial_runs[trial_id] = run_id

        self.sent_at[trial_id] = time.monotonic()
        self.outbox.send(f"trial {trial_id}'s run", open_run)
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
        sampled, seed = param_value(tags[SAMPLED_TAG]), param_value(params["train.seed"])
        mine = set(self.trial_runs.values())
        orphan = next(
            (
                run
                for run in self._before()
                if run.info.status == "RUNNING"
                and run.data.tags.get(SAMPLED_TAG) == sampled
                and run.data.tags.get(SEED_TAG) == seed
                and run.info.run_id not in mine
            ),
            None,
        )
        if orphan is not None:
            run_id = orphan.info.run_id
            self.client.set_tag(run_id, CONTINUES_TRIAL_TAG, orphan.data.tags.get(TRIAL_TAG, ""))
            self.client.set_tag(run_id, TRIAL_TAG, trial_id)
            self.client.update_run(run_id, name=f"{self.sweep}-{trial_id}")
        return orphan

    def close_lost_trials(self) -> None:
        """At a sweep's end: a trial run still RUNNING belongs to a trial the sweep lost (its driver was
        killed before Tune recorded it, and no trial continued it): closed as KILLED, outcome ``lost``."""
        if self.single_run:
            return

        def close_lost():
            mine = set(self.trial_runs.values())
            for run in self.runs.running_trials():
                if run.info.run_id not in mine:
                    self.client.set_tag(run.info.run_id, OUTCOME_TAG, "lost")
                    self.client.set_terminated(run.info.run_id, status="KILLED")

        self.outbox.send("runs of lost trials", close_lost)

    def log_metrics(self, trial_id: str, metrics: dict, step: int, hold: bool = False) -> None:
        """Numeric metrics at a training step, stamped now even when held; steps already logged
        (before a retry or resume) are not repeated. ``hold``: they may wait to go in one write with the
        trial's later ones: until a call ``METRICS_HOLD_S`` or more after its last write, one not held
        (the caller's at a checkpoint, past which a resume does not report again), its end or the
        driver's close."""
        now = int(time.time() * 1000)
        batch = [
            metric(key, float(value), now, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
        ]
        self.held.setdefault(trial_id, []).append((step, batch))
        if not hold or time.monotonic() - self.sent_at.get(trial_id, 0.0) >= METRICS_HOLD_S:
            self.send_metrics(trial_id)

    def _fresh(self, trial_id: str, held: list) -> tuple[list, int]:
        """The metrics of ``held`` (step, metrics) at steps not logged yet, each step once as first held
        (a trial process killed and retried from its checkpoint reports the steps after it again, maybe
        while the first reports are still held), and the last step among them."""
        last = self.last_step.get(trial_id, -1)
        first = {}
        for step, batch in held:
            first.setdefault(step, batch)
        fresh = [value for step, batch in first.items() if step > last for value in batch]
        return fresh, max([last, *first])

    def send_metrics(self, trial_id: str) -> None:
        """Send a trial's held metrics in one write (MLflow's batch limits allowing)."""
        held = self.held.pop(trial_id, [])
        self.sent_at[trial_id] = time.monotonic()
        if not held:
            return

        def send():
            if trial_id in self.ended:
                return
            fresh, last = self._fresh(trial_id, held)
            self._log_batches(self.trial_runs[trial_id], metrics=fresh)
            self.last_step[trial_id] = last  # once sent: a write held for an outage is tried again whole

        self.outbox.send(f"trial {trial_id}'s metrics", send)

    def end_trial(
        self,
        trial_id: str,
        status: str,
        outcome: str,
        artifacts: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Close a trial run: FINISHED / KILLED (pruned or stopped) / FAILED, with its held metrics, its
        artifacts (artifact path → a local file, or a folder whose tree goes there) and ``tags`` beside
        the outcome: three writes."""
        if trial_id not in self.trial_runs:
            return
        files = {path: local for path, local in (artifacts or {}).items() if local and os.path.exists(local)}
        held = self.held.pop(trial_id, [])
        labels = [tag(key, value) for key, value in {**(tags or {}), OUTCOME_TAG: outcome}.items()]

        def close_run():
            if trial_id in self.ended:
                return
            run_id = self.trial_runs[trial_id]
            fresh, last = self._fresh(trial_id, held)
            self._log_batches(run_id, metrics=fresh, tags=labels)
            self.last_step[trial_id] = last
            for artifact_path, local in files.items():
                if os.path.isdir(local):
                    self.client.log_artifacts(run_id, local, artifact_path=artifact_path or None)
                else:
                    self.client.log_artifact(run_id, local, artifact_path=artifact_path or None)
            self.client.set_terminated(run_id, status=status)

        self.outbox.send(f"trial {trial_id}'s end", close_run)
        if self.outbox.holding:
            files.update(self.outbox.keep(files))

    def after_writes(self, what: str, action) -> None:
        """Run ``action`` once every write before it was sent (held with them while the server is
        unreachable): e.g. removing what a write recorded elsewhere. ``what`` names it if never run."""
        self.outbox.send(what, action)

    def end_sweep(self, metrics: dict, params: dict, artifacts: list[str], status: str = "FINISHED") -> None:
        """Close the parent run with the sweep's best result, study summary and plots; waits for held
        writes."""
        if self.single_run:
            return
        best = {best_tag(key): value for key, value in params.items()}
        self._end_parent("the sweep's summary", metrics, best, artifacts, status)

    def _end_parent(self, what: str, metrics: dict, tags: dict, artifacts: list[str], status: str) -> None:
        """The parent run's last write (metrics at step 0, tags, artifacts, status), then every held
        write sent: the caller's artifact files live only until it returns."""
        now = int(time.time() * 1000)
        batch = [
            metric(key, float(value), now, 0)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(float(value))
        ]
        labels = [tag(key, value) for key, value in tags.items()]
        files = [path for path in artifacts if os.path.exists(path)]

        def close_parent():
            if self.parent_id is None:
                return
            self._log_batches(self.parent_id, metrics=batch, tags=labels)
            for path in files:
                self.client.log_artifact(self.parent_id, path)
            self.client.set_terminated(self.parent_id, status=status)

        self.outbox.send(what, close_parent)
        self.close()


def _tag_values(tags: dict) -> dict[str, str]:
    """Tags as MLflow stores them (``param_value``: bounded strings, every URI redacted)."""
    return {key: param_value(value) for key, value in tags.items()}
