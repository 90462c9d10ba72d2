"""Bad-input catalogue: every bad input is refused before Ray or MLflow do any work, in one line.

Each case runs ``uml-ray ...`` in-process through ``main([...])`` and asserts: exit code 2; stderr
is exactly one line naming the file/field/value at fault and the fix; no traceback; ``ray.init``
never called (a tripwire replaces it, so a case that slips through fails in milliseconds instead of
training); no run recorded in the case's MLflow store. The cases cover manifests, shards, run
configs, overrides, search spaces, CLI flags, tracking and storage.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_config

from uml_ray.cli import main

GARBAGE = bytes(range(256)) * 4  # not UTF-8 from byte 0x80 on
# a "billion laughs" anchor bomb: 9 levels of 9 aliases, 9**9 values once expanded
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)
HUGE = "# padding\n" * (1_100_000)  # 11 MB: over the 10 MB input cap
DEEP = "[" * 20000 + "]" * 20000
# the same bomb as one override: 8 levels of 10 aliases
ALPHA_BOMB = (
    "train.alpha={a: &a [1,1,1,1,1,1,1,1,1,1], "
    + ", ".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdefg", "bcdefgh"))
    + "}"
)
GOOD_SPACE = {
    "recipe": "supervised",
    "params": {"train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-1}},
}


class RayStarted(Exception):
    """Raised by the ray.init tripwire: a bad input got as far as starting Ray."""


class Work:
    """One case's folder: a tiny valid dataset, a valid run config, and helpers to break either."""

    def __init__(self, root: Path):
        from uml_ray.data.synth import write_synthetic

        self.root = root
        self.db = root / "mlflow.db"
        self.manifest = write_synthetic(
            str(root / "data"),
            n_classes=3,
            dim_x=8,
            dims_aux=(4,),
            n_train=9,
            n_val=6,
            n_test=6,
            n_aux=9,
            seed=0,
        )
        self.config = str(write_config(root / "run.yaml", self.manifest, root))

    def fill(self, text: str) -> str:
        """``text`` with this case's paths in place of ``{root}``, ``{manifest}``, ``{config}``, ``{db}``,
        ``{space}`` (the case's search-space file) and ``{shard:modality.split}`` (its first shard)."""
        text = re.sub(r"\{shard:(\w+)\.(\w+)\}", lambda found: self.shard(found[1], found[2]), text)
        for token, value in (
            ("{root}", self.root),
            ("{manifest}", self.manifest),
            ("{config}", self.config),
            ("{db}", self.db),
            ("{space}", self.root / "space.yaml"),
        ):
            text = text.replace(token, str(value))
        return text

    def write(self, name: str, content: str | bytes) -> str:
        """A file in the case folder holding ``content``; returns its path."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def edit_manifest(self, edit: Callable[[dict], None]) -> str:
        """Apply ``edit`` to the manifest's YAML tree in place; returns the manifest path."""
        tree = yaml.safe_load(Path(self.manifest).read_text())
        edit(tree)
        Path(self.manifest).write_text(yaml.safe_dump(tree, sort_keys=False))
        return self.manifest

    def with_manifest(self, path: str) -> str:
        """A run config whose data.manifest is ``path``."""
        return str(write_config(self.root / "run.yaml", path, self.root))

    def with_config(self, **sections) -> str:
        """The run config with some sections' values replaced."""
        return str(write_config(self.root / "run.yaml", self.manifest, self.root, **sections))

    def space(self, tree_or_text) -> str:
        """A search-space file from a tree (dumped as YAML) or raw text/bytes."""
        content = tree_or_text if isinstance(tree_or_text, (str, bytes)) else yaml.safe_dump(tree_or_text)
        return self.write("space.yaml", content)

    def shard(self, modality: str, split: str) -> str:
        """The first shard file of (modality, split)."""
        from uml_ray.data.manifest import load_manifest

        return load_manifest(self.manifest).uris(modality, split)[0]

    def rewrite_shard(self, modality: str, split: str, change: Callable[[pa.Table], pa.Table]) -> str:
        """Rewrite one shard through ``change``; returns its path."""
        uri = self.shard(modality, split)
        pq.write_table(change(pq.read_table(uri)), uri)
        return uri


Setup = Callable[[Work], object]


@dataclass
class Case:
    """One bad input: the argv that runs it, what the error line must name and the fix it must give
    (argv and names hold ``Work.fill`` placeholders), and what breaks the case's folder first."""

    id: str
    argv: list[str]
    names: list[str]
    hint: str
    setup: Setup | None = None
    store: bool = False  # start from an existing MLflow store (experiment 'tests', no runs)


