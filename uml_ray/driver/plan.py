"""Build the run plan: check config, data, search space and tracking before any cluster work.

``build_plan`` is the one place where a run is checked against its dataset; everything it
finds wrong is a ``UserError`` (exit 2) raised before Ray starts. ``load_tables`` then reads
the in-memory shares once and puts them in the Ray object store for every trial.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from uml_ray.config import Config, check_modalities
from uml_ray.data.format import ID, LABEL
from uml_ray.data.streams import plan_streams, read_column, read_table
from uml_ray.errors import ConfigError
from uml_ray.search.space import SearchSpace, check_space
from uml_ray.train.plan import DatasetFacts, RunPlan
from uml_ray.uri import absolute


def build_plan(cfg: Config, space: SearchSpace | None = None) -> RunPlan:
    """Validate data, alpha modalities, search space and tracking; plan the streams. No Ray yet."""
    from uml_ray.cluster import check_storage_path
    from uml_ray.data.validate import require_valid_manifest
    from uml_ray.tracking.store import check_tracking, resolve_tracking_uri

    if not cfg.data.manifest:
        raise ConfigError(
            "data.manifest is empty; set it to a manifest file (e.g. data.manifest=data/manifest.yaml)"
        )
    manifest = require_valid_manifest(cfg.data.manifest, cfg.data.max_abs_feature)
    auxiliary = cfg.data.auxiliary or manifest.auxiliary
    for name in auxiliary:
        if name not in manifest.auxiliary:
            raise ConfigError(
                f"data.auxiliary: '{name}' is not an auxiliary modality of {manifest.path}; "
                f"choose from {manifest.auxiliary}"
            )
    check_modalities(cfg, auxiliary)
    check_kinds(cfg, manifest, auxiliary)
    check_target_projection(cfg, manifest, auxiliary)
    if space is not None:
        check_space(space, cfg, auxiliary)
    check_storage_path(cfg.tracking.storage_path)
    # recorded configs (MLflow, `uml-ray best`) must run from any folder: nothing cwd-relative
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, auxiliary=list(auxiliary), manifest=absolute(cfg.data.manifest)),
        tracking=dataclasses.replace(
            cfg.tracking,
            uri=resolve_tracking_uri(cfg.tracking.uri),
            storage_path=absolute(cfg.tracking.storage_path),
        ),
    )
    check_tracking(cfg.tracking.uri, cfg.tracking.experiment)
    streams = plan_streams(manifest, auxiliary, cfg.data.cache_max_mb)
    workers = cfg.resources.num_workers
    for name, spec in streams.items():
        if spec.rows < workers:
            # each worker takes its own slice of every dataset: an empty slice would stall the others
            raise ConfigError(
                f"dataset '{name}' has {spec.rows} row(s), fewer than resources.num_workers={workers}; "
                f"use resources.num_workers<={spec.rows} or give '{name}' more rows"
            )
    check_target_per_class(cfg, manifest, streams, space)
    check_aux_per_class(cfg, manifest, list(auxiliary), space)
    check_select_folds(cfg, manifest, streams, space)
    cfg = clamp_batch_size(cfg, manifest, streams, space)
    return RunPlan(cfg, DatasetFacts(manifest, tuple(auxiliary)), streams)


def clamp_batch_size(cfg: Config, manifest, streams: dict, space: SearchSpace | None) -> Config:
    """A ``train.batch_size`` above the target train rows one worker holds trains full-batch: the
    config says so (the value MLflow records is the one used) and the console says it once. A space
    whose batch sizes exceed the rows is said once too (those configs train full-batch)."""
    rows = streams[f"{manifest.target}.train"].rows // cfg.resources.num_workers
    if cfg.data.target_per_class > 0:
        rows = min(rows, cfg.data.target_per_class * len(manifest.classes) // cfg.resources.num_workers)
    if cfg.train.select_folds > 1:  # a fold trains on the train+val pool but its held-out fold
        pool = rows + streams[f"{manifest.target}.val"].rows
        rows = pool - -(-pool // cfg.train.select_folds)
    rows = max(rows, 1)
    sampled = [p.values for p in (space.params if space else []) if p.key == "train.batch_size"]
    over = sorted({v for values in sampled for v in values if isinstance(v, int) and v > rows})
    if over:
        print(
            f"[uml-ray] search space: train.batch_size {over} exceed the {rows} target train rows a worker "
            f"holds; those configs train full-batch ({rows} rows a step)",
            flush=True,
        )
    if cfg.train.batch_size <= rows:
        return cfg
    print(
        f"[uml-ray] train.batch_size={cfg.train.batch_size} is larger than the {rows} target train rows a "
        f"worker holds: using {rows} (recorded as used)",
        flush=True,
    )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=rows))


def check_target_projection(cfg: Config, manifest, auxiliary: list[str]) -> None:
    """``model.project_target=false`` feeds the target straight into the shared head, which only fits
    when the target's dim is the shared width; otherwise the model would project it anyway."""
    if cfg.model.regime != "supervised" or cfg.model.project_target or cfg.model.backbone:
        return
    dims = {name: spec.dim for name, spec in manifest.modalities.items()}
    active = [m for m, a in cfg.alpha_for(auxiliary).items() if a > 0]
    width = cfg.model.shared_dim or dims[active[0] if active else manifest.target]
    if dims[manifest.target] != width:
        source = (
            "model.shared_dim"
            if cfg.model.shared_dim
            else f"the dim of auxiliary '{active[0]}' (model.shared_dim=0)"
        )
        raise ConfigError(
            f"model.project_target=false feeds the target '{manifest.target}' ({dims[manifest.target]}-d) "
            f"into the shared head directly, but the shared width is {width} ({source}); "
            f"set model.project_target=true, or model.shared_dim={dims[manifest.target]} when the "
            "auxiliary features are in the target's space"
        )


