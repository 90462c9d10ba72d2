"""Predictions of recorded best-val weights, and the prediction ensemble of several runs.

Every finished run records its product, ``checkpoint/best.pt``: the best-val weights with the
config and dataset they were trained with (``skeleton.run_loop``; a fused trial's member as the
model its config builds alone). ``Member`` rebuilds that model from the product alone, and its
class probabilities on the target's val and test rows are what the run was scored with: its
accuracies reproduce the recorded ``best_val_acc`` and ``test_acc``, so an ensemble of recorded
runs costs no training.

An ensemble's probabilities are the mean of its members' softmax probabilities (soft voting,
equal weights); its prediction is their argmax.

The supervised head-only regime (feature targets) only: a fine-tuned backbone's or a sequence
probe's predictions are not rebuilt here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from uml_ray.config import Config, config_from_dict
from uml_ray.data.format import ID, table_to_numpy
from uml_ray.data.manifest import Manifest, load_manifest
from uml_ray.data.streams import read_table
from uml_ray.errors import UserError
from uml_ray.models.supervised import SharedHeadUML
from uml_ray.train.loop import build_head

SPLITS = ("val", "test")
# evaluation batch: the size the training loop validates and tests head-only models with
EVAL_BATCH = 1024


@dataclass(frozen=True)
class Member:
    """One recorded run's model, rebuilt: its config, its dataset's manifest, the model with its
    best-val weights. ``name`` (the run's) appears in every error."""

    name: str
    cfg: Config
    manifest: Manifest
    model: SharedHeadUML

    @classmethod
    def from_product(cls, name: str, product: dict) -> Member:
        """The model a run's ``best.pt`` product holds; a UserError naming the run and what is missing
        when it cannot be rebuilt (another regime, a manifest no longer where it was)."""
        cfg = config_from_dict(product["config"], source=f"run {name}'s recorded config")
        if cfg.model.regime != "supervised":
            raise UserError(
                f"run {name}: regime '{cfg.model.regime}'; an ensemble is built of supervised head-only runs"
            )
        if cfg.train.select_folds > 1:
            raise UserError(
                f"run {name}: trained with train.select_folds={cfg.train.select_folds}, as fold models "
                "scored on held-out folds; an ensemble is built of runs validated on the manifest's "
                "val split (the k-fold sweep's answer is its refit: refit_test_acc on its parent run)"
            )
        path = cfg.data.manifest
        try:
            manifest = load_manifest(path)
        except (OSError, UserError) as exc:
            raise UserError(
                f"run {name}: its recorded manifest {path} cannot be read ({exc}); "
                "the ensemble rebuilds every member on the data it was trained on: put the dataset back there"
            ) from None
        facts = product["dataset"]
        target = manifest.target
        if target != facts["target"] or list(manifest.classes) != list(facts["classes"]):
            raise UserError(
                f"run {name}: the manifest at {path} now has target '{target}' and classes "
                f"{manifest.classes}, not the '{facts['target']}' and {facts['classes']} it was trained on"
            )
        if manifest.modalities[target].kind != "vector":
            raise UserError(
                f"run {name}: target '{target}' is of kind '{manifest.modalities[target].kind}'; "
                "an ensemble is built of head-only runs on feature targets"
            )
        dims = {m: int(d) for m, d in facts["dims"].items()}
        active = [m for m, a in cfg.alpha_for(facts["auxiliary"]).items() if a > 0]
        model = build_head(cfg, {m: dims[m] for m in [target, *active]}, target, len(manifest.classes))
        try:
            model.load_state_dict(product["model"])
        except RuntimeError as exc:
            reason = " ".join(str(exc).split())[:300]
            raise UserError(
                f"run {name}: its best-val weights do not fit its recorded config ({reason})"
            ) from None
        model.eval()
        return cls(name, cfg, manifest, model)

    def logits(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row ids, labels and class logits (float32) of the target's ``split``, id-sorted, in the
        training loop's evaluation batches."""
        target = self.manifest.target
        uris = self.manifest.uris(target, split)
        if not uris:
            raise UserError(
                f"run {self.name}: the manifest {self.manifest.path} has no '{target}/{split}' split"
            )
        ids, features, labels = split_rows(tuple(uris), self.manifest.modalities[target].dim)
        with torch.no_grad():
            logits = [
                self.model.logits(target, features[start : start + EVAL_BATCH]).float()
                for start in range(0, len(features), EVAL_BATCH)
            ]
        return ids, labels, torch.cat(logits).numpy()


@functools.lru_cache(maxsize=4)
def split_rows(uris: tuple[str, ...], dim: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Ids, features and labels of a vector split, id-sorted; read once for every member."""
    table = read_table(list(uris)).sort_by(ID)
    features, labels = table_to_numpy(table, "vector", dim)
    # a copy: Arrow's buffers are read-only, torch wants writable memory
    return table.column(ID).to_numpy(zero_copy_only=False), torch.from_numpy(np.array(features)), labels


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities of logits ``[rows, classes]``, in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def mean_probabilities(probabilities: list[np.ndarray]) -> np.ndarray:
    """The ensemble's probabilities: the members' ``[rows, classes]`` probabilities averaged (equal
    weights). Members must predict the same rows in the same order."""
    if not probabilities:
        raise ValueError("an ensemble needs at least one member's probabilities")
    shapes = {p.shape for p in probabilities}
    if len(shapes) != 1:
        raise ValueError(f"members' probabilities differ in shape: {sorted(shapes)}")
    return np.mean(np.stack(probabilities), axis=0)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose highest score (logit or probability) is the label."""
    return float((scores.argmax(axis=1) == labels).sum()) / max(len(labels), 1)
