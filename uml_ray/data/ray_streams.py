"""Ray Data datasets of the shares too large to hold in memory, and Ray Data's helper actors: the
only module here that touches Ray Data. A worker reads its split of each dataset once per run: its
``BatchStream`` spools the first pass to the decoded feature cache and replays it after that."""

from __future__ import annotations

import logging

from uml_ray.data.format import LABEL
from uml_ray.data.manifest import Manifest
from uml_ray.data.parquet_source import located
from uml_ray.data.streams import StreamSpec, _class_means, _select_per_class

log = logging.getLogger("uml_ray")

READ_TASK_CPUS = 0.25  # Ray Data read tasks stay small so they fit beside the training workers


def build_streamed_datasets(
    manifest: Manifest, plan: dict[str, StreamSpec], aux_per_class: int, aux_class_mean: bool, seed: int
) -> dict:
    """Lazy Ray Data datasets of the shares too large to hold in memory (``cached`` False), keyed by name.

    Auxiliary row options run as groupby operations; Ray Train splits these across workers.
    """
    import ray.data

    datasets = {}
    for name, spec in plan.items():
        if spec.cached:
            continue
        modality, split = name.rsplit(".", 1)
        uris = manifest.uris(modality, split)
        paths, filesystem = located(uris)
        ds = ray.data.read_parquet(paths, filesystem=filesystem, num_cpus=READ_TASK_CPUS)
        if modality != manifest.target and spec.kind == "vector":
            if aux_per_class > 0:
                ds = ds.groupby(LABEL).map_groups(
                    lambda t: _select_per_class(t, aux_per_class, seed), batch_format="pyarrow"
                )
            if aux_class_mean:
                ds = ds.groupby(LABEL).map_groups(_class_means, batch_format="pyarrow")
        datasets[name] = ds
    return datasets


def start_ray_data_helpers(timeout_s: float = 60.0) -> None:
    """Start Ray Data's cluster-wide helper actors from this (driver) process, on its node.

    Ray Data creates detached helper actors (the stats actor, the autoscaling coordinator) on the
    node of the first process that runs a dataset. Were that a trial on an autoscaled GPU node,
    the actors would keep the node busy for good and the autoscaler would never remove it. Their
    getters pin them to the calling process's node; trials later find them by name.
    """
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError as exc:  # another Ray version: the helpers land wherever Ray Data first runs
        log.warning(
            "Ray Data helper actors not started on the driver's node (%s); an autoscaled node may stay up",
            exc,
        )
        return
    actors = [get_or_create_stats_actor(), get_or_create_autoscaling_coordinator()]
    try:
        ray.get([actor.__ray_ready__.remote() for actor in actors], timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        log.warning("Ray Data helper actors did not start within %.0f s on the driver's node", timeout_s)
