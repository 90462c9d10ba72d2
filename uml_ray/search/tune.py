"""Ray Tune + Optuna (TPE) + ASHA: the driver of every run, single trainings and sweeps alike.

The only module that drives Tune and Optuna. ``prepare`` checks everything a run needs before
any cluster work; ``run`` builds the Tuner (or restores it), forwards every trial event to the
MLflow tracker from this driver process, and returns the results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from uml_ray.cluster import attach_or_start_ray, check_storage_for_cluster, cluster_address
from uml_ray.config import Config, apply_overrides, config_from_dict, dump_config
from uml_ray.data.format import is_remote, join_uri
from uml_ray.data.streams import plan_streams, start_ray_data_helpers
from uml_ray.errors import ConfigError, UserError
from uml_ray.search.space import SearchSpace, check_space
from uml_ray.train.runner import BEST_FILE, run_trial, storage_root, use_inline

log = logging.getLogger("uml_ray")


@dataclass
class Prepared:
    """Everything a run needs, checked on the driver before Ray starts."""

    cfg: Config
    plan: dict
    dataset_info: dict


def prepare(cfg: Config, space: SearchSpace | None = None) -> Prepared:
    """Validate data, alpha modalities, search space and tracking; plan the streams. No Ray yet."""
    from uml_ray.data.validate import require_valid_manifest
    from uml_ray.tracking.mlflow_store import check_tracking, resolve_tracking_uri

    if not cfg.data.manifest:
        raise ConfigError("data.manifest is empty; set it to a manifest file (e.g. data.manifest=data/manifest.yaml)")
    manifest = require_valid_manifest(cfg.data.manifest)
    auxiliary = cfg.data.auxiliary or manifest.auxiliary
    for name in auxiliary:
        if name not in manifest.auxiliary:
            raise ConfigError(f"data.auxiliary: '{name}' is not an auxiliary modality of {manifest.path}; choose from {manifest.auxiliary}")
    for name in cfg.train.alpha:
        if name not in auxiliary:
            raise ConfigError(f"train.alpha.{name}: '{name}' is not a used auxiliary modality; choose from {auxiliary}")
    kinds = {manifest.modalities[m].kind for m in [manifest.target] + auxiliary}
    wanted = "sequence" if cfg.model.regime == "sequence" else "vector"
    if kinds != {wanted}:
        raise ConfigError(f"model.regime={cfg.model.regime} needs {wanted} shards; {manifest.path} has {sorted(kinds)}")
    if cfg.model.regime == "sequence" and cfg.train.step_k > 0 and not any(
            cfg.train.alpha.get(m, cfg.train.alpha_default) > 0 for m in auxiliary):
        raise ConfigError(f"train.step_k={cfg.train.step_k} warms up on auxiliary modalities only, but every alpha is 0; "
                          "set train.alpha_default > 0 or train.step_k=-1")
    if space is not None:
        check_space(space, cfg, auxiliary)
    tree = cfg.to_dict()
    tree["tracking"]["uri"] = resolve_tracking_uri(cfg.tracking.uri)
    tree["tracking"]["storage_path"] = storage_root(cfg.tracking.storage_path)
    tree["data"]["auxiliary"] = list(auxiliary)
    # recorded configs (MLflow, `uml-ray best`) must run from any folder: no cwd-relative manifest
    tree["data"]["manifest"] = cfg.data.manifest if is_remote(cfg.data.manifest) else os.path.abspath(cfg.data.manifest)
    cfg = config_from_dict(tree)
    check_tracking(cfg.tracking.uri, cfg.tracking.experiment)
    plan = plan_streams(manifest, auxiliary, cfg.resources.num_workers, cfg.data.cache_max_mb)
    info = {
        "target": manifest.target,
        "classes": manifest.classes,
        "auxiliary": list(auxiliary),
        "dims": {name: spec.dim for name, spec in manifest.modalities.items()},
        "manifest": {**manifest.to_dict(), "name": manifest.name},
    }
    return Prepared(cfg, {name: vars(spec) for name, spec in plan.items()}, info)


def init_ray(cfg: Config) -> None:
    """Attach to the configured/RAY_ADDRESS cluster, or start a local Ray with ``resources.num_cpus``."""
    attach_or_start_ray(cfg.resources.address, cfg.resources.num_cpus)


def trial_resources(cfg: Config) -> dict:
    """What one trial holds: the whole single worker inline, or just the TorchTrainer's driver."""
    if use_inline(cfg):
        resources = {"CPU": cfg.resources.cpus_per_worker}
        if cfg.resources.gpus_per_worker > 0:
            resources["GPU"] = cfg.resources.gpus_per_worker
        return resources
    # the trial only drives a TorchTrainer whose workers hold the real resources; Tune refuses
    # an empty request, so it holds a sliver
    return {"CPU": 0.01}