def _space_max(cfg_value: int, key: str, space: SearchSpace | None) -> int:
    """The largest value ``key`` takes: the config's, or the largest a space may sample."""
    wanted = [cfg_value]
    for param in space.params if space is not None else []:
        if param.key == key:
            wanted += list(param.values) if param.type == "choice" else [param.high]
    return max(wanted)


def class_counts(manifest, modality: str) -> np.ndarray:
    """Train rows per class of one modality (only the label column is read)."""
    labels = read_column(manifest.uris(modality, "train"), LABEL)
    return np.bincount(labels, minlength=len(manifest.classes))


def check_target_per_class(cfg: Config, manifest, streams: dict, space: SearchSpace | None) -> None:
    """``data.target_per_class`` (the config's value or the largest a space may sample) needs the
    target's train split in memory and at least that many rows in every class: fewer would be
    taken silently."""
    k = _space_max(cfg.data.target_per_class, "data.target_per_class", space)
    if k <= 0:
        return
    name = f"{manifest.target}.train"
    if not streams[name].cached:
        raise ConfigError(
            f"data.target_per_class={k} selects rows of '{name}' in memory, but it is larger than "
            f"data.cache_max_mb={cfg.data.cache_max_mb}; raise data.cache_max_mb"
        )
    counts = class_counts(manifest, manifest.target)
    if counts.min() < k:
        poorest = manifest.classes[int(counts.argmin())]
        raise ConfigError(
            f"data.target_per_class={k}: class '{poorest}' has only {counts.min()} train row(s) of "
            f"'{manifest.target}' in {manifest.path}; use data.target_per_class<={counts.min()} "
            "or a larger train split"
        )


