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
from uml_ray.data.format import Manifest
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

    def alpha(self) -> dict[str, float]:
        """Alpha of every used auxiliary modality (``train.alpha[m]``, else ``train.alpha_default``)."""
        return self.cfg.alpha_for(self.dataset.auxiliary)
