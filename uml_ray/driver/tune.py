"""Ray Tune + Optuna (TPE / random) + ASHA: the driver of every run, single trainings and sweeps alike.

The only module that drives Tune and Optuna. ``run`` starts or joins Ray, puts the in-memory
shares in the object store once, builds the Tuner (or restores it), forwards every trial event
to MLflow through the bridge, and returns the summary. Every sampled config is checked before
it trains (``CheckedSearcher``): an invalid combination is told to the searcher as failed and
resampled, and no config is trained twice.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
import traceback
from pathlib import Path

from uml_ray.cluster import attach_or_start_ray, check_storage_for_cluster, cluster_address
from uml_ray.config import check_modalities
from uml_ray.data.streams import start_ray_data_helpers
from uml_ray.driver.bridge import FATAL_KEY, MEMBERS, TRACEBACK_KEY, USER_ERROR_KEY, TrackingBridge
from uml_ray.driver.plan import check_target_projection, load_tables
from uml_ray.driver.summary import RunOutcome, summarize
from uml_ray.errors import ConfigError, UserError
from uml_ray.search.space import SearchSpace
from uml_ray.train.context import BEST_FILE
from uml_ray.train.fused_loop import fusion_key
from uml_ray.train.plan import RunPlan
from uml_ray.train.runner import ray_data_streams, run_fused_trial, run_trial, use_inline
from uml_ray.uri import is_remote, join_uri

# how often a searcher may propose an invalid or already-trained config before a trial is spent on it
MAX_RESAMPLES = 50
REDUCTION_FACTOR = 2  # ASHA's across trials, successive halving's inside a fused one
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


def fused_rungs(plan: RunPlan) -> list[int]:
    """ASHA's rungs (validation counts: grace period × reduction factor^i below the last), for halving inside a fused trial."""
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
    # the bridge prints one line per trial event instead, and --verbose brings the rest back
    ray.data.DataContext.get_current().enable_progress_bars = verbose
    if not verbose:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the classic reporter is silent at verbose=0
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        for name in ("ray.data", "ray.tune", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)


def trial_resources(plan: RunPlan) -> dict:
    """What one trial holds: the whole single worker inline, or just the TorchTrainer's driver."""
    cfg = plan.cfg
    if use_inline(cfg):
        resources = {"CPU": cfg.resources.cpus_per_worker}
        if cfg.resources.gpus_per_worker > 0:
            resources["GPU"] = cfg.resources.gpus_per_worker
        return resources
    # the trial only drives a TorchTrainer whose workers hold the real resources; Tune refuses
    # an empty request, so it holds a sliver
    return {"CPU": 0.01}


def data_cpus(plan: RunPlan) -> float:
    """CPUs kept free for Ray Data: none when no dataset is read through it (served from memory, or
    streamed by pyarrow in a one-process trial), at least one image decode task's worth when a
    target of images goes through the image pipeline."""
    reserved = plan.cfg.resources.data_cpus if ray_data_streams(plan) else 0.0
    if any(spec.kind == "image" for spec in plan.streams.values()):
        reserved = max(reserved, plan.cfg.resources.decode_cpus)
    return reserved


