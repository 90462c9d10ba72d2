"""One trial's terms: the plan it trains (sampled params, derived seed), what it holds, how many fit.

No Ray Tune: the trainable that runs a trial is ``driver/trainable.py``.
"""

from __future__ import annotations

import hashlib

from uml_ray.cluster import cluster_address
from uml_ray.config import check_modalities
from uml_ray.driver.plan import check_target_projection
from uml_ray.errors import ConfigError
from uml_ray.train.plan import RunPlan
from uml_ray.train.runner import use_inline

# successive halving's factor inside a fused trial, and ASHA's across trials: a fused sweep
# prunes its configs as an unfused one would
REDUCTION_FACTOR = 2


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


def check_sample(plan: RunPlan, seed_policy: str, config: dict) -> None:
    """Raise ConfigError when the config refuses sampled ``config`` (before any trial trains it)."""
    resolve_trial(plan, seed_policy if seed_policy != "per_trial" else "fixed", "check", config)


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


def ray_data_streams(plan: RunPlan) -> list[str]:
    """The shares a trial of ``plan`` reads through Ray Data (a one-process trial, or Train workers)."""
    return plan.ray_data_streams(multi_worker=not use_inline(plan.cfg))


def data_cpus(plan: RunPlan) -> float:
    """CPUs kept free for Ray Data: none when no dataset is read through it (served from memory, or
    streamed by pyarrow), at least one image decode task's worth when a
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
    driver = trial_resources(plan)["CPU"] * (not use_inline(cfg))
    per_trial = cfg.resources.cpus_per_worker * cfg.resources.num_workers + driver
    reserved = data_cpus(plan)
    fit = int((cpus - reserved) // per_trial) if per_trial else requested
    if fit < 1 and not cluster_address(cfg.resources.address):
        raise ConfigError(
            f"a trial needs {per_trial:g} CPUs plus resources.data_cpus={reserved:g} for Ray Data, "
            f"but this Ray has {cpus:g}; lower resources.num_workers/cpus_per_worker/data_cpus "
            "or raise resources.num_cpus"
        )
    concurrency = max(1, min(requested or fit, fit)) if fit >= 1 else max(1, requested or 1)
    streams = ray_data_streams(plan)
    left = cpus - concurrency * per_trial
    if streams and left < 1 and not cluster_address(cfg.resources.address):
        # Ray Data's read tasks each ask for a whole CPU: with none free the run waits forever
        raise ConfigError(
            f"{', '.join(streams)} stream through Ray Data, whose read tasks need a whole CPU beside the "
            f"training workers, but {concurrency} trial(s) of {per_trial:g} CPUs leave {left:g} of this "
            f"Ray's {cpus:g}; set resources.data_cpus=1 (or lower resources.cpus_per_worker/num_workers)"
        )
    return concurrency