def max_concurrency(cfg: Config, requested: int) -> int:
    """Concurrent trials that fit beside ``resources.data_cpus`` CPUs kept free for Ray Data."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    per_trial = cfg.resources.cpus_per_worker * cfg.resources.num_workers
    fit = int((cpus - cfg.resources.data_cpus) // per_trial) if per_trial else requested
    if fit < 1 and not cluster_address(cfg.resources.address):
        raise ConfigError(
            f"a trial needs {per_trial:g} CPUs plus resources.data_cpus={cfg.resources.data_cpus:g} for Ray Data, "
            f"but this Ray has {cpus:g}; lower resources.num_workers/cpus_per_worker/data_cpus or raise resources.num_cpus"
        )
    return max(1, min(requested or fit, fit)) if fit >= 1 else max(1, requested or 1)


def trial_seed(base_seed: int, trial_id: str) -> int:
    """Per-trial seed derived from the config seed and the trial id (stable across resumes)."""
    digest = hashlib.sha256(f"{base_seed}:{trial_id}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


def _trial(params: dict, base: dict, plan: dict, dataset_info: dict, seed_policy: str) -> None:
    import ray.tune

    if seed_policy == "per_trial":
        params = {**params, "train.seed": trial_seed(base["train"]["seed"], ray.tune.get_context().get_trial_id())}
    run_trial(params, base, plan, dataset_info)


def _tune_space(space: SearchSpace) -> dict:
    from ray import tune

    out = {}
    for p in space.params:
        if p.type == "choice":
            out[p.key] = tune.choice(p.values)
        elif p.type == "int":
            out[p.key] = tune.lograndint(p.low, p.high + 1) if p.log else tune.randint(p.low, p.high + 1)
        else:
            out[p.key] = tune.loguniform(p.low, p.high) if p.log else tune.uniform(p.low, p.high)
    return out


class TrackingBridge:
    """Forwards Tune trial events to MLflow from the driver (the one writer).

    Picklable: Tune stores callbacks with the experiment, and a restored sweep gets this back;
    the MLflow tracker is rebuilt lazily after unpickling.
    """

    def __init__(self, base: dict, sweep: str, single_run: bool, sweep_params: dict, seed_policy: str):
        self.base = base
        self.sweep = sweep
        self.single_run = single_run
        self.sweep_params = sweep_params
        self.seed_policy = seed_policy
        self._tracker = None

    def __getstate__(self):
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self):
        from uml_ray.tracking.mlflow_store import SweepTracker

        if self._tracker is None:
            tracking = self.base["tracking"]
            self._tracker = SweepTracker(tracking["uri"], tracking["experiment"], tracking["artifact_location"], self.sweep, self.single_run)
            self._tracker.start_sweep(self.sweep_params)
        return self._tracker

    def resolved_config(self, trial) -> Config:
        params = dict(trial.config)
        if self.seed_policy == "per_trial":
            params["train.seed"] = trial_seed(self.base["train"]["seed"], trial.trial_id)
        return apply_overrides(config_from_dict(self.base), params)

    def trial_started(self, trial) -> None:
        cfg = self.resolved_config(trial)
        self.tracker.start_trial(trial.trial_id, cfg.flat(), {"uml_ray.sampled": json.dumps(trial.config, default=str)})

    def trial_result(self, trial, result: dict) -> None:
        self.trial_started(trial)
        self.tracker.log_metrics(trial.trial_id, result, step=int(result.get("step", result.get("training_iteration", 0))))

    def trial_ended(self, trial, failed: bool) -> None:
        self.trial_started(trial)
        last = trial.last_result or {}
        if failed:
            status, outcome = "FAILED", "failed"
        elif last.get("completed"):
            status, outcome = "FINISHED", "stopped_early" if last.get("stopped_early") else "finished"
        else:
            status, outcome = "KILLED", "pruned"
        with tempfile.TemporaryDirectory() as folder:
            artifacts = {"": _config_file(self.resolved_config(trial), folder)}
            best = _fetch_best(trial, last, self.base["tracking"]["storage_path"], folder)
            if best:
                artifacts["checkpoint"] = best
            self.tracker.end_trial(trial.trial_id, status, outcome, artifacts)


def _config_file(cfg: Config, folder: str) -> str:
    path = os.path.join(folder, "config.yaml")
    dump_config(cfg, path)
    return path


def _fetch_best(trial, last: dict, storage: str, folder: str) -> str | None:
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


def _make_callback(bridge: TrackingBridge):
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

    return MlflowBridgeCallback(bridge)


@dataclass
class RunOutcome:
    """What a finished run or sweep produced."""

    name: str
    path: str
    best_config: dict
    best_metrics: dict
    results: list[dict]


def experiment_path(cfg: Config, name: str) -> str:
    """Where Tune keeps a sweep's state (the folder ``--resume`` restores)."""
    return join_uri(cfg.tracking.storage_path, name)