def write(name: str, content: str | bytes) -> Setup:
    """The case folder's file ``name`` (the manifest, run config or another) holding ``content``."""
    return lambda w: w.write(name, content)


def set_manifest(path: str, **values) -> Setup:
    """Set ``values`` in the manifest's mapping at dotted ``path`` ("" for the top level)."""

    def edit(tree: dict) -> None:
        for key in filter(None, path.split(".")):
            tree = tree[key]
        tree.update(values)

    return lambda w: w.edit_manifest(edit)


def set_config(**sections) -> Setup:
    """The run config with some sections' values replaced."""
    return lambda w: w.with_config(**sections)


def space(tree_or_text) -> Setup:
    """The case's search-space file (``{space}``) from a tree or raw text/bytes."""
    return lambda w: w.space(tree_or_text)


def space_with(key: str, spec: dict) -> Setup:
    """A supervised search space over ``key`` alone."""
    return space({"recipe": "supervised", "params": {key: spec}})


def rewrite(modality: str, split: str, change: Callable[[pa.Table], pa.Table]) -> Setup:
    """The first shard of (modality, split) rewritten through ``change``."""
    return lambda w: w.rewrite_shard(modality, split, change)


def shard_case(id: str, modality: str, split: str, names: list[str], hint: str, change) -> Case:
    """``data validate`` of a case whose first (modality, split) shard ``change`` rewrote: the error
    names that shard and ``names``."""
    return Case(
        id, DATA_VALIDATE, [f"{{shard:{modality}.{split}}}", *names], hint, rewrite(modality, split, change)
    )


def _set_column(table: pa.Table, name: str, values, kind) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, kind))


def _null_rows(table: pa.Table) -> pa.Table:
    rows = table.column("features").to_pylist()
    rows[2] = rows[4] = None
    return _set_column(table, "features", rows, table.schema.field("features").type)


def _duplicate_id(table: pa.Table) -> pa.Table:
    ids = table.column("id").to_pylist()
    ids[3] = ids[0]
    return _set_column(table, "id", ids, pa.string())


def _nan_row(table: pa.Table) -> pa.Table:
    from uml_ray.data.format import layout_of, table_to_numpy, vector_array

    feature_type = table.schema.field("features").type
    dim = feature_type.byte_width // 4 if layout_of(feature_type) == "binary" else feature_type.list_size
    rows = table_to_numpy(table, "vector", dim)[0].copy()
    rows[1, 0] = np.nan
    return table.set_column(0, "features", vector_array(rows, dim, layout_of(feature_type)))


def _label_99(table: pa.Table) -> pa.Table:
    labels = table.column("label").to_pylist()
    labels[2] = 99
    return _set_column(table, "label", labels, pa.int32())


def _val_rows(rows: int) -> Setup:
    """The target's val split replaced by ``rows`` rows."""

    def setup(w: Work) -> None:
        from uml_ray.data.format import write_shards

        features, labels = np.ones((rows, 8), np.float32), np.zeros(rows, np.int32)
        write_shards(str(Path(w.manifest).parent), "image", "val", features, labels, dim=8)

    return setup


def _one_val_row_two_workers(w: Work) -> None:
    _val_rows(1)(w)
    w.with_config(resources={"num_workers": 2, "trainer": "ray_train"})


DATA_VALIDATE = ["data", "validate", "{manifest}"]
VALIDATE = ["validate", "{config}"]
TUNE = ["tune", "{config}", "--space", "{space}", "--trials", "2"]
SYNTH = ["data", "synth", "{root}/synth", "--n-train", "6", "--n-val", "6", "--n-test", "6", "--n-aux", "6"]


def best(uri: str = "sqlite:///{db}", output: str = "{root}/best.yaml") -> list[str]:
    """``uml-ray best`` reading ``uri`` and writing ``output``."""
    return ["best", "--tracking-uri", uri, "--output", output]


BEST = best()