def max_concurrency(plan: RunPlan, requested: int) -> int:
    """Concurrent trials that fit beside the CPUs kept free for Ray Data."""
    import ray

    cfg = plan.cfg
    cpus = ray.cluster_resources().get("CPU", 0)
    per_trial = cfg.resources.cpus_per_worker * cfg.resources.num_workers + trial_resources(plan)["CPU"] * (
        not use_inline(cfg)
    )
    reserved = data_cpus(plan)
    fit = int((cpus - reserved) // per_trial) if per_trial else requested
    if fit < 1 and not cluster_address(cfg.resources.address):
        raise ConfigError(
            f"a trial needs {per_trial:g} CPUs plus resources.data_cpus={reserved:g} for Ray Data, "
            f"but this Ray has {cpus:g}; lower resources.num_workers/cpus_per_worker/data_cpus or raise resources.num_cpus"
        )
    return max(1, min(requested or fit, fit)) if fit >= 1 else max(1, requested or 1)


def trial_seed(base_seed: int, trial_id: str) -> int:
    """Per-trial seed derived from the config seed and the trial id (stable across resumes)."""
    digest = hashlib.sha256(f"{base_seed}:{trial_id}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


def resolve_trial(plan: RunPlan, seed_policy: str, trial_id: str, params: dict) -> RunPlan:
    """The plan a trial trains: sampled params applied (and a derived seed), checked like the base config."""
    if seed_policy == "per_trial":
        params = {**params, "train.seed": trial_seed(plan.cfg.train.seed, trial_id)}
    resolved = plan.with_params(params)
    check_modalities(resolved.cfg, resolved.dataset.auxiliary)
    check_target_projection(resolved.cfg, resolved.dataset.manifest, list(resolved.dataset.auxiliary))
    return resolved


def _trial(
    params: dict, plan: RunPlan, seed_policy: str, rungs: tuple = (), ended: dict | None = None
) -> None:
    """A Tune function trial. An error that would recur on retry (bad config or data, a bug, CUDA
    out of memory) is reported as the trial's final result instead of raised, so Tune does not
    retry it; a lost worker or node (Ray errors) still raises and is retried from the checkpoint.
    A trial that had ended before the sweep was resumed (``ended``: its last result) reports that
    result again instead of training."""
    import ray
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    if ended and trial_id in ended:
        ray.tune.report(ended[trial_id])
        return
    try:
        if MEMBERS in params:
            seed = (
                {"train.seed": trial_seed(plan.cfg.train.seed, trial_id)}
                if seed_policy == "per_trial"
                else {}
            )
            members = [{**member, **seed} for member in params[MEMBERS]]
            for member in members:  # the searcher checked them; a grid's points are checked here
                resolve_trial(plan, "fixed", trial_id, member)
            run_fused_trial(plan, members, list(rungs), REDUCTION_FACTOR)
        else:
            run_trial(resolve_trial(plan, seed_policy, trial_id, params))
    except ray.exceptions.RayError:
        raise
    except Exception as exc:  # noqa: BLE001 - every Python-level error is deterministic here
        ray.tune.report(
            {
                FATAL_KEY: f"{type(exc).__name__}: {exc}"[:2000],
                USER_ERROR_KEY: int(isinstance(exc, UserError)),
                TRACEBACK_KEY: traceback.format_exc()[-20000:],
                "best_val_acc": float("nan"),
                "val_acc": float("nan"),
            }
        )


def _tune_space(space: SearchSpace) -> dict:
    from ray import tune

    if space.searcher == "grid":
        grid = {p.key: tune.grid_search(p.values) for p in space.params}
        if space.seeds:
            grid["train.seed"] = tune.grid_search(list(space.seeds))
        return grid
    out = {}
    for p in space.params:
        if p.type == "choice":
            out[p.key] = tune.choice(p.values)
        elif p.type == "int":
            out[p.key] = tune.lograndint(p.low, p.high + 1) if p.log else tune.randint(p.low, p.high + 1)
        else:
            out[p.key] = tune.loguniform(p.low, p.high) if p.log else tune.uniform(p.low, p.high)
    return out


def _config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def checked_searcher(
    inner, check, metric: str, limit: int | None, fuse: int = 1, group=None, max_concurrent: int = 0
):
    """A Tune ``Searcher`` around ``inner`` that never hands out an invalid or repeated config.

    ``check(config)`` raises ConfigError for a combination the config refuses: the inner searcher
    is told that suggestion failed, and asked again. A repeat of a config already handed out is
    told the first one's result (or failure) and asked again. After ``limit`` distinct configs
    (the sweep's budget, or a finite space's size), the search is finished.

    With ``fuse`` > 1 a trial gets ``{"members": [config, ...]}``: up to ``fuse`` suggestions that
    ``group(config)`` puts in one fusable set, and the inner searcher is told every member's own
    result — TPE learns from each config, not one per trial.

    It also limits the sweep to ``max_concurrent`` live trials (0: no limit), in place of Tune's
    ``ConcurrencyLimiter``, so that a restored sweep can be reconciled with Tune's snapshot: a
    driver killed mid-sweep can leave searcher state newer than Tune's trial table, holding a trial
    Tune never recorded. A limiter that counts it waits for it for ever; this searcher hands its
    config to the next trial instead (``reconcile``).
    """
    from ray.tune.search import Searcher

    class CheckedSearcher(Searcher):
        def __init__(self):
            super().__init__(metric=metric, mode="max")
            self.inner = inner
            self.handed: dict[str, str] = {}  # config key -> the inner searcher's id of its first suggestion
            self.results: dict[
                str, dict | None
            ] = {}  # inner id -> final result (None while running or failed)
            self.pending: list = []  # (inner id, config) suggested but not yet in a fused trial
            self.probes: dict[str, str] = {}  # trial id -> the inner searcher's id for it
            self.counter = 0
            self.live: dict[str, dict] = {}  # trial id -> the config handed to it, until Tune completes it
            self.redo: list = []  # (inner id(s), config) of trials a restored Tune never held: handed again

        def set_search_properties(self, metric, mode, config, **spec):
            return self.inner.set_search_properties(metric, mode, config, **spec)

        def suggest(self, trial_id: str):
            if self.redo:
                self.probes[trial_id], config = self.redo.pop(0)
            elif max_concurrent and len(self.live) >= max_concurrent:
                return None
            else:
                config = self._suggest(trial_id)
            if isinstance(config, dict):
                self.live[trial_id] = config
            return config

        def _suggest(self, trial_id: str):
            if fuse <= 1:
                return self._next(trial_id)
            while len(self.pending) < fuse:
                config = self._next(trial_id)
                if config is None or config == Searcher.FINISHED:
                    break
                self.pending.append((self.probes.pop(trial_id), config))
            if not self.pending:
                return config
            groups: dict = {}
            for probe, config in self.pending:
                groups.setdefault(group(config), []).append((probe, config))
            chosen = max(groups.values(), key=len)[:fuse]
            self.pending = [item for item in self.pending if item not in chosen]
            self.probes[trial_id] = [probe for probe, _ in chosen]
            return {MEMBERS: [config for _, config in chosen]}

        def _next(self, trial_id: str):
            if limit is not None and len(self.handed) >= limit:
                return Searcher.FINISHED
            for _ in range(MAX_RESAMPLES):
                self.counter += 1
                probe = f"{trial_id}-probe{self.counter}"
                config = self.inner.suggest(probe)
                if config is None or config == Searcher.FINISHED:
                    return config
                key = _config_key(config)
                try:
                    check(config)
                except ConfigError:
                    self.inner.on_trial_complete(probe, error=True)
                    continue
                if key in self.handed:
                    earlier = self.results.get(self.handed[key])
                    if earlier is not None and earlier.get(metric) == earlier.get(metric):  # not NaN
                        self.inner.on_trial_complete(probe, result=earlier)
                    else:
                        self.inner.on_trial_complete(probe, error=True)
                    continue
                self.handed[key] = probe
                self.results[probe] = None
                self.probes[trial_id] = probe
                return config
            return None

        def on_trial_result(self, trial_id: str, result: dict):
            probe = self.probes.get(trial_id)
            if isinstance(probe, str):
                self.inner.on_trial_result(probe, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            self.live.pop(trial_id, None)
            probe = self.probes.get(trial_id)
            if probe is None:
                return
            if isinstance(probe, list):  # a fused trial: each member is its own result
                members = (result or {}).get(MEMBERS) or [None] * len(probe)
                for member_probe, member_result in zip(probe, members):
                    self._complete(member_probe, member_result, error or bool((result or {}).get(FATAL_KEY)))
                return
            self._complete(probe, result, error)

        def _complete(self, probe: str, result: dict | None, error: bool) -> None:
            failed = (
                error or result is None or result.get(FATAL_KEY) or result.get(metric) != result.get(metric)
            )
            self.results[probe] = None if failed else result
            self.inner.on_trial_complete(probe, result=None if failed else result, error=bool(failed))

        def save(self, checkpoint_path: str):
            import pickle

            with open(checkpoint_path, "wb") as handle:
                pickle.dump(self.__dict__, handle)

        def restore(self, checkpoint_path: str):
            import pickle

            with open(checkpoint_path, "rb") as handle:
                self.__dict__.update(pickle.load(handle))

        def restore_from_dir(self, checkpoint_dir: str):
            super().restore_from_dir(checkpoint_dir)
            held = snapshot_trials(checkpoint_dir)
            if held is not None:
                self.reconcile(held)

        def reconcile(self, held: dict[str, tuple[str, dict]]) -> None:
            """Match the live trials to Tune's restored trial table ``held`` (trial id -> (status,
            last result)): a trial Tune does not hold gives its config to the next suggestion (the
            inner searcher's trial for it stays open, and the tracker adopts its MLflow run); one
            Tune holds as ended is completed with its last result."""
            for trial_id in list(self.live):
                if trial_id not in held:
                    self.redo.append((self.probes.pop(trial_id), self.live.pop(trial_id)))
                elif held[trial_id][0] == "TERMINATED":
                    self.on_trial_complete(trial_id, result=held[trial_id][1])

    return CheckedSearcher()


def snapshot_trials(folder: str) -> dict[str, tuple[str, dict]] | None:
    """Trial id -> (status, last result) in the newest Tune experiment snapshot in ``folder`` (Tune
    copies the one it restores there), or None when there is none."""
    import glob

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


def _searcher(space: SearchSpace, plan: RunPlan, seed_policy: str, trials: int, fuse: int, concurrency: int):
    """TPE or random sampling through Optuna, checked, de-duplicated and grouped into fused trials; None for a grid."""
    if space.searcher == "grid":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = plan.cfg.train.seed
    sampler = (
        optuna.samplers.RandomSampler(seed=seed)
        if space.searcher == "random"
        else optuna.samplers.TPESampler(seed=seed)
    )
    inner = OptunaSearch(sampler=sampler, metric=space.metric, mode="max")
    check = functools.partial(_check_sample, plan, seed_policy)
    limit = min(trials, space.size() or trials)
    return checked_searcher(
        inner, check, space.metric, limit, fuse, functools.partial(_fusion_group, plan), concurrency
    )


def _fusion_group(plan: RunPlan, params: dict) -> tuple:
    return fusion_key(plan.with_params(params).cfg.flat(), plan.dataset)


def grid_members(space: SearchSpace, plan: RunPlan, fuse: int) -> list[list[dict]]:
    """A grid's points (× its seeds), each checked, grouped into fused trials of at most ``fuse`` members."""
    import itertools

    keys = [p.key for p in space.params] + (["train.seed"] if space.seeds else [])
    values = [p.values for p in space.params] + ([list(space.seeds)] if space.seeds else [])
    groups: dict = {}
    for combination in itertools.product(*values):
        point = dict(zip(keys, combination))
        _check_sample(plan, "fixed", point)
        groups.setdefault(_fusion_group(plan, point), []).append(point)
    return [members[i : i + fuse] for members in groups.values() for i in range(0, len(members), fuse)]


def _check_sample(plan: RunPlan, seed_policy: str, config: dict) -> None:
    resolve_trial(plan, seed_policy if seed_policy != "per_trial" else "fixed", "check", config)


def restorable(trial_function):
    """``trial_function`` as a Tune trainable that restores the newest checkpoint kept beside the one
    Tune recorded for a trial when that one is gone. Tune deletes a trial's oldest checkpoint before
    it snapshots the sweep; a driver killed in between leaves a snapshot naming a deleted checkpoint,
    and Tune alone would fail that trial on ``--resume`` ("does not exist on storage anymore")."""
    from pyarrow import fs as pafs
    from ray.tune.trainable.function_trainable import wrap_function

    from uml_ray.train.context import kept_checkpoints

    class Trial(wrap_function(trial_function)):
        def restore(self, checkpoint_path):
            checkpoint = getattr(
                checkpoint_path, "checkpoint", None
            )  # Tune hands a (checkpoint, metrics) result
            if (
                checkpoint is not None
                and checkpoint.filesystem.get_file_info(checkpoint.path).type == pafs.FileType.NotFound
            ):
                kept = kept_checkpoints(checkpoint)
                if kept:
                    print(
                        f"[uml-ray] checkpoint {checkpoint.path} is gone; resuming from {kept[0].path}",
                        flush=True,
                    )
                    checkpoint_path.checkpoint = kept[0]
            return super().restore(checkpoint_path)

    Trial.__name__ = trial_function.__name__  # trial names and folders as before
    return Trial


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
    filesystem, base = pafs.FileSystem.from_uri(path if is_remote(path) else os.path.abspath(path))
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
        filesystem = None
        if is_remote(storage):
            from pyarrow import fs as pafs

            filesystem, _ = pafs.FileSystem.from_uri(storage)
        checkpoint = ray.train.Checkpoint(last["checkpoint_path"], filesystem=filesystem)
    if checkpoint is None:
        return None
    local = checkpoint.to_directory(os.path.join(folder, "checkpoint"))
    best = os.path.join(local, BEST_FILE)
    return best if os.path.exists(best) else None


def make_callback(bridge: TrackingBridge):
    """The Tune callback that hands trial events to ``bridge``."""
    from ray.tune import Callback

    class MlflowBridgeCallback(Callback):
        def __init__(self, bridge):
            self.bridge = bridge

        def on_trial_start(self, iteration, trials, trial, **info):
            self.bridge.trial_started(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.bridge.trial_result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.bridge.trial_ended(trial, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.bridge.trial_ended(trial, failed=True)

        def on_experiment_end(self, trials, **info):
            self.bridge.finish()

    return MlflowBridgeCallback(bridge)


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


def experiment_path(plan: RunPlan, name: str) -> str:
    """Where Tune keeps a sweep's state (the folder ``--resume`` restores)."""
    return join_uri(plan.cfg.tracking.storage_path, name)


def run(
    plan: RunPlan,
    space: SearchSpace | None = None,
    trials: int = 1,
    concurrency: int = 0,
    resume: bool = False,
    name: str = "",
    verbose: bool = False,
    fuse: int = 0,
) -> RunOutcome:
    """Run one training (``space`` None) or a sweep of ``trials`` configs, tracked in MLflow.

    ``fuse``: configs per fused trial (0 = ``DEFAULT_FUSE`` where the sweep can fuse, 1 = one config per trial).
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from uml_ray.tracking.runs import check_run_name

    cfg = plan.cfg
    name = (
        name or cfg.tracking.run_name or f"{'sweep' if space else 'train'}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    check_run_name(name)
    path = experiment_path(plan, name)
    if resume and not tune.Tuner.can_restore(path):
        raise UserError(f"--resume: no run named '{name}' at {path}; check --name and tracking.storage_path")
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
        restorable(
            tune.with_parameters(_trial, plan=plan, seed_policy=seed_policy, rungs=rungs, ended=ended)
        ),
        trial_resources(plan),
    )
    if resume:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        metric = space.metric if space else "best_val_acc"
        sweep_params = {"base." + k: v for k, v in cfg.flat().items()}
        if space:
            sweep_params.update(
                {
                    f"space.{p.key}": {
                        k: v for k, v in vars(p).items() if k != "key" and v not in (None, [], False)
                    }
                    for p in space.params
                }
            )
            sweep_params.update(
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
        bridge = TrackingBridge(
            plan,
            name,
            single_run=space is None,
            sweep_params=sweep_params,
            resolve=functools.partial(resolve_trial, plan, seed_policy),
            fetch_best=fetch_best_weights,
            verbose=verbose,
        )
        validations = -(-cfg.train.max_steps // cfg.train.val_every)
        # a grid is an exhaustive table: every point runs to the end; fused trials halve their
        # members at ASHA's rungs themselves
        asha = space is not None and not grid and fuse == 1
        # a searcher stops the sweep itself, after `trials` distinct configs (a fused trial holds
        # several; a trial lost with a killed driver is handed again on --resume): no bound on Tune trials
        samples = -1 if searched else 1
        if fused_grid is not None:
            param_space = {MEMBERS: tune.grid_search(fused_grid)}
        else:
            param_space = _tune_space(space) if space else {}
        tune_config = tune.TuneConfig(
            metric=metric,
            mode="max",
            num_samples=samples,
            # the searcher limits concurrency itself (checked_searcher: Tune's limiter can wait for ever
            # after a resume)
            max_concurrent_trials=None if searched else concurrent,
            # a trial process keeps torch and uml_ray imported for the next trial (seconds per trial).
            # An inline trial stopped by ASHA is parked in its report and ends at once; a stopped
            # TorchTrainer trial is still tearing its workers down, and Tune errors the next trial
            # when the process it reuses is busy for more than TUNE_FUNCTION_THREAD_TIMEOUT_S
            reuse_actors=use_inline(cfg),
            search_alg=_searcher(space, plan, seed_policy, trials, fuse, concurrent) if searched else None,
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=validations,
                grace_period=max(1, validations // 4),
                reduction_factor=REDUCTION_FACTOR,
            )
            if asha
            else None,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=name,
                storage_path=cfg.tracking.storage_path,
                callbacks=[make_callback(bridge)],
                # the latest checkpoint serves resume and the best-val weights; one spare, so Tune
                # need not snapshot the whole experiment at every checkpoint
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
                verbose=1 if verbose else 0,
            ),
        )
    with pending_trials(concurrent if searched else 0):
        results = tuner.fit()
    return summarize(results, plan, name, path, space)


def param_importances(rows: list[dict], space: SearchSpace, metric: str) -> dict[str, float]:
    """fANOVA-style importances of the searched params, from Optuna, over the scored trials."""
    import optuna

    if len(rows) < 3:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {}
    for p in space.params:
        if p.type == "choice":
            distributions[p.key] = optuna.distributions.CategoricalDistribution(
                [json.dumps(v) for v in p.values]
            )
        elif p.type == "int":
            distributions[p.key] = optuna.distributions.IntDistribution(p.low, p.high, log=p.log)
        else:
            distributions[p.key] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
    study = optuna.create_study(direction="maximize")
    for row in rows:
        params = {
            k: (
                json.dumps(row["config"][k])
                if isinstance(distributions[k], optuna.distributions.CategoricalDistribution)
                else row["config"][k]
            )
            for k in distributions
            if k in row["config"]
        }
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: distributions[k] for k in params},
                value=float(row["metrics"][metric]),
            )
        )
    try:
        return {
            k: float(v)
            for k, v in optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            ).items()
        }
    except (RuntimeError, ValueError):
        return {}
