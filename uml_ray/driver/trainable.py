"""The Tune trainable every trial runs: its body (one config or a fused set), resumed from kept checkpoints.

``Trial`` is a module-level class, so Tune and Ray pickle it by reference and every trial
process runs the installed code. The sweep hands Tune ``tune.with_parameters(Trial, plan=...,
...)``: Tune puts the arguments in the object store once and passes them to ``setup``.
"""

from __future__ import annotations

import itertools
import time
import traceback

import ray
import ray.tune
from pyarrow import fs as pafs
from ray.tune.result import RESULT_DUPLICATE
from ray.tune.trainable.function_trainable import FunctionTrainable

from uml_ray.driver.bridge import FATAL_KEY, MEMBERS, TRACEBACK_KEY, USER_ERROR_KEY
from uml_ray.driver.retry import RETRIES_KEY, RETRY_ERROR_KEY, backoff_s, describe, is_transient
from uml_ray.driver.trial import REDUCTION_FACTOR, resolve_trial, trial_seed
from uml_ray.errors import UserError
from uml_ray.train.checkpoints import kept_checkpoints
from uml_ray.train.context import Replay
from uml_ray.train.plan import RunPlan
from uml_ray.train.runner import run_fused_trial, run_trial, use_inline
from uml_ray.uri import redact_text


def train_trial(
    params: dict, plan: RunPlan, seed_policy: str, rungs: tuple = (), ended: dict | None = None
) -> None:
    """The body of every Tune trial. A transient error (``driver/retry.py``: the network, object
    storage) of a trial trained in this process is retried here from the last checkpoint it wrote,
    with backoff, up to ``resources.transient_retries`` times. Any other error would recur on
    retry (bad config or data, a bug, CUDA out of memory): it is reported as the trial's final
    result instead of raised, so Tune does not retry it; a lost worker or node (Ray errors) still
    raises and is retried from the checkpoint. A trial that had ended before the sweep was resumed
    (``ended``: its last result) reports that result again instead of training."""
    trial_id = ray.tune.get_context().get_trial_id()
    if ended and trial_id in ended:
        ray.tune.report(ended[trial_id])
        return
    resources = plan.cfg.resources
    # a TorchTrainer's workers are retried by Ray Train (resources.max_failures), whatever failed them
    retries = resources.transient_retries if MEMBERS in params or use_inline(plan.cfg) else 0
    replay = Replay()
    for attempt in itertools.count(1):
        try:
            _train(params, plan, seed_policy, rungs, trial_id, replay)
            return
        except ray.exceptions.RayError:
            raise
        except Exception as exc:  # noqa: BLE001 - a Python-level error is transient or deterministic
            if attempt <= retries and is_transient(exc):
                # the next report carries the count: the driver prints the line (trial output stays
                # in the trial's log)
                replay.notes = {RETRIES_KEY: attempt, RETRY_ERROR_KEY: describe(exc)}
                time.sleep(backoff_s(attempt, resources.retry_backoff_s))
                continue
            after = f" (after {attempt - 1} retries)" if attempt > 1 else ""
            ray.tune.report(
                {
                    # Tune's result.json, the saved traceback, MLflow and the console: no URI's credentials
                    FATAL_KEY: redact_text(f"{type(exc).__name__}: {exc}")[:2000] + after,
                    USER_ERROR_KEY: int(isinstance(exc, UserError)),
                    TRACEBACK_KEY: redact_text(traceback.format_exc())[-20000:],
                    "selection_score": float("nan"),
                    "best_val_acc": float("nan"),
                    "val_acc": float("nan"),
                    **replay.notes,
                }
            )
            return


def _train(
    params: dict, plan: RunPlan, seed_policy: str, rungs: tuple, trial_id: str, replay: Replay
) -> None:
    """One attempt at a trial: a fused set of configs, or one config; from the last checkpoint."""
    if MEMBERS in params:
        seed = {"train.seed": trial_seed(plan.cfg.train.seed, trial_id)} if seed_policy == "per_trial" else {}
        members = [{**member, **seed} for member in params[MEMBERS]]
        for member in members:  # the searcher checked them; a grid's points are checked here
            resolve_trial(plan, "fixed", trial_id, member)
        run_fused_trial(plan, members, list(rungs), REDUCTION_FACTOR, replay)
    else:
        run_trial(resolve_trial(plan, seed_policy, trial_id, params), replay)


class Trial(FunctionTrainable):
    """``train_trial`` as a Tune function trainable that restores the newest checkpoint kept beside the
    one Tune recorded for a trial when that one is gone, and restores nothing for an ended trial whose
    checkpoints were removed (it reports its recorded result again). Tune deletes a trial's oldest checkpoint
    before it snapshots the sweep; a driver killed in between leaves a snapshot naming a deleted
    checkpoint, and Tune alone would fail that trial on ``--resume`` ("does not exist on storage
    anymore")."""

    # Tune names trials and their folders after the trainable: the name sweeps had before this
    # class, which a restored sweep must keep (Tuner.restore checks it)
    _name = "_trial"

    def setup(
        self, config: dict, plan: RunPlan, seed_policy: str, rungs: tuple = (), ended: dict | None = None
    ) -> None:
        self.arguments = {"plan": plan, "seed_policy": seed_policy, "rungs": rungs, "ended": ended}
        super().setup(config)

    def _trainable_func(self, config: dict) -> None:
        train_trial(config, **self.arguments)
        # a function trial that returns repeats its last result with this key: Tune's signal that
        # it ended (what ``wrap_function``'s trainables report)
        ray.tune.report({RESULT_DUPLICATE: True})

    def restore(self, checkpoint_path):
        checkpoint = getattr(checkpoint_path, "checkpoint", None)  # Tune hands a (checkpoint, metrics) result
        if (
            checkpoint is not None
            and checkpoint.filesystem.get_file_info(checkpoint.path).type == pafs.FileType.NotFound
        ):
            kept = kept_checkpoints(checkpoint)
            if not kept and self.trial_id in (self.arguments["ended"] or {}):
                # it only reports its recorded result again: its checkpoints went once MLflow held its
                # products (tune_state.drop_checkpoints), before Tune's last snapshot said it ended
                return None
            if kept:
                print(
                    f"[uml-ray] checkpoint {checkpoint.path} is gone; resuming from {kept[0].path}",
                    flush=True,
                )
                checkpoint_path.checkpoint = kept[0]
        return super().restore(checkpoint_path)

    def __repr__(self) -> str:
        return self._name