CASES = [
    # manifests
    Case(
        "manifest-binary",
        DATA_VALIDATE,
        ["{manifest}", "UTF-8", "0x80"],
        "check the path",
        write("data/manifest.yaml", GARBAGE),
    ),
    Case(
        "manifest-binary-via-config",
        VALIDATE,
        ["{root}/m.yaml", "UTF-8"],
        "check the path",
        lambda w: w.with_manifest(w.write("m.yaml", GARBAGE)),
    ),
    Case(
        "manifest-anchor-bomb",
        DATA_VALIDATE,
        ["{manifest}", "aliases expand"],
        "write the values out",
        write("data/manifest.yaml", BOMB),
    ),
    Case(
        "manifest-recursive-alias",
        DATA_VALIDATE,
        ["{manifest}", "*c", "refers to itself"],
        "cannot be a config, space or manifest",
        write("data/manifest.yaml", "classes: &c [a, *c]\n"),
    ),
    Case(
        "manifest-over-10MB",
        DATA_VALIDATE,
        ["{manifest}", "larger than 10 MB"],
        "check the path",
        write("data/manifest.yaml", HUGE),
    ),
    Case(
        "manifest-missing",
        ["data", "validate", "{root}/nope.yaml"],
        ["{root}/nope.yaml", "No such file"],
        "check the path",
    ),
    Case(
        "manifest-dim-bool",
        DATA_VALIDATE,
        ["modalities.image", "'dim'", "bool True"],
        "must be int",
        set_manifest("modalities.image", dim=True),
    ),
    Case(
        "manifest-dim-zero",
        DATA_VALIDATE,
        ["modalities.text.dim", "got 0"],
        "must be a positive integer",
        set_manifest("modalities.text", dim=0),
    ),
    Case(
        "manifest-kind",
        DATA_VALIDATE,
        ["modalities.text.kind", "'picture'"],
        "is not one of ['vector', 'sequence'",
        set_manifest("modalities.text", kind="picture"),
    ),
    Case(
        "manifest-target",
        DATA_VALIDATE,
        ["{manifest}", "target 'audio'"],
        "is not one of the modalities",
        set_manifest("", target="audio"),
    ),
    Case(
        "manifest-duplicate-class",
        DATA_VALIDATE,
        ["{manifest}", "'classes'"],
        "distinct names",
        set_manifest("", classes=["a", "a", "b"]),
    ),
    Case(
        "manifest-unknown-field",
        DATA_VALIDATE,
        ["{manifest}", "['labels']"],
        "allowed: name, classes, target, modalities",
        set_manifest("", labels=["x"]),
    ),
    Case(
        "manifest-unknown-split",
        DATA_VALIDATE,
        ["modalities.text.splits", "'dev'"],
        "allowed: ['train', 'val', 'test']",
        set_manifest("modalities.text.splits", dev=["x.parquet"]),
    ),
    Case(
        "manifest-duplicate-key",
        DATA_VALIDATE,
        ["{manifest}", "duplicate key 'classes'", "line 2"],
        "each key may appear once",
        write("data/manifest.yaml", "classes: [a]\nclasses: [b]\n"),
    ),
    Case(
        "manifest-not-mapping",
        DATA_VALIDATE,
        ["{manifest}"],
        "a manifest is a mapping with name, classes, target, modalities",
        write("data/manifest.yaml", "- a\n- b\n"),
    ),
    Case(
        "manifest-bad-json",
        ["data", "validate", "{root}/m.json"],
        ["{root}/m.json", "not valid JSON"],
        "line 1",
        write("m.json", '{"classes": [1, 2,'),
    ),
    # shards
    shard_case(
        "shard-null-features",
        "image",
        "train",
        ["null features", "row 2"],
        "drop or fill those rows",
        _null_rows,
    ),
    shard_case(
        "shard-duplicate-id",
        "image",
        "val",
        ["'image-val-0'", "row 0", "row 3", "modalities.image.splits.val"],
        "ids must be unique within a split",
        _duplicate_id,
    ),
    shard_case(
        "shard-nan", "text", "train", ["NaN/inf", "first at row 1"], "drop or repair those rows", _nan_row
    ),
    shard_case(
        "shard-label-range",
        "image",
        "test",
        ["label 99", "row 2"],
        "labels index the manifest's classes",
        _label_99,
    ),
    Case(
        "shard-missing",
        DATA_VALIDATE,
        ["{shard:image.test}", "file not found"],
        "fix the path in the manifest",
        lambda w: Path(w.shard("image", "test")).unlink(),
    ),
    Case(
        "shard-not-parquet",
        DATA_VALIDATE,
        ["{shard:text.train}", "cannot read the Parquet shard"],
        "rewrite the shard",
        lambda w: Path(w.shard("text", "train")).write_bytes(GARBAGE),
    ),
    Case(
        "shard-dim-mismatch",
        DATA_VALIDATE,
        ["{shard:text.train}", "dim 4", "modalities.text.dim is 5"],
        "fix the manifest dim",
        set_manifest("modalities.text", dim=5),
    ),
    Case(
        "shard-empty-val",
        DATA_VALIDATE,
        ["modalities.image.splits.val has 0 rows"],
        "the target needs val rows",
        _val_rows(0),
    ),
    Case(
        "val-rows-below-workers",
        VALIDATE,
        ["image.val", "resources.num_workers"],
        "num_workers",
        _one_val_row_two_workers,
        store=True,
    ),
    # run configs
    Case("config-binary", VALIDATE, ["{config}", "UTF-8"], "check the path", write("run.yaml", GARBAGE)),
    Case(
        "config-anchor-bomb",
        VALIDATE,
        ["{config}", "aliases expand"],
        "write the values out",
        write("run.yaml", BOMB),
    ),
    Case(
        "config-over-10MB",
        VALIDATE,
        ["{config}", "larger than 10 MB"],
        "check the path",
        write("run.yaml", HUGE),
    ),
    Case(
        "config-deep-nesting",
        VALIDATE,
        ["{config}", "nested too deeply"],
        "a few levels deep",
        write("run.yaml", DEEP),
    ),
    Case(
        "config-missing",
        ["validate", "{root}/nope.yaml"],
        ["{root}/nope.yaml", "cannot read"],
        "check the path",
    ),
    Case(
        "config-unknown-section",
        VALIDATE,
        ["{config}", "'optimizer'"],
        "allowed sections: data, model, train, tracking, resources",
        set_config(optimizer={"lr": 1}),
    ),
    Case(
        "config-unknown-key",
        VALIDATE,
        ["{config}", "'train.learning_rate'"],
        "allowed keys in 'train': lr,",
        set_config(train={"learning_rate": 0.1}),
    ),
    Case(
        "config-duplicate-key",
        VALIDATE,
        ["{config}", "duplicate key 'lr'"],
        "each key may appear once",
        write("run.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n"),
    ),
    Case(
        "config-wrong-type",
        VALIDATE,
        ["{config}", "train.lr", "'fast'"],
        "expected a number",
        set_config(train={"lr": "fast"}),
    ),
    Case(
        "config-empty-experiment",
        VALIDATE,
        ["{config}", "tracking.experiment is empty"],
        "tracking.experiment=uml-ray",
        set_config(tracking={"experiment": ""}),
    ),
    Case(
        "config-warmup-too-long",
        VALIDATE,
        ["train.warmup_steps=500", "train.max_steps=100"],
        "must be smaller than",
        set_config(train={"warmup_steps": 500, "max_steps": 100}),
    ),
    Case(
        "config-aux-per-class-over-rows",
        [*VALIDATE, "data.aux_per_class=50"],
        ["data.aux_per_class=50", "train row(s) of auxiliary", "{manifest}"],
        "use data.aux_per_class<=",
    ),
    Case(
        "space-aux-per-class-over-rows",
        TUNE,
        ["data.aux_per_class=50", "train row(s) of auxiliary"],
        "use data.aux_per_class<=",
        space_with("data.aux_per_class", {"type": "choice", "values": [1, 50]}),
    ),
    Case(
        "config-probe-without-backbone",
        [*VALIDATE, "model.head_init=probe"],
        ["model.head_init=probe", "model.backbone"],
        "use model.head_init=random or text",
    ),
    Case(
        "config-no-manifest",
        VALIDATE,
        ["data.manifest is empty"],
        "data.manifest=data/manifest.yaml",
        lambda w: w.with_manifest(""),
    ),
    Case(
        "config-not-mapping",
        VALIDATE,
        ["{config}"],
        "a config is a mapping of sections",
        write("run.yaml", "- train\n"),
    ),
    # overrides
    Case(
        "override-broken-flow",
        [*VALIDATE, "train.alpha={text: "],
        ["override 'train.alpha={text: '", "not valid YAML"],
        "train.alpha.text=0.5",
    ),
    Case("override-no-equals", [*VALIDATE, "train.lr"], ["override 'train.lr'"], "section.key=value"),
    Case(
        "override-unknown-key",
        [*VALIDATE, "train.lrate=0.1"],
        ["'train.lrate'"],
        "allowed keys in 'train': lr,",
    ),
    Case("override-out-of-range", [*VALIDATE, "train.lr=-1"], ["train.lr", "-1.0"], "it must be > 0.0"),
    Case(
        "override-integer-past-any-size",
        [*VALIDATE, "train.batch_size=100000000000000000000"],
        ["train.batch_size", "100000000000000000000"],
        "it must be <= 2147483647",
    ),
    Case(
        "override-bad-choice",
        [*VALIDATE, "model.regime=vision"],
        ["model.regime", "'vision'"],
        "choose one of ['supervised', 'sequence']",
    ),
    Case(
        "override-alpha-unknown-modality",
        [*VALIDATE, "train.alpha.audio=0.5"],
        ["train.alpha.audio", "'audio'"],
        "choose from ['text']",
    ),
    Case(
        "override-inline-two-workers",
        [*VALIDATE, "resources.trainer=inline", "resources.num_workers=2"],
        ["resources.trainer=inline"],
        "set resources.num_workers=1",
    ),
    Case(
        "override-anchor-bomb",
        [*VALIDATE, ALPHA_BOMB],
        ["override 'train.alpha=", "aliases expand"],
        "write the values out",
    ),
    # search spaces
    Case(
        "space-binary",
        [*VALIDATE, "--space", "{space}"],
        ["{space}", "UTF-8"],
        "check the path",
        space(GARBAGE),
    ),
    Case("space-anchor-bomb", TUNE, ["{space}", "aliases expand"], "write the values out", space(BOMB)),
    Case(
        "space-missing",
        ["tune", "{config}", "--space", "{root}/nope.yaml", "--trials", "2"],
        ["{root}/nope.yaml", "cannot read"],
        "check the path",
    ),
    Case(
        "space-unknown-key",
        TUNE,
        ["params.train.lrate", "'train.lrate'"],
        "allowed keys in 'train': lr,",
        space_with("train.lrate", {"type": "uniform", "low": 0.1, "high": 0.2}),
    ),
    Case(
        "space-low-above-high",
        TUNE,
        ["params.train.lr", "low=0.2"],
        "swap them",
        space_with("train.lr", {"type": "uniform", "low": 0.2, "high": 0.1}),
    ),
    Case(
        "space-log-from-zero",
        TUNE,
        ["params.train.lr", "low=0"],
        "use a low > 0",
        space_with("train.lr", {"type": "loguniform", "low": 0, "high": 0.1}),
    ),
    Case(
        "space-unknown-distribution",
        TUNE,
        ["params.train.lr", "'gaussian'"],
        "['loguniform', 'uniform', 'int', 'choice']",
        space_with("train.lr", {"type": "gaussian", "low": 0, "high": 1}),
    ),
    Case(
        "space-recipe-mismatch",
        TUNE,
        ["{space}", "recipe 'sequence'"],
        "model.regime='supervised'",
        space({**GOOD_SPACE, "recipe": "sequence"}),
    ),
    Case(
        "space-alpha-unknown-modality",
        TUNE,
        ["params.train.alpha.audio", "'audio'"],
        "choose from ['text']",
        space_with("train.alpha.audio", {"type": "uniform", "low": 0, "high": 1}),
    ),
    Case(
        "space-corner-invalid",
        TUNE,
        ["params.train.warmup_steps", "value 500"],
        "must be smaller than train.max_steps",
        space_with("train.warmup_steps", {"type": "int", "low": 0, "high": 500}),
    ),
    Case(
        "space-no-params",
        TUNE,
        ["{space}", "'params'"],
        "non-empty mapping of config keys to distributions",
        space({"recipe": "supervised", "params": {}}),
    ),
    # CLI flags
    Case(
        "tune-zero-trials",
        ["tune", "{config}", "--space", "{space}", "--trials", "0"],
        ["--trials", "got 0"],
        "must be >= 1",
        space(GOOD_SPACE),
    ),
    Case("tune-resume-without-name", [*TUNE, "--resume"], ["--resume"], "--name", space(GOOD_SPACE)),
    Case(
        "tune-negative-concurrency",
        [*TUNE, "--concurrency", "-1"],
        ["--concurrency", "got -1"],
        "0 = as many trials as the cluster fits",
        space(GOOD_SPACE),
    ),
    Case("train-resume-without-name", ["train", "{config}", "--resume"], ["--resume"], "--name"),
    Case(
        "synth-rows-per-shard-zero",
        [*SYNTH, "--rows-per-shard", "0"],
        ["rows_per_shard (--rows-per-shard)", "got 0"],
        "must be >= 1",
    ),
    Case(
        "synth-zero-classes", [*SYNTH, "--classes", "0"], ["n_classes (--classes)", "got 0"], "must be >= 1"
    ),
    Case(
        "synth-out-is-a-file",
        ["data", "synth", "{root}/taken"],
        ["OUT {root}/taken", "is a file, not a folder"],
        "give a new or existing folder",
        write("taken", "not a folder"),
    ),
    Case(
        "case-out-is-a-file",
        ["case", "fashion-mnist", "--out", "{root}/taken"],
        ["--out {root}/taken", "is a file, not a folder"],
        "give a new or existing folder",
        write("taken", "not a folder"),
    ),
    Case("synth-zero-val", [*SYNTH, "--n-val", "0"], ["n_val (--n-val)", "got 0"], "must be >= 1"),
    Case(
        "synth-aux-below-classes",
        [*SYNTH, "--classes", "8"],
        ["n_aux (--n-aux)", "got 6"],
        "must be >= n_classes=8",
    ),
    Case("synth-zero-aux-dim", [*SYNTH, "--dims-aux", "16", "0"], ["--dims-aux", "[16, 0]"], "must be >= 1"),
    Case(
        "synth-bad-seq-len",
        [*SYNTH, "--kind", "sequence", "--seq-len", "5", "2"],
        ["seq_len", "(5, 2)"],
        "1 <= min <= max",
    ),
    Case("synth-negative-seed", [*SYNTH, "--seed", "-1"], ["seed (--seed)", "got -1"], "must be >= 0"),
    Case(
        "best-output-folder-missing",
        best(output="/nonexistent/dir/best.yaml"),
        ["/nonexistent/dir/best.yaml", "/nonexistent/dir does not exist"],
        "create it or choose another path",
    ),
    Case(
        "best-output-is-folder",
        best(output="{root}"),
        ["--output {root}", "is a folder"],
        "best_config.yaml",
    ),
    Case("best-top-zero", [*BEST, "--top", "0"], ["--top", "got 0"], "must be >= 1"),
    Case("best-ensemble-of-one", [*BEST, "--ensemble", "1"], ["--ensemble 1"], "needs at least 2 members"),
    Case(
        "best-metric-backtick", [*BEST, "--metric", "acc`; drop"], ["'acc`; drop'"], "use e.g. best_val_acc"
    ),
    # tracking
    Case(
        "tracking-unknown-scheme",
        [*VALIDATE, "tracking.uri=bogus://x"],
        ["'bogus://x'", "unsupported scheme 'bogus'"],
        "sqlite:///path/to/mlflow.db",
    ),
    Case(
        "tracking-plain-folder",
        [*VALIDATE, "tracking.uri=mlruns"],
        ["mlruns'", "file store"],
        "sqlite:///path/to/mlflow.db",
    ),
    Case(
        "tracking-unreachable-server",
        [*VALIDATE, "tracking.uri=http://127.0.0.1:1"],
        ["tracking.uri=http://127.0.0.1:1", "Connection refused"],
        "start the server or fix tracking.uri",
    ),
    Case(
        "tracking-sqlite-folder-missing",
        [*VALIDATE, "tracking.uri=sqlite:////nonexistent/dir/m.db"],
        ["sqlite:////nonexistent/dir/m.db", "/nonexistent/dir does not exist"],
        "create it",
    ),
    Case(
        "tracking-sqlite-in-memory",
        [*VALIDATE, "tracking.uri=sqlite://"],
        ["'sqlite://'", "in-memory"],
        "sqlite:///path/to/mlflow.db",
    ),
    Case(
        "best-unreachable-server",
        best("http://127.0.0.1:1"),
        ["http://127.0.0.1:1", "Connection refused"],
        "start the server or fix --tracking-uri",
    ),
    Case(
        "best-unknown-scheme",
        best("bogus://x"),
        ["'bogus://x'"],
        "sqlite:///path/to/mlflow.db",
    ),
    Case("best-store-missing", BEST, ["sqlite:///{db}", "no such SQLite file"], "point --tracking-uri at"),
    Case(
        "best-unknown-experiment",
        [*BEST, "--experiment", "nope"],
        ["'nope'", "'tests'"],
        "experiments there:",
        store=True,
    ),
    Case("best-sweep-both-quotes", [*BEST, "--sweep", 'it\'s "x"'], ['it\'s "x"'], "drop one kind of quote"),
    Case(
        "train-name-both-quotes",
        ["train", "{config}", "--name", 'it\'s "x"'],
        ['it\'s "x"'],
        "drop one kind of quote",
        store=True,
    ),
    Case(
        "tune-name-slash",
        [*TUNE, "--name", "a/b"],
        ["'a/b'"],
        "use letters, digits",
        space(GOOD_SPACE),
        store=True,
    ),
    # storage
    Case(
        "storage-is-a-file",
        VALIDATE,
        ["tracking.storage_path='{root}/runs'", "is a file"],
        "point it at a folder",
        lambda w: w.with_config(tracking={"storage_path": w.write("runs", "x")}),
    ),
    Case(
        "storage-under-a-file",
        VALIDATE,
        ["{root}/runs", "is a file"],
        "point it at a folder",
        lambda w: w.with_config(tracking={"storage_path": w.write("runs", "x") + "/sub"}),
    ),
]


