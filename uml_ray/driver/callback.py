"""The Tune callback that hands every trial event to the tracking bridge (``driver/bridge.py``).

A module-level class: Tune pickles its callbacks into the sweep's saved state, and a sweep resumed
after an upgrade must find today's class there by name, not the class body it was started with.
"""

from __future__ import annotations

from ray.tune import Callback

from uml_ray.driver import progress
from uml_ray.driver.bridge import TrackingBridge
from uml_ray.driver.retry import RETRIES_KEY, retry_line


class MlflowBridgeCallback(Callback):
    """Trial started, reported, completed or errored, and the sweep's end: each to ``bridge``."""

    def __init__(self, bridge: TrackingBridge):
        self.bridge = bridge

    def on_trial_start(self, iteration, trials, trial, **info):
        self.bridge.trial_started(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.bridge.trial_result(trial, result)
        # a trial retried in its process (driver/retry.py) says so in its next report: one line per retry
        shown = self.__dict__.setdefault("retries_shown", {})
        if result.get(RETRIES_KEY, 0) > shown.get(trial.trial_id, 0):
            shown[trial.trial_id] = result[RETRIES_KEY]
            limit = self.bridge.plan.cfg.resources.transient_retries
            progress.say(retry_line(trial.trial_id, result, limit))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.bridge.trial_ended(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.bridge.trial_ended(trial, failed=True)

    def on_experiment_end(self, trials, **info):
        self.bridge.finish()