def run(prepared: Prepared, space: SearchSpace | None = None, trials: int = 1, concurrency: int = 0,
        resume: bool = False, name: str = "") -> RunOutcome:
    """Run one training (``space`` None) or a sweep of ``trials`` trials, tracked in MLflow."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    cfg = prepared.cfg
    name = name or cfg.tracking.run_name or f"{'sweep' if space else 'train'}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = experiment_path(cfg, name)
    if resume and not tune.Tuner.can_restore(path):
        raise UserError(f"--resume: no sweep state at {path}; check --name and tracking.storage_path")
    if not resume and not is_remote(path) and Path(path, "tuner.pkl").exists():
        raise UserError(f"a run named '{name}' already exists at {path}; pass --resume to continue it, or another --name")
    init_ray(cfg)
    check_storage_for_cluster(cfg.tracking.storage_path, ray.nodes())
    if cluster_address(cfg.resources.address):
        # an attached (possibly autoscaling) cluster: Ray Data's helper actors on the driver's
        # node, not on a worker node they would keep alive
        start_ray_data_helpers()
    seed_policy = space.seed_policy if space else "fixed"
    base = cfg.to_dict()
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, plan=prepared.plan, dataset_info=prepared.dataset_info, seed_policy=seed_policy),
        trial_resources(cfg),
    )
    if resume:
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        metric = space.metric if space else "best_val_acc"
        sweep_params = {"base." + k: v for k, v in cfg.flat().items()}
        if space:
            sweep_params.update({f"space.{p.key}": {k: v for k, v in vars(p).items() if k != "key" and v not in (None, [], False)} for p in space.params})
            sweep_params.update({"searcher": "optuna-tpe", "scheduler": "asha", "trials": trials, "seed": cfg.train.seed,
                                 "seed_policy": seed_policy, "metric": metric})
        bridge = TrackingBridge(base, name, single_run=space is None, sweep_params=sweep_params, seed_policy=seed_policy)
        validations = -(-cfg.train.max_steps // cfg.train.val_every)
        tune_config = tune.TuneConfig(
            metric=metric,
            mode="max",
            num_samples=trials if space else 1,
            max_concurrent_trials=max_concurrency(cfg, concurrency),
            search_alg=OptunaSearch(seed=cfg.train.seed) if space else None,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=validations, grace_period=max(1, validations // 4),
                                    reduction_factor=2) if space else None,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=_tune_space(space) if space else {},
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=name,
                storage_path=cfg.tracking.storage_path,
                callbacks=[_make_callback(bridge)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
                verbose=1,
            ),
        )
    results = tuner.fit()
    return _summarize(results, cfg, name, path, space)


def _summarize(results, cfg: Config, name: str, path: str, space: SearchSpace | None) -> RunOutcome:
    """Best result, study summary and plots onto the parent run; the outcome for the CLI."""
    from uml_ray.search.report import sweep_plots
    from uml_ray.tracking.mlflow_store import SweepTracker

    rows, errors = [], []
    for result in results:
        if result.error:
            errors.append(str(result.error))
        if result.metrics is None:
            continue
        rows.append({"trial_id": result.metrics.get("trial_id"), "config": result.config, "metrics": dict(result.metrics),
                     "error": str(result.error) if result.error else ""})
    metric = space.metric if space else "best_val_acc"
    scored = [r for r in rows if r["metrics"].get(metric) is not None]
    if not scored:
        # trials that failed before their first report have no metrics: their errors are the story
        raise UserError(f"no trial of '{name}' reported {metric}. {'; '.join(errors)[:4000]}")
    # like `uml-ray best`: completed trials only (ASHA-pruned ones never reached their best-val
    # point), ties broken by the lower validation loss at that point
    finalists = [r for r in scored if r["metrics"].get("completed")] or scored
    best = max(finalists, key=lambda r: (r["metrics"][metric], -r["metrics"].get("best_val_loss", 0.0)))
    if space is not None:
        tracker = SweepTracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_location, name)
        tracker.start_sweep({})
        completed = sum(1 for r in rows if r["metrics"].get("completed"))
        summary = {"best_" + metric: best["metrics"][metric], "best_test_acc": best["metrics"].get("test_acc", float("nan")),
                   "trials": len(rows), "completed_trials": completed, "pruned_trials": len(rows) - completed}
        with tempfile.TemporaryDirectory() as folder:
            study = os.path.join(folder, "study_summary.json")
            importances = param_importances(scored, space, metric)
            Path(study).write_text(json.dumps({"best_trial": best["trial_id"], "best_config": best["config"], "summary": summary,
                                               "importances": importances, "trials": rows}, indent=2, default=str))
            plots = sweep_plots(scored, space, metric, importances, folder)
            tracker.end_sweep(summary, {**best["config"], "trial_id": best["trial_id"]}, [study, *plots])
    return RunOutcome(name, path, best["config"], best["metrics"], rows)


def param_importances(rows: list[dict], space: SearchSpace, metric: str) -> dict[str, float]:
    """fANOVA-style importances of the searched params, from Optuna, over the scored trials."""
    import optuna

    if len(rows) < 3:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {}
    for p in space.params:
        if p.type == "choice":
            distributions[p.key] = optuna.distributions.CategoricalDistribution([json.dumps(v) for v in p.values])
        elif p.type == "int":
            distributions[p.key] = optuna.distributions.IntDistribution(p.low, p.high, log=p.log)
        else:
            distributions[p.key] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
    study = optuna.create_study(direction="maximize")
    for row in rows:
        params = {k: (json.dumps(row["config"][k]) if isinstance(distributions[k], optuna.distributions.CategoricalDistribution) else row["config"][k])
                  for k in distributions if k in row["config"]}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: distributions[k] for k in params},
                                                  value=float(row["metrics"][metric])))
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)).items()}
    except (RuntimeError, ValueError):
        return {}
