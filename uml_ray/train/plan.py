"""The run plan: everything a training run needs, built once by the driver and passed down as it is.

The driver (``uml_ray.driver.plan.build_plan``) checks the config, the data and the tracking
store before any cluster work, then freezes the result here: the validated ``Config``, the facts
of the dataset it reads, and how each (modality, split) is consumed. Trials get this object
through the Ray object store and apply only their sampled parameters (``with_params``); the
loops read it directly. No dict round-trips on the way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from uml_ray.config import Config, apply_overrides
from uml_ray.data.manifest import Manifest
from uml_ray.data.parquet_source import ParquetSource
from uml_ray.data.streams import StreamSpec, shape_auxiliary, shape_target


@dataclass(frozen=True)
class DatasetFacts:
    """What the loops need to know of the dataset: its manifest, target, used auxiliaries and dims."""

    manifest: Manifest
    auxiliary: tuple[str, ...]

    @property
    def target(self) -> str:
        """The target modality."""
        return self.manifest.target

    @property
    def classes(self) -> list[str]:
        """Ordered class names."""
        return self.manifest.classes

    @property
    def dims(self) -> dict[str, int]:
        """Feature dim of every modality."""
        return {name: spec.dim for name, spec in self.manifest.modalities.items()}

    def summary(self) -> dict:
        """Plain-data description stored beside best-val weights (what a checkpoint was trained on)."""
        return {
            "name": self.manifest.name,
            "path": self.manifest.path,
            "target": self.target,
            "classes": list(self.classes),
            "auxiliary": list(self.auxiliary),
            "dims": self.dims,
        }


@dataclass(frozen=True)
class RunPlan:
    """A checked run: config, dataset facts, stream plan, and the in-memory shares' object refs.

    ``tables`` maps a dataset name to the Ray object ref of its whole Arrow table: datasets that
    fit in memory are read once per sweep by the driver and shared by every trial and worker.
    """

    cfg: Config
    dataset: DatasetFacts
    streams: dict[str, StreamSpec]
    tables: dict = field(default_factory=dict)

    def with_params(self, params: dict) -> RunPlan:
        """This plan with a trial's sampled (dotted) parameters applied and checked."""
        if not params:
            return self
        return dataclasses.replace(self, cfg=apply_overrides(self.cfg, params))

    def shape_table(self, name: str, table):
        """An in-memory share as the run uses it: target train rows per ``data.target_per_class``,
        auxiliary vector rows per ``data.aux_*``."""
        modality, split = name.rsplit(".", 1)
        data = self.cfg.data
        if self.streams[name].kind != "vector":
            return table
        if modality == self.dataset.target:
            return (
                shape_target(table, data.target_per_class, self.cfg.train.seed) if split == "train" else table
            )
        return shape_auxiliary(table, data.aux_per_class, data.aux_class_mean, self.cfg.train.seed)

    def ray_data_streams(self, multi_worker: bool) -> list[str]:
        """The streamed shares (over ``data.cache_max_mb``) read through Ray Data; pyarrow reads the
        others (``parquet_source``). Ray Data: images in a multi-worker run (its tasks decode them),
        auxiliary vector shares shaped by ``data.aux_per_class``/``data.aux_class_mean`` (groupbys
        over the whole table), and in a multi-worker run every share when ``data.stream_reader`` is
        ``ray_data``. pyarrow otherwise: no Ray Data execution to start every epoch, and each worker
        reads its own row range, so a resume is exact."""
        data = self.cfg.data
        shaped = data.aux_per_class > 0 or data.aux_class_mean
        names = []
        for name, spec in self.streams.items():
            if spec.cached:
                continue
            auxiliary = name.rsplit(".", 1)[0] != self.dataset.target
            if (shaped and spec.kind == "vector" and auxiliary) or (
                multi_worker and (spec.kind == "image" or data.stream_reader == "ray_data")
            ):
                names.append(name)
        return names

    def parquet_source(self, name: str, rank: int = 0, world_size: int = 1) -> ParquetSource:
        """Rank ``rank``'s row range of a streamed share, read by pyarrow with read-ahead sized from
        the step time (a shuffle buffer's fill is the burst it takes at once)."""
        data = self.cfg.data
        cap = int(data.stream_cache_max_gb * 2**30) if data.stream_cache_max_gb > 0 else None
        block_rows = 8192
        return ParquetSource(
            self.dataset.manifest.uris(*name.rsplit(".", 1)),
            block_rows=block_rows,
            rank=rank,
            world_size=world_size,
            cache_max_bytes=cap,
            burst=-(-data.shuffle_buffer // block_rows),
        )

    def alpha(self) -> dict[str, float]:
        """Alpha of every used auxiliary modality (``train.alpha[m]``, else ``train.alpha_default``)."""
        return self.cfg.alpha_for(self.dataset.auxiliary)
