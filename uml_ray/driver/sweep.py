"""Run one training or a sweep through Ray Tune (Optuna TPE / random, or a grid; ASHA): the driver's entry.

``run`` starts or joins Ray, puts the in-memory shares in the object store once, builds the Tuner
(or restores it), forwards every trial event to MLflow through the bridge, and returns the
summary. A single training is a one-trial sweep. What it composes lives beside it: the configs
(``searcher.py``), a trial (``trial.py``, run by ``trainable.py``), the MLflow callback
(``callback.py``), Tune's saved state (``tune_state.py``) and the summary (``summary.py``).

Ray-free at import: Ray and the modules that import Ray Tune at import time are imported when
``run`` runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import tempfile
import time
from pathlib import Path

from uml_ray.cluster import attach_or_start_ray, check_storage_for_cluster, cluster_address
from uml_ray.data.ray_streams import start_ray_data_helpers
from uml_ray.driver import progress
from uml_ray.driver.bridge import MEMBERS, TrackingBridge
from uml_ray.driver.plan import load_tables
from uml_ray.driver.summary import RunOutcome, summarize
from uml_ray.driver.trial import REDUCTION_FACTOR, max_concurrency, resolve_trial, trial_resources
from uml_ray.driver.tune_logs import tune_errors_to_file
from uml_ray.driver.tune_state import (
    drop_checkpoints,
    ended_results,
    experiment_path,
    fetch_best_weights,
    finished_sweep,
)
from uml_ray.errors import ConfigError, UserError
from uml_ray.search.space import SearchSpace
from uml_ray.train.plan import RunPlan
from uml_ray.train.runner import use_inline
from uml_ray.uri import is_remote, redact

# configs per fused trial when --fuse is not given: a head-only sweep's members cost little each
DEFAULT_FUSE = 16


def can_fuse(plan: RunPlan, space: SearchSpace | None) -> bool:
    """Fused trials serve head-only supervised sweeps trained in the trial process, one seed per trial."""
    cfg = plan.cfg
    return (
        space is not None
        and cfg.model.regime == "supervised"
        and not cfg.model.backbone
        and use_inline(cfg)
        and space.seed_policy == "fixed"
    )


def check_folds_fuse(plan: RunPlan, space: SearchSpace | None, fuse: int) -> None:
    """k-fold selection trains a config's fold models side by side in a fused trial: a run that does
    not fuse is refused before Ray starts."""
    folds = plan.cfg.train.select_folds
    if folds > 1 and (fuse == 1 or not can_fuse(plan, space)):
        raise ConfigError(
            f"train.select_folds={folds} trains each config's {folds} fold models side by side in a fused "
            "trial: it needs `uml-ray tune` of a head-only supervised config (model.backbone empty, "
            "resources.num_workers=1) with seed_policy fixed, and --fuse other than 1; set "
            "train.select_folds=0 to validate on the manifest's val split"
        )


def fused_rungs(plan: RunPlan) -> list[int]:
    """ASHA's rungs (validation counts: grace period × reduction factor^i below the last), for the
    halving inside a fused trial."""
    validations = -(-plan.cfg.train.max_steps // plan.cfg.train.val_every)
    rung, rungs = max(1, validations // 4), []
    while rung < validations:
        rungs.append(rung)
        rung *= REDUCTION_FACTOR
    return rungs


def init_ray(plan: RunPlan, verbose: bool = False) -> None:
    """Attach to the configured/RAY_ADDRESS cluster, or start a local Ray with ``resources.num_cpus``."""
    attach_or_start_ray(plan.cfg.resources.address, plan.cfg.resources.num_cpus)
    import ray.data

    # Ray Data's progress bars, its and Tune's INFO lines and Tune's tables flood a sweep's console;
    # the progress display (driver/progress.py) shows one status line instead, and --verbose brings
    # the rest back
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic reporter is silent at verbose=0
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        for name in ("ray.data", "ray.tune", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # Tune's "operation took 0.5 s, may be a performance bottleneck" lines (dozens on a loaded
        # machine: MLflow writes in the callback) and its TensorBoard logger's "invalid value" for a
        # fused trial's members: none of them actionable
        for name in ("ray.tune.utils.util", "ray.tune.logger"):
            logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def pending_trials(count: int):
    """Tune keeps ``count`` trials pending (their processes start while the others train) instead of
    the one it allows a searcher without its ``ConcurrencyLimiter`` (ours limits concurrency itself);
    a ``TUNE_MAX_PENDING_TRIALS_PG`` the user set wins. Per-trial sweeps ran 1.5x faster so."""
    key = "TUNE_MAX_PENDING_TRIALS_PG"
    if not count or key in os.environ:
        yield
        return
    os.environ[key] = str(count)
    try:
        yield
    finally:
        os.environ.pop(key, None)


def run(
    plan: RunPlan,
    space: SearchSpace | None = None,
    trials: int = 1,
    concurrency: int = 0,
    resume: bool = False,
    name: str = "",
    verbose: bool = False,
    fuse: int = 0,
    warm=None,
) -> RunOutcome:
    """Run one training (``space`` None) or a sweep of ``trials`` configs, tracked in MLflow.

    ``fuse``: configs per fused trial (0 = ``DEFAULT_FUSE`` where the sweep can fuse, 1 = one
    config per trial). ``warm``: a new sweep's ``warm_start.WarmStart`` (a resumed one keeps its own).
    """
    import ray
    from ray import tune

    from uml_ray.driver.searcher import grid_members
    from uml_ray.driver.trainable import Trial
    from uml_ray.tracking.runs import check_run_name

    cfg = plan.cfg
    name = (
        name or cfg.tracking.run_name or f"{'sweep' if space else 'train'}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    check_run_name(name)
    path = experiment_path(plan, name)
    if resume and not tune.Tuner.can_restore(path):
        raise UserError(f"--resume: no run named '{name}' at {path}; check --name and tracking.storage_path")
    if resume and space is not None and (done := finished_sweep(plan, name)) is not None:
        # before Ray starts and before any MLflow write: its summary is logged once
        print(f"[uml-ray] sweep {name} already finished ({done} trials); nothing to resume", flush=True)
        return RunOutcome(name, path, {}, {}, [], already_finished=True)
    if not resume and not is_remote(path) and Path(path, "tuner.pkl").exists():
        raise UserError(
            f"a run named '{name}' already exists at {path}; pass --resume to continue it, or another --name"
        )
    if fuse > 1 and not can_fuse(plan, space):
        raise ConfigError(
            "--fuse needs a head-only supervised sweep trained in the trial process with seed_policy fixed "
            "(model.backbone empty, resources.num_workers=1); use --fuse 1"
        )
    fuse = (fuse or DEFAULT_FUSE) if can_fuse(plan, space) else 1
    check_folds_fuse(plan, space, fuse)
    grid = space is not None and space.searcher == "grid"
    fused_grid = grid_members(space, plan, fuse) if grid and fuse > 1 else None
    init_ray(plan, verbose)
    check_storage_for_cluster(cfg.tracking.storage_path, ray.nodes())
    if cluster_address(cfg.resources.address):
        # an attached (possibly autoscaling) cluster: Ray Data's helper actors on the driver's
        # node, not on a worker node they would keep alive
        start_ray_data_helpers()
    plan = load_tables(plan)
    seed_policy = space.seed_policy if space else "fixed"
    rungs = () if grid or fuse == 1 else tuple(fused_rungs(plan))
    concurrent = max_concurrency(plan, concurrency)
    searched = space is not None and not grid  # by the CheckedSearcher (else a grid, or one training)
    ended = ended_results(plan, name, path) if resume else {}
    trainable = tune.with_resources(
        tune.with_parameters(Trial, plan=plan, seed_policy=seed_policy, rungs=rungs, ended=ended),
        trial_resources(plan),
    )
    if resume:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(trainable, plan, space, name, trials, fuse, fused_grid, concurrent, verbose, warm)
    with (
        pending_trials(concurrent if searched else 0),
        tune_errors_to_file(path),
        progress.display(
            name,
            _configs(space, trials),
            events_log(path, name),
            space.metric if space else "best_val_acc",
            verbose,
        ),
    ):
        results = tuner.fit()
    return summarize(results, plan, name, path, space)


def _configs(space: SearchSpace | None, trials: int) -> int:
    """How many configs the sweep trains: one, every grid point (× its seeds), or ``trials`` distinct
    ones (fewer when the space holds fewer)."""
    if space is None:
        return 1
    size = space.size()
    if space.searcher == "grid":
        return size
    return min(trials, size) if size is not None else trials


def events_log(path: str, name: str) -> str:
    """The sweep's trial events log: in its folder, or in a local temporary folder for a remote one."""
    if is_remote(path):
        return os.path.join(tempfile.gettempdir(), "uml-ray-events", name, "events.log")
    return os.path.join(path, "events.log")


