"""Trial events → MLflow, from the driver (the one writer), and → the sweep's progress display.

Each event is one line of the sweep's events log; the console shows a status line
(``driver/progress.py``) and, at once, failures and tracking errors.

Ray-free: ``driver/callback.py`` hands it Tune's trial objects, and ``driver/tune_state.py``
(``fetch_best_weights``) fetches checkpoints for it.
Picklable: Tune stores callbacks with the experiment, and a restored sweep gets this back; the
MLflow tracker is rebuilt lazily after unpickling.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from uml_ray.config import Config, dump_config
from uml_ray.driver import progress
from uml_ray.train.checkpoints import BEST_FILE
from uml_ray.train.context import NOTICE_KEY
from uml_ray.train.plan import RunPlan
from uml_ray.train.state import DIVERGED_KEY, DIVERGED_LOSS_KEY, DIVERGED_STEP_KEY
from uml_ray.uri import redact_text

# a fused trial's config and report: one entry per member (README.md, "Sweeps: fused trials, searchers")
MEMBERS = "members"
# what a trial reports instead of raising when it meets an error that would recur on retry
FATAL_KEY = "fatal_error"
USER_ERROR_KEY = "user_error"
TRACEBACK_KEY = "fatal_traceback"
# what Tune adds to a result that carries a checkpoint (its folder's name; None without one)
CHECKPOINT_KEY = "checkpoint_dir_name"


def _never_fails_the_sweep(event):
    """A trial event whose tracking error is one console line: recording a trial must never fail it,
    nor end the sweep (a Tune callback that raises ends it). An unreachable server is no error at
    all: the tracker holds its writes until the server answers again."""

    @functools.wraps(event)
    def guarded(self, trial, *args, **kwargs):
        try:
            return event(self, trial, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever MLflow raised, the trial trains on
            text = " ".join(str(exc).split())[:300]
            progress.say(
                f"MLflow: could not record {event.__name__.replace('_', ' ')} of trial {trial.trial_id} "
                f"({type(exc).__name__}: {text}); the trial goes on"
            )

    return guarded


@dataclass(eq=False)
class TrackingBridge:
    """Forwards Tune trial events to MLflow and to the progress display (one log line per event)."""

    plan: RunPlan
    sweep: str
    single_run: bool
    sweep_params: dict
    resolve: Callable
    fetch_best: Callable
    # removes an ended trial's Tune checkpoints (driver/tune_state.py); a bridge pickled by a sweep from
    # before it unpickles with none, and keeps them
    drop: Callable | None = None
    verbose: bool = False
    # the dataset's fingerprint (data.identity), tagged on each trial run: what a later sweep's warm
    # start compares. A default, so a bridge pickled by a sweep from before it unpickles with none
    data_fingerprint: str = ""
    _tracker: object = field(default=None, init=False, repr=False)
    _configs: dict[str, Config] = field(default_factory=dict, init=False, repr=False)

    def __getstate__(self):
        return {**self.__dict__, "_tracker": None, "_configs": {}}

    @property
    def tracker(self):
        from uml_ray.tracking.loggers import SweepTracker

        if self._tracker is None:
            tracking = self.plan.cfg.tracking
            self._tracker = SweepTracker(
                tracking.uri, tracking.experiment, tracking.artifact_location, self.sweep, self.single_run
            )
            self._tracker.start_sweep(self.sweep_params)
        return self._tracker

    def runs(self, trial) -> list[tuple[str, dict]]:
        """(MLflow run key, sampled params) of each config a trial trains: one, or each fused member."""
        if MEMBERS in trial.config:
            return [(member_id(trial.trial_id, k), member) for k, member in enumerate(trial.config[MEMBERS])]
        return [(trial.trial_id, dict(trial.config))]

    def resolved_config(self, trial, key: str, params: dict) -> Config:
        """A config's full form (base + sampled params + derived seed), built once per run key."""
        if key not in self._configs:
            self._configs[key] = self.resolve(trial.trial_id, params).cfg
        return self._configs[key]

    def restored_ended(self, key: str) -> bool:
        """Whether run ``key`` had ended before this driver (a resumed sweep's trial that only reports
        its recorded result again): neither re-recorded nor announced again."""
        return key in self.tracker.ended

    @_never_fails_the_sweep
    def trial_started(self, trial) -> None:
        """Open (or find again) the trial's MLflow run(s)."""
        from uml_ray.tracking.tags import DATA_TAG, FUSED_TRIAL_TAG, SAMPLED_TAG

        for key, params in self.runs(trial):
            if key in self.tracker.trial_runs:
                continue
            cfg = self.resolved_config(trial, key, params)
            tags = {SAMPLED_TAG: json.dumps(params, default=str)}
            if self.data_fingerprint:
                tags[DATA_TAG] = self.data_fingerprint
            if key != trial.trial_id:
                tags[FUSED_TRIAL_TAG] = trial.trial_id
            self.tracker.start_trial(key, cfg.flat(), tags)
            if self.restored_ended(key):  # its run was closed before the resume, and said so then
                continue
            line = "" if self.single_run else f"trial {key} started: {_short(params)}"
            progress.trial_started(key, params, line)

    @_never_fails_the_sweep
    def trial_result(self, trial, result: dict) -> None:
        """Metrics of one validation (each member's fresh ones, for a fused trial). A sweep's trials'
        metrics may be held a few seconds (``SweepTracker.log_metrics``) and go in one write; all of a
        trial's held ones are sent with a report that carries a checkpoint, past which a resumed trial
        does not report again."""
        self.trial_started(trial)
        if result.get(NOTICE_KEY):  # e.g. a checkpoint fallback, said by the trial process
            progress.say(result[NOTICE_KEY])
        checkpointed = bool(result.get(CHECKPOINT_KEY))
        hold = not self.single_run and not checkpointed
        if MEMBERS in trial.config:
            runs = self.runs(trial)
            for k, member in enumerate(result.get(MEMBERS) or []):
                if member.get("step") == result.get("step"):
                    key = member_id(trial.trial_id, k)
                    self.tracker.log_metrics(key, member, step=int(member["step"]), hold=hold)
                    if k < len(runs):
                        progress.trial_result(*runs[k], member)
            if checkpointed:  # a member pruned earlier reports nothing now: its held metrics go too
                for key, _ in runs:
                    self.tracker.send_metrics(key)
            if self.verbose or result.get("live") == 0:
                progress.trial_result(
                    trial.trial_id,
                    {},
                    {},
                    f"trial {trial.trial_id} step={result.get('step')} live={result.get('live')} "
                    f"best_val_acc={result.get('best_val_acc', 0):.4g}",
                )
            return
        self.tracker.log_metrics(
            trial.trial_id,
            result,
            step=int(result.get("step", result.get("training_iteration", 0))),
            hold=hold,
        )
        if self.restored_ended(trial.trial_id):  # said before the resume
            return
        line = ""
        if self.verbose or result.get("completed"):
            shown = {k: result[k] for k in ("step", "val_acc", "best_val_acc", "test_acc") if k in result}
            line = f"trial {trial.trial_id} {_short(shown)}"
        progress.trial_result(trial.trial_id, dict(trial.config), result, line)

    @_never_fails_the_sweep
    def trial_ended(self, trial, failed: bool) -> None:
        """Close the trial's run(s) as finished, stopped early, pruned, diverged or failed, with config
        and (but for a failed or diverged run) weights; then a sweep's trial that did not fail has its
        Tune checkpoints removed (``drop_checkpoints``): MLflow holds what they held that anything reads."""
        from uml_ray.tracking.tags import DIVERGED_LOSS_TAG, DIVERGED_STEP_TAG

        self.trial_started(trial)
        last = trial.last_result or {}
        failed = failed or bool(last.get(FATAL_KEY))
        members = last.get(MEMBERS) if MEMBERS in trial.config else None
        # a resumed sweep's trial whose runs had all ended: recorded then, with its weights
        recorded = all(self.restored_ended(key) for key, _ in self.runs(trial))
        with tempfile.TemporaryDirectory() as folder:
            best = (
                None
                if failed or last.get(DIVERGED_KEY) or recorded
                else self.fetch_best(trial, last, self.plan.cfg.tracking.storage_path, folder)
            )
            payloads = None
            if best and members is not None:
                import torch

                payloads = torch.load(best, map_location="cpu", weights_only=False)["members"]
            for k, (key, params) in enumerate(self.runs(trial)):
                final = last if members is None else (members[k] if k < len(members) else {})
                tags, why = {}, f": {last[FATAL_KEY]}" if last.get(FATAL_KEY) else ""
                if failed:
                    status, outcome = "FAILED", "failed"
                elif final.get(DIVERGED_KEY):
                    status, outcome = "FAILED", "diverged"
                    step, loss = final.get(DIVERGED_STEP_KEY), float(final.get(DIVERGED_LOSS_KEY, "nan"))
                    tags = {DIVERGED_STEP_TAG: str(step), DIVERGED_LOSS_TAG: f"{loss:.6g}"}
                    why = f" at step {step} (loss {loss:.4g})"
                elif final.get("completed"):
                    status, outcome = (
                        "FINISHED",
                        "stopped_early" if final.get("stopped_early") else "finished",
                    )
                else:
                    status, outcome = "KILLED", "pruned"
                # the run's artifacts as one tree, sent in one write: config.yaml, error/traceback.txt,
                # checkpoint/best.pt
                run_folder = os.path.join(folder, f"run-{k}")
                os.makedirs(run_folder)
                _config_file(self.resolved_config(trial, key, params), run_folder)
                artifacts = {"": run_folder}
                if last.get(TRACEBACK_KEY):
                    os.makedirs(os.path.join(run_folder, "error"))
                    with open(os.path.join(run_folder, "error", "traceback.txt"), "w") as handle:
                        handle.write(last[TRACEBACK_KEY])
                # a diverged member's best-val weights are no product: the searcher is told it failed
                if payloads is not None and k in payloads and outcome != "diverged":
                    import torch

                    path = os.path.join(run_folder, "checkpoint", BEST_FILE)
                    os.makedirs(os.path.dirname(path))
                    torch.save(payloads[k], path)
                elif best and members is None:
                    artifacts["checkpoint"] = best
                self.tracker.end_trial(key, status, outcome, artifacts, tags)
                if self.restored_ended(key):  # its run was closed before the resume, and said so then
                    continue
                # a single run's failure: the command's one error line says why
                progress.trial_ended(
                    key, outcome, "" if failed and self.single_run else f"trial {key} {outcome}{why}"
                )
        if not failed and not self.single_run and self.drop is not None:
            self.tracker.after_writes(
                f"trial {trial.trial_id}'s checkpoints removed", functools.partial(self.drop, trial)
            )

    def finish(self) -> None:
        """At the sweep's end: send every tracking write still held for an unreachable server."""
        if self._tracker is not None:
            self._tracker.close_lost_trials()
            self._tracker.close()


def member_id(trial_id: str, k: int) -> str:
    """The MLflow run key of member ``k`` of a fused trial (stable across retries and resumes)."""
    return f"{trial_id}-m{k}"


def _short(values: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _config_file(cfg: Config, folder: str) -> str:
    path = os.path.join(folder, "config.yaml")
    dump_config(cfg, path)
    # recorded without the URIs' credentials: the real ones stay in this process's memory
    Path(path).write_text(redact_text(Path(path).read_text()))
    return path