def _recorded_runs(db: Path) -> int:
    """MLflow runs in a SQLite store (0 when the file or its tables do not exist)."""
    if not db.exists():
        return 0
    with sqlite3.connect(db) as connection:
        if not connection.execute(
            "select name from sqlite_master where type='table' and name='runs'"
        ).fetchone():
            return 0
        return connection.execute("select count(*) from runs").fetchone()[0]


@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    """A SQLite MLflow store holding experiment 'tests' and no runs, made once and copied per case:
    creating a store runs MLflow's schema migrations, seconds on a busy machine."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").create_experiment("tests")
    return path


@pytest.fixture
def ray_tripwire(monkeypatch):
    """``ray.init`` raises RayStarted; yields the calls. ``ray.is_initialized`` reads False meanwhile, so
    code that attaches to an already-running Ray (earlier tests) still goes through the tripwire."""
    import ray

    was_up = ray.is_initialized()
    calls = []

    def tripwire(*args, **kwargs):
        calls.append(kwargs)
        raise RayStarted(f"ray.init{kwargs} called for a bad input")

    monkeypatch.setattr(ray, "init", tripwire)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    yield calls
    monkeypatch.undo()
    assert ray.is_initialized() == was_up


def test_catalogue_is_large_and_covers_every_area():
    """At least 40 cases, spread over every kind of input."""
    areas = {case.id.split("-")[0] for case in CASES}
    assert len(CASES) >= 40
    assert {
        "manifest",
        "shard",
        "config",
        "override",
        "space",
        "tune",
        "synth",
        "best",
        "tracking",
        "storage",
    } <= areas


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_clear_line(case, tmp_path, capsys, ray_tripwire, request):
    work = Work(tmp_path)
    if case.store:
        shutil.copyfile(request.getfixturevalue("store_template"), work.db)
    if case.setup is not None:
        case.setup(work)
    argv = [work.fill(arg) for arg in case.argv]
    capsys.readouterr()
    started = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert code == 2, f"exit {code}; stdout {out!r}; stderr {err!r}"
    assert len(lines) == 1, f"expected one line, got {lines}"
    assert lines[0].startswith(f"uml-ray {argv[0]}: error: ")
    for name in map(work.fill, case.names):
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"
    assert case.hint in lines[0], f"no fix hint {case.hint!r} in {lines[0]!r}"
    assert not ray_tripwire
    assert _recorded_runs(work.db) == 0
    assert seconds < 10, f"refusing took {seconds:.1f} s"


def test_anchor_bomb_is_refused_within_a_second_everywhere(tmp_path):
    """Each loader (run config, search space, manifest, override) refuses the bomb in well under a second."""
    from uml_ray.config import load_config, read_yaml
    from uml_ray.data.manifest import load_manifest
    from uml_ray.errors import UserError

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    for load in (
        read_yaml,
        load_config,
        load_manifest,
        lambda p: load_config(None, [f"train.alpha={{{BOMB.replace(chr(10), ', ')}}}"]),
    ):
        started = time.perf_counter()
        with pytest.raises(UserError, match="aliases expand"):
            load(path)
        assert time.perf_counter() - started < 1.0


def test_few_aliases_still_load(tmp_path):
    """Bounded loading keeps ordinary anchors working: a config may reuse a value a few times."""
    from uml_ray.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: &lr 0.02, alpha_default: *lr}\nmodel: &m {regime: supervised}\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.alpha_default, cfg.model.regime) == (0.02, 0.02, "supervised")


def test_alias_count_limit(tmp_path):
    """101 aliases are refused even when they expand to little; 100 load."""
    from uml_ray.config import read_yaml
    from uml_ray.errors import ConfigError

    path = tmp_path / "many.yaml"
    path.write_text("a: &a 1\nb: [" + ", ".join(["*a"] * 100) + "]\n")
    assert read_yaml(path)["b"] == [1] * 100
    path.write_text("a: &a 1\nb: [" + ", ".join(["*a"] * 101) + "]\n")
    with pytest.raises(ConfigError, match="more than 100 YAML aliases"):
        read_yaml(path)


def test_quoted_names_round_trip_through_mlflow_filters(tmp_path):
    """A sweep name holding one kind of quote is matched exactly (MLflow filters have no escapes)."""
    from uml_ray.tracking.loggers import SweepTracker
    from uml_ray.tracking.runs import best_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("it's", 'say "hi"', "plain"):
        tracker = SweepTracker(uri, "quotes", "", name)
        parent = tracker.start_sweep({"p": 1})
        assert (
            SweepTracker(uri, "quotes", "", name).start_sweep({"p": 1}) == parent
        )  # found again, not duplicated
        run = tracker.start_trial("t1", {"q": 2})
        assert tracker.start_trial("t1", {}) == run
        tracker.log_metrics("t1", {"best_val_acc": 0.5 + len(name) / 100}, step=1)
        tracker.end_trial("t1", "FINISHED", "completed")
    for name in ("it's", 'say "hi"', "plain"):
        rows = best_runs(uri, "quotes", sweep=name)
        assert [(r["sweep"], r["metrics"]["best_val_acc"]) for r in rows] == [(name, 0.5 + len(name) / 100)]


def test_check_run_name():
    """Names that cannot be a folder or an MLflow filter value are refused; ordinary ones pass."""
    from uml_ray.errors import UserError
    from uml_ray.tracking.runs import check_run_name

    for good in ("sweep-1", "it's", 'a "b"', "lr_3e-4.v2"):
        check_run_name(good)
    for bad, message in (('it\'s "x"', "both"), ("a/b", "folder"), ("..", "folder"), ("a\nb", "folder")):
        with pytest.raises(UserError, match=message):
            check_run_name(bad)


def test_check_storage_path(tmp_path):
    """A file (or a path under one) is refused; a missing folder that can be created and remote URIs pass."""
    from uml_ray.cluster import check_storage_path
    from uml_ray.errors import ConfigError

    (tmp_path / "file").write_text("x")
    check_storage_path(str(tmp_path / "new" / "runs"))
    check_storage_path("s3://bucket/runs")
    for bad in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(ConfigError, match="is a file"):
            check_storage_path(str(bad))


def test_unreachable_server_is_given_up_on_quickly():
    """The pre-launch check gives up on a closed port in seconds (MLflow's defaults took ~260 s) and leaves
    MLflow's retry settings as they were for the run itself."""
    import os

    from uml_ray.errors import UserError
    from uml_ray.tracking.store import check_tracking

    before = {
        k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    started = time.perf_counter()
    with pytest.raises(UserError, match="Connection refused"):
        check_tracking("http://127.0.0.1:1", "x")
    assert time.perf_counter() - started < 10
    assert {k: os.environ.get(k) for k in before} == before


def test_synth_refusals_write_nothing(tmp_path, capsys):
    """A refused ``data synth`` leaves no half-written dataset behind."""
    assert main(["data", "synth", str(tmp_path / "out"), "--n-val", "0"]) == 2
    assert not (tmp_path / "out").exists()
    capsys.readouterr()


def test_batch_size_above_the_rows_trains_full_batch_recorded_as_used_and_said_once(
    synthetic_manifest, tmp_path, capsys
):
    """A batch larger than the target's train rows is clamped in the plan (so MLflow records what
    trains) with one console line; a space's over-large batch sizes are said once too."""
    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan
    from uml_ray.search.space import load_space

    config = write_config(tmp_path / "run.yaml", synthetic_manifest, tmp_path, train={"batch_size": 10**9})
    plan = build_plan(load_config(config))
    rows = plan.streams["image.train"].rows
    assert plan.cfg.train.batch_size == rows == 20
    out = capsys.readouterr().out
    assert out.count(f"train.batch_size=1000000000 is larger than the {rows} target train rows") == 1
    assert "(recorded as used)" in out

    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump({"params": {"train.batch_size": {"type": "choice", "values": [8, 16, 64]}}})
    )
    plan = build_plan(load_config(config, ["train.batch_size=8"]), load_space(str(space)))
    assert plan.cfg.train.batch_size == 8
    assert capsys.readouterr().out.count("search space: train.batch_size [64] exceed the 20 target") == 1