def _new_tuner(trainable, plan, space, name, trials, fuse, fused_grid, concurrent, verbose, warm=None):
    """A fresh sweep's Tuner: its search (searcher or grid, warm-started or not), scheduler, MLflow
    callback and storage."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from uml_ray.data.identity import dataset_fingerprint
    from uml_ray.driver.callback import MlflowBridgeCallback
    from uml_ray.driver.searcher import build_searcher, tune_space

    plan = recorded_plan(plan)  # the bridge's and the searcher's: Tune pickles them into the sweep's folder
    cfg = plan.cfg
    seed_policy = space.seed_policy if space else "fixed"
    metric = space.metric if space else "best_val_acc"
    grid = space is not None and space.searcher == "grid"
    searched = space is not None and not grid
    sweep_params = _sweep_params(cfg, space, trials, fuse, seed_policy, metric)
    if warm is not None:
        sweep_params.update(warm.params())
    bridge = TrackingBridge(
        plan,
        name,
        single_run=space is None,
        sweep_params=sweep_params,
        resolve=functools.partial(resolve_trial, plan, seed_policy),
        fetch_best=fetch_best_weights,
        drop=drop_checkpoints,
        verbose=verbose,
        data_fingerprint=dataset_fingerprint(plan.dataset.manifest),
    )
    validations = -(-cfg.train.max_steps // cfg.train.val_every)
    # a grid is an exhaustive table: every point runs to the end; fused trials halve their
    # members at ASHA's rungs themselves
    asha = searched and fuse == 1
    if fused_grid is not None:
        param_space = {MEMBERS: tune.grid_search(fused_grid)}
    else:
        param_space = tune_space(space) if space else {}
    tune_config = tune.TuneConfig(
        metric=metric,
        mode="max",
        # a searcher stops the sweep itself, after `trials` distinct configs (a fused trial holds
        # several; a trial lost with a killed driver is handed again on --resume): no bound on Tune trials
        num_samples=-1 if searched else 1,
        # the searcher limits concurrency itself (CheckedSearcher: Tune's limiter can wait for ever
        # after a resume)
        max_concurrent_trials=None if searched else concurrent,
        # a trial process keeps torch and uml_ray imported for the next trial (seconds per trial).
        # An inline trial stopped by ASHA is parked in its report and ends at once; a stopped
        # TorchTrainer trial is still tearing its workers down, and Tune errors the next trial
        # when the process it reuses is busy for more than TUNE_FUNCTION_THREAD_TIMEOUT_S
        reuse_actors=use_inline(cfg),
        search_alg=build_searcher(
            space, plan, seed_policy, trials, fuse, concurrent, warm.plan if warm else None
        )
        if searched
        else None,
        scheduler=ASHAScheduler(
            time_attr="training_iteration",
            max_t=validations,
            grace_period=max(1, validations // 4),
            reduction_factor=REDUCTION_FACTOR,
        )
        if asha
        else None,
    )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name=name,
            storage_path=cfg.tracking.storage_path,
            callbacks=[MlflowBridgeCallback(bridge)],
            # the latest checkpoint serves resume and the best-val weights; one spare, so Tune
            # need not snapshot the whole experiment at every checkpoint. A sweep's trial that ended
            # has both removed once MLflow holds its products (bridge.trial_ended)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
            verbose=1 if verbose else 0,
        ),
    )


def recorded_plan(plan: RunPlan) -> RunPlan:
    """The plan without the tracking URIs' credentials, for what is saved in files: its tracking client
    still authenticates in this process, and in a resumed one whose config gives them again
    (``tracking.store.keep_credentials``)."""
    from uml_ray.tracking.store import keep_credentials

    tracking = plan.cfg.tracking
    tracking = dataclasses.replace(
        tracking, uri=keep_credentials(tracking.uri), artifact_location=redact(tracking.artifact_location)
    )
    return dataclasses.replace(plan, cfg=dataclasses.replace(plan.cfg, tracking=tracking))


def _sweep_params(cfg, space: SearchSpace | None, trials: int, fuse: int, seed_policy: str, metric: str):
    """The parent MLflow run's params: the base config, and a sweep's space and settings."""
    params = {"base." + k: v for k, v in cfg.flat().items()}
    if space is None:
        return params
    for p in space.params:
        params[f"space.{p.key}"] = {
            k: v for k, v in vars(p).items() if k != "key" and v not in (None, [], False)
        }
    params.update(
        {
            "searcher": space.searcher,
            "scheduler": "asha" if fuse == 1 else "halving-in-trial",
            "trials": trials,
            "fuse": fuse,
            "seed": cfg.train.seed,
            "seed_policy": seed_policy,
            "metric": metric,
        }
    )
    return params