def check_select_folds(cfg: Config, manifest, streams: dict, space: SearchSpace | None) -> None:
    """``train.select_folds`` (the config's value or the largest a space may sample) re-splits the
    target's train+val rows in memory into k folds, each holding a row of every class."""
    from uml_ray.data.folds import check_folds

    k = _space_max(cfg.train.select_folds, "train.select_folds", space)
    if k <= 0:
        return
    for split in ("train", "val"):
        name = f"{manifest.target}.{split}"
        if not streams[name].cached:
            raise ConfigError(
                f"train.select_folds={k} re-splits '{name}' in memory, but it is larger than "
                f"data.cache_max_mb={cfg.data.cache_max_mb}; raise data.cache_max_mb or set "
                "train.select_folds=0"
            )
    train = class_counts(manifest, manifest.target)
    # the smallest pool a config may train on: the fewest target rows per class it may keep
    kept = [cfg.data.target_per_class] + [
        v
        for p in (space.params if space is not None else [])
        if p.key == "data.target_per_class"
        for v in (p.values if p.type == "choice" else [p.low])
    ]
    if any(v > 0 for v in kept):
        train = np.minimum(train, min(v for v in kept if v > 0))
    val = np.bincount(
        read_column(manifest.uris(manifest.target, "val"), LABEL), minlength=len(manifest.classes)
    )
    check_folds(k, train + val, manifest.classes, f"'{manifest.target}' in {manifest.path}")


def check_aux_per_class(cfg: Config, manifest, auxiliary: list[str], space: SearchSpace | None) -> None:
    """``data.aux_per_class`` (the config's value or the largest a space may sample) keeps k rows of
    every class an auxiliary modality has: a class with fewer would silently get fewer, and an
    N_y axis past that would train the same data twice under different labels."""
    k = _space_max(cfg.data.aux_per_class, "data.aux_per_class", space)
    if k <= 0 or cfg.model.regime != "supervised":
        return
    for name in auxiliary:
        counts = class_counts(manifest, name)
        present = np.flatnonzero(counts)
        if len(present) and counts[present].min() < k:
            poorest = int(present[counts[present].argmin()])
            raise ConfigError(
                f"data.aux_per_class={k}: class '{manifest.classes[poorest]}' has only {counts[poorest]} "
                f"train row(s) of auxiliary '{name}' in {manifest.path}; "
                f"use data.aux_per_class<={counts[poorest]} "
                f"or more '{name}' rows"
            )


def check_kinds(cfg: Config, manifest, auxiliary: list[str]) -> None:
    """The regime fits the dataset's row kinds: sequences for the sequence regime; vectors for the
    head-only regime; an image target (auxiliaries vectors) with ``model.backbone`` for fine-tuning."""
    target_kind = manifest.modalities[manifest.target].kind
    if cfg.model.regime == "supervised" and (target_kind == "image" or cfg.model.backbone):
        if not cfg.model.backbone:
            raise ConfigError(
                f"{manifest.path}: the target '{manifest.target}' holds images (kind image); "
                "set model.backbone (e.g. efficientnet-lite0) to fine-tune on them"
            )
        if target_kind != "image":
            raise ConfigError(
                f"model.backbone='{cfg.model.backbone}' fine-tunes on images, but the target "
                f"'{manifest.target}' of {manifest.path} holds {target_kind} rows; "
                "write image shards (uml-ray data images) "
                "or set model.backbone='' for the head-only regime"
            )
        wrong = {m: manifest.modalities[m].kind for m in auxiliary if manifest.modalities[m].kind != "vector"}
        if wrong:
            raise ConfigError(
                f"{manifest.path}: fine-tuning reads auxiliary modalities as frozen feature vectors; "
                f"{wrong} are not"
            )
        from uml_ray.models.backbone import check_backbone

        check_backbone(cfg.model.backbone, cfg.model.freeze_blocks, cfg.model.image_size)
        return
    kinds = {manifest.modalities[m].kind for m in [manifest.target] + auxiliary}
    wanted = "sequence" if cfg.model.regime == "sequence" else "vector"
    if kinds != {wanted}:
        raise ConfigError(
            f"model.regime={cfg.model.regime} needs {wanted} shards; {manifest.path} has {sorted(kinds)}"
        )


def load_tables(plan: RunPlan) -> RunPlan:
    """Read every in-memory (modality, split) once and put it in the Ray object store (Ray must be up)."""
    import ray

    # sorted by row id once here, so no trial or worker sorts it again (streams take id-sorted shares)
    tables = {
        name: ray.put(read_table(plan.dataset.manifest.uris(*name.rsplit(".", 1))).sort_by(ID))
        for name, spec in plan.streams.items()
        if spec.cached
    }
    return dataclasses.replace(plan, tables=tables)
