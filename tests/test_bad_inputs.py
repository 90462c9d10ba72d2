"""Bad-input catalogue: every bad input is refused before Ray or MLflow do any work, in one line.

Each case runs ``uml-ray ...`` in-process through ``main([...])`` and asserts: exit code 2; stderr
is exactly one line naming the file/field/value at fault and the fix; no traceback; ``ray.init``
never called (a tripwire replaces it, so a case that slips through fails in milliseconds instead of
training); no run recorded in the case's MLflow store. The cases cover manifests, shards, run
configs, overrides, search spaces, CLI flags, tracking and storage.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
        from uml_ray.data.format import load_manifest

        return load_manifest(self.manifest).uris(modality, split)[0]

    def rewrite_shard(self, modality: str, split: str, change: Callable[[pa.Table], pa.Table]) -> str:
        """Rewrite one shard through ``change``; returns its path."""
        uri = self.shard(modality, split)
        pq.write_table(change(pq.read_table(uri)), uri)
        return uri


@dataclass
class Case:
    """One bad input: the argv it builds, what the error line must name, and the fix it must give."""

    id: str
    argv: Callable[[Work], list[str]]
    names: Callable[[Work], list[str]]
    hint: str
    xfail: str = ""
    store: bool = False  # start from an existing MLflow store (experiment 'tests', no runs)
    marks: list = field(default_factory=list)


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
    rows = table.column("features").to_pylist()
    rows[1][0] = float("nan")
    return _set_column(table, "features", rows, table.schema.field("features").type)


def _label_99(table: pa.Table) -> pa.Table:
    labels = table.column("label").to_pylist()
    labels[2] = 99
    return _set_column(table, "label", labels, pa.int32())


def _empty_val(w: Work) -> str:
    from uml_ray.data.format import write_shards

    write_shards(
        str(Path(w.manifest).parent),
        "image",
        "val",
        np.zeros((0, 8), np.float32),
        np.zeros(0, np.int32),
        dim=8,
    )
    return w.manifest


def _one_val_row(w: Work) -> str:
    from uml_ray.data.format import write_shards

    write_shards(
        str(Path(w.manifest).parent),
        "image",
        "val",
        np.ones((1, 8), np.float32),
        np.zeros(1, np.int32),
        dim=8,
    )
    return w.with_config(resources={"num_workers": 2, "trainer": "ray_train"})


def _validate(config: Callable[[Work], str], *overrides: str) -> Callable[[Work], list[str]]:
    return lambda w: ["validate", config(w), *overrides]


def _data_validate(manifest: Callable[[Work], str]) -> Callable[[Work], list[str]]:
    return lambda w: ["data", "validate", manifest(w)]


def _best(*flags: str) -> Callable[[Work], list[str]]:
    return lambda w: [
        "best",
        "--tracking-uri",
        f"sqlite:///{w.db}",
        "--output",
        str(w.root / "best.yaml"),
        *flags,
    ]


def _tune(space: Callable[[Work], str], *flags: str) -> Callable[[Work], list[str]]:
    return lambda w: ["tune", w.config, "--space", space(w), "--trials", "2", *flags]


def _synth(*flags: str) -> Callable[[Work], list[str]]:
    return lambda w: [
        "data",
        "synth",
        str(w.root / "synth"),
        "--n-train",
        "6",
        "--n-val",
        "6",
        "--n-test",
        "6",
        "--n-aux",
        "6",
        *flags,
    ]


def _space_with(key: str, spec) -> Callable[[Work], str]:
    return lambda w: w.space({"recipe": "supervised", "params": {key: spec}})


CASES = [
    # manifests
    Case(
        "manifest-binary",
        _data_validate(lambda w: w.write("data/manifest.yaml", GARBAGE)),
        lambda w: [w.manifest, "UTF-8", "0x80"],
        "check the path",
    ),
    Case(
        "manifest-binary-via-config",
        _validate(lambda w: w.with_manifest(w.write("m.yaml", GARBAGE))),
        lambda w: [str(w.root / "m.yaml"), "UTF-8"],
        "check the path",
    ),
    Case(
        "manifest-anchor-bomb",
        _data_validate(lambda w: w.write("data/manifest.yaml", BOMB)),
        lambda w: [w.manifest, "aliases expand"],
        "write the values out",
    ),
    Case(
        "manifest-recursive-alias",
        _data_validate(lambda w: w.write("data/manifest.yaml", "classes: &c [a, *c]\n")),
        lambda w: [w.manifest, "*c", "refers to itself"],
        "cannot be a config, space or manifest",
    ),
    Case(
        "manifest-over-10MB",
        _data_validate(lambda w: w.write("data/manifest.yaml", HUGE)),
        lambda w: [w.manifest, "larger than 10 MB"],
        "check the path",
    ),
    Case(
        "manifest-missing",
        _data_validate(lambda w: str(w.root / "nope.yaml")),
        lambda w: [str(w.root / "nope.yaml"), "No such file"],
        "check the path",
    ),
    Case(
        "manifest-dim-bool",
        _data_validate(lambda w: w.edit_manifest(lambda t: t["modalities"]["image"].update(dim=True))),
        lambda w: ["modalities.image", "'dim'", "bool True"],
        "must be int",
    ),
    Case(
        "manifest-dim-zero",
        _data_validate(lambda w: w.edit_manifest(lambda t: t["modalities"]["text"].update(dim=0))),
        lambda w: ["modalities.text.dim", "got 0"],
        "must be a positive integer",
    ),
    Case(
        "manifest-kind",
        _data_validate(lambda w: w.edit_manifest(lambda t: t["modalities"]["text"].update(kind="picture"))),
        lambda w: ["modalities.text.kind", "'picture'"],
        "is not one of ['vector', 'sequence'",
    ),
    Case(
        "manifest-target",
        _data_validate(lambda w: w.edit_manifest(lambda t: t.update(target="audio"))),
        lambda w: [w.manifest, "target 'audio'"],
        "is not one of the modalities",
    ),
    Case(
        "manifest-duplicate-class",
        _data_validate(lambda w: w.edit_manifest(lambda t: t.update(classes=["a", "a", "b"]))),
        lambda w: [w.manifest, "'classes'"],
        "distinct names",
    ),
    Case(
        "manifest-unknown-field",
        _data_validate(lambda w: w.edit_manifest(lambda t: t.update(labels=["x"]))),
        lambda w: [w.manifest, "['labels']"],
        "allowed: name, classes, target, modalities",
    ),
    Case(
        "manifest-unknown-split",
        _data_validate(
            lambda w: w.edit_manifest(lambda t: t["modalities"]["text"]["splits"].update(dev=["x.parquet"]))
        ),
        lambda w: ["modalities.text.splits", "'dev'"],
        "allowed: ['train', 'val', 'test']",
    ),
    Case(
        "manifest-duplicate-key",
        _data_validate(lambda w: w.write("data/manifest.yaml", "classes: [a]\nclasses: [b]\n")),
        lambda w: [w.manifest, "duplicate key 'classes'", "line 2"],
        "each key may appear once",
    ),
    Case(
        "manifest-not-mapping",
        _data_validate(lambda w: w.write("data/manifest.yaml", "- a\n- b\n")),
        lambda w: [w.manifest],
        "a manifest is a mapping with name, classes, target, modalities",
    ),
    Case(
        "manifest-bad-json",
        _data_validate(lambda w: w.write("m.json", '{"classes": [1, 2,')),
        lambda w: [str(w.root / "m.json"), "not valid JSON"],
        "line 1",
    ),
    # shards
    Case(
        "shard-null-features",
        _data_validate(lambda w: (w.rewrite_shard("image", "train", _null_rows), w.manifest)[1]),
        lambda w: [w.shard("image", "train"), "row 2 has null features"],
        "drop or fill those rows",
    ),
    Case(
        "shard-duplicate-id",
        _data_validate(lambda w: (w.rewrite_shard("image", "val", _duplicate_id), w.manifest)[1]),
        lambda w: [w.shard("image", "val"), "'image-val-0'", "row 0", "row 3", "modalities.image.splits.val"],
        "ids must be unique within a split",
    ),
    Case(
        "shard-nan",
        _data_validate(lambda w: (w.rewrite_shard("text", "train", _nan_row), w.manifest)[1]),
        lambda w: [w.shard("text", "train"), "NaN/inf", "first at row 1"],
        "drop or repair those rows",
    ),
    Case(
        "shard-label-range",
        _data_validate(lambda w: (w.rewrite_shard("image", "test", _label_99), w.manifest)[1]),
        lambda w: [w.shard("image", "test"), "label 99", "row 2"],
        "labels index the manifest's classes",
    ),
    Case(
        "shard-missing",
        _data_validate(lambda w: (Path(w.shard("image", "test")).unlink(), w.manifest)[1]),
        lambda w: [w.shard("image", "test"), "file not found"],
        "fix the path in the manifest",
    ),
    Case(
        "shard-not-parquet",
        _data_validate(lambda w: (Path(w.shard("text", "train")).write_bytes(GARBAGE), w.manifest)[1]),
        lambda w: [w.shard("text", "train"), "cannot read the Parquet shard"],
        "rewrite the shard",
    ),
    Case(
        "shard-dim-mismatch",
        _data_validate(lambda w: w.edit_manifest(lambda t: t["modalities"]["text"].update(dim=5))),
        lambda w: [w.shard("text", "train"), "dim 4", "modalities.text.dim is 5"],
        "fix the manifest dim",
    ),
    Case(
        "shard-empty-val",
        _data_validate(_empty_val),
        lambda w: ["modalities.image.splits.val has 0 rows"],
        "the target needs val rows",
    ),
    Case(
        "val-rows-below-workers",
        _validate(_one_val_row),
        lambda w: ["image.val", "resources.num_workers"],
        "num_workers",
        store=True,
    ),
    # run configs
    Case(
        "config-binary",
        _validate(lambda w: w.write("run.yaml", GARBAGE)),
        lambda w: [w.config, "UTF-8"],
        "check the path",
    ),
    Case(
        "config-anchor-bomb",
        _validate(lambda w: w.write("run.yaml", BOMB)),
        lambda w: [w.config, "aliases expand"],
        "write the values out",
    ),
    Case(
        "config-over-10MB",
        _validate(lambda w: w.write("run.yaml", HUGE)),
        lambda w: [w.config, "larger than 10 MB"],
        "check the path",
    ),
    Case(
        "config-deep-nesting",
        _validate(lambda w: w.write("run.yaml", DEEP)),
        lambda w: [w.config, "nested too deeply"],
        "a few levels deep",
    ),
    Case(
        "config-missing",
        _validate(lambda w: str(w.root / "nope.yaml")),
        lambda w: [str(w.root / "nope.yaml"), "cannot read"],
        "check the path",
    ),
    Case(
        "config-unknown-section",
        _validate(lambda w: w.with_config(optimizer={"lr": 1})),
        lambda w: [w.config, "'optimizer'"],
        "allowed sections: data, model, train, tracking, resources",
    ),
    Case(
        "config-unknown-key",
        _validate(lambda w: w.with_config(train={"learning_rate": 0.1})),
        lambda w: [w.config, "'train.learning_rate'"],
        "allowed keys in 'train': lr,",
    ),
    Case(
        "config-duplicate-key",
        _validate(lambda w: w.write("run.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n")),
        lambda w: [w.config, "duplicate key 'lr'"],
        "each key may appear once",
    ),
    Case(
        "config-wrong-type",
        _validate(lambda w: w.with_config(train={"lr": "fast"})),
        lambda w: [w.config, "train.lr", "'fast'"],
        "expected a number",
    ),
    Case(
        "config-empty-experiment",
        _validate(lambda w: w.with_config(tracking={"experiment": ""})),
        lambda w: [w.config, "tracking.experiment is empty"],
        "tracking.experiment=uml-ray",
    ),
    Case(
        "config-warmup-too-long",
        _validate(lambda w: w.with_config(train={"warmup_steps": 500, "max_steps": 100})),
        lambda w: ["train.warmup_steps=500", "train.max_steps=100"],
        "must be smaller than",
    ),
    Case(
        "config-aux-per-class-over-rows",
        _validate(lambda w: w.config, "data.aux_per_class=50"),
        lambda w: ["data.aux_per_class=50", "train row(s) of auxiliary", w.manifest],
        "use data.aux_per_class<=",
    ),
    Case(
        "space-aux-per-class-over-rows",
        _tune(_space_with("data.aux_per_class", {"type": "choice", "values": [1, 50]})),
        lambda w: ["data.aux_per_class=50", "train row(s) of auxiliary"],
        "use data.aux_per_class<=",
    ),
    Case(
        "config-probe-without-backbone",
        _validate(lambda w: w.config, "model.head_init=probe"),
        lambda w: ["model.head_init=probe", "model.backbone"],
        "use model.head_init=random or text",
    ),
    Case(
        "config-no-manifest",
        _validate(lambda w: w.with_manifest("")),
        lambda w: ["data.manifest is empty"],
        "data.manifest=data/manifest.yaml",
    ),
    Case(
        "config-not-mapping",
        _validate(lambda w: w.write("run.yaml", "- train\n")),
        lambda w: [w.config],
        "a config is a mapping of sections",
    ),
    # overrides
    Case(
        "override-broken-flow",
        _validate(lambda w: w.config, "train.alpha={text: "),
        lambda w: ["override 'train.alpha={text: '", "not valid YAML"],
        "train.alpha.text=0.5",
    ),
    Case(
        "override-no-equals",
        _validate(lambda w: w.config, "train.lr"),
        lambda w: ["override 'train.lr'"],
        "section.key=value",
    ),
    Case(
        "override-unknown-key",
        _validate(lambda w: w.config, "train.lrate=0.1"),
        lambda w: ["'train.lrate'"],
        "allowed keys in 'train': lr,",
    ),
    Case(
        "override-out-of-range",
        _validate(lambda w: w.config, "train.lr=-1"),
        lambda w: ["train.lr", "-1.0"],
        "it must be > 0.0",
    ),
    Case(
        "override-bad-choice",
        _validate(lambda w: w.config, "model.regime=vision"),
        lambda w: ["model.regime", "'vision'"],
        "choose one of ['supervised', 'sequence']",
    ),
    Case(
        "override-alpha-unknown-modality",
        _validate(lambda w: w.config, "train.alpha.audio=0.5"),
        lambda w: ["train.alpha.audio", "'audio'"],
        "choose from ['text']",
    ),
    Case(
        "override-inline-two-workers",
        _validate(lambda w: w.config, "resources.trainer=inline", "resources.num_workers=2"),
        lambda w: ["resources.trainer=inline"],
        "set resources.num_workers=1",
    ),
    Case(
        "override-anchor-bomb",
        _validate(
            lambda w: w.config,
            "train.alpha="
            + "{a: &a [1,1,1,1,1,1,1,1,1,1], "
            + ", ".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdefg", "bcdefgh"))
            + "}",
        ),
        lambda w: ["override 'train.alpha=", "aliases expand"],
        "write the values out",
    ),
    # search spaces
    Case(
        "space-binary",
        _validate(lambda w: w.config, "--space", "SPACE"),
        lambda w: [str(w.root / "space.yaml"), "UTF-8"],
        "check the path",
    ),
    Case(
        "space-anchor-bomb",
        _tune(lambda w: w.space(BOMB)),
        lambda w: [str(w.root / "space.yaml"), "aliases expand"],
        "write the values out",
    ),
    Case(
        "space-missing",
        _tune(lambda w: str(w.root / "nope.yaml")),
        lambda w: [str(w.root / "nope.yaml"), "cannot read"],
        "check the path",
    ),
    Case(
        "space-unknown-key",
        _tune(_space_with("train.lrate", {"type": "uniform", "low": 0.1, "high": 0.2})),
        lambda w: ["params.train.lrate", "'train.lrate'"],
        "allowed keys in 'train': lr,",
    ),
    Case(
        "space-low-above-high",
        _tune(_space_with("train.lr", {"type": "uniform", "low": 0.2, "high": 0.1})),
        lambda w: ["params.train.lr", "low=0.2"],
        "swap them",
    ),
    Case(
        "space-log-from-zero",
        _tune(_space_with("train.lr", {"type": "loguniform", "low": 0, "high": 0.1})),
        lambda w: ["params.train.lr", "low=0"],
        "use a low > 0",
    ),
    Case(
        "space-unknown-distribution",
        _tune(_space_with("train.lr", {"type": "gaussian", "low": 0, "high": 1})),
        lambda w: ["params.train.lr", "'gaussian'"],
        "['loguniform', 'uniform', 'int', 'choice']",
    ),
    Case(
        "space-recipe-mismatch",
        _tune(lambda w: w.space({**GOOD_SPACE, "recipe": "sequence"})),
        lambda w: [str(w.root / "space.yaml"), "recipe 'sequence'"],
        "model.regime='supervised'",
    ),
    Case(
        "space-alpha-unknown-modality",
        _tune(_space_with("train.alpha.audio", {"type": "uniform", "low": 0, "high": 1})),
        lambda w: ["params.train.alpha.audio", "'audio'"],
        "choose from ['text']",
    ),
    Case(
        "space-corner-invalid",
        _tune(_space_with("train.warmup_steps", {"type": "int", "low": 0, "high": 500})),
        lambda w: ["params.train.warmup_steps", "value 500"],
        "must be smaller than train.max_steps",
    ),
    Case(
        "space-no-params",
        _tune(lambda w: w.space({"recipe": "supervised", "params": {}})),
        lambda w: [str(w.root / "space.yaml"), "'params'"],
        "non-empty mapping of config keys to distributions",
    ),
    # CLI flags
    Case(
        "tune-zero-trials",
        lambda w: ["tune", w.config, "--space", w.space(GOOD_SPACE), "--trials", "0"],
        lambda w: ["--trials", "got 0"],
        "must be >= 1",
    ),
    Case(
        "tune-resume-without-name",
        _tune(lambda w: w.space(GOOD_SPACE), "--resume"),
        lambda w: ["--resume"],
        "--name",
    ),
    Case(
        "train-resume-without-name",
        lambda w: ["train", w.config, "--resume"],
        lambda w: ["--resume"],
        "--name",
    ),
    Case(
        "synth-rows-per-shard-zero",
        _synth("--rows-per-shard", "0"),
        lambda w: ["rows_per_shard (--rows-per-shard)", "got 0"],
        "must be >= 1",
    ),
    Case(
        "synth-zero-classes",
        _synth("--classes", "0"),
        lambda w: ["n_classes (--classes)", "got 0"],
        "must be >= 1",
    ),
    Case("synth-zero-val", _synth("--n-val", "0"), lambda w: ["n_val (--n-val)", "got 0"], "must be >= 1"),
    Case(
        "synth-aux-below-classes",
        _synth("--classes", "8"),
        lambda w: ["n_aux (--n-aux)", "got 6"],
        "must be >= n_classes=8",
    ),
    Case(
        "synth-zero-aux-dim",
        _synth("--dims-aux", "16", "0"),
        lambda w: ["--dims-aux", "[16, 0]"],
        "must be >= 1",
    ),
    Case(
        "synth-bad-seq-len",
        _synth("--kind", "sequence", "--seq-len", "5", "2"),
        lambda w: ["seq_len", "(5, 2)"],
        "1 <= min <= max",
    ),
    Case(
        "synth-negative-seed", _synth("--seed", "-1"), lambda w: ["seed (--seed)", "got -1"], "must be >= 0"
    ),
    Case(
        "best-output-folder-missing",
        lambda w: ["best", "--tracking-uri", f"sqlite:///{w.db}", "--output", "/nonexistent/dir/best.yaml"],
        lambda w: ["/nonexistent/dir/best.yaml", "/nonexistent/dir does not exist"],
        "create it or choose another path",
    ),
    Case(
        "best-output-is-folder",
        lambda w: ["best", "--tracking-uri", f"sqlite:///{w.db}", "--output", str(w.root)],
        lambda w: [f"--output {w.root}", "is a folder"],
        "best_config.yaml",
    ),
    Case("best-top-zero", _best("--top", "0"), lambda w: ["--top", "got 0"], "must be >= 1"),
    Case(
        "best-metric-backtick",
        _best("--metric", "acc`; drop"),
        lambda w: ["'acc`; drop'"],
        "use e.g. best_val_acc",
    ),
    # tracking
    Case(
        "tracking-unknown-scheme",
        _validate(lambda w: w.config, "tracking.uri=bogus://x"),
        lambda w: ["'bogus://x'", "unsupported scheme 'bogus'"],
        "sqlite:///path/to/mlflow.db",
    ),
    Case(
        "tracking-plain-folder",
        _validate(lambda w: w.config, "tracking.uri=mlruns"),
        lambda w: ["mlruns'", "file store"],
        "sqlite:///path/to/mlflow.db",
    ),
    Case(
        "tracking-unreachable-server",
        _validate(lambda w: w.config, "tracking.uri=http://127.0.0.1:1"),
        lambda w: ["tracking.uri=http://127.0.0.1:1", "Connection refused"],
        "start the server or fix tracking.uri",
    ),
    Case(
        "tracking-sqlite-folder-missing",
        _validate(lambda w: w.config, "tracking.uri=sqlite:////nonexistent/dir/m.db"),
        lambda w: ["sqlite:////nonexistent/dir/m.db", "/nonexistent/dir does not exist"],
        "create it",
    ),
    Case(
        "tracking-sqlite-in-memory",
        _validate(lambda w: w.config, "tracking.uri=sqlite://"),
        lambda w: ["'sqlite://'", "in-memory"],
        "sqlite:///path/to/mlflow.db",
    ),
    Case(
        "best-unreachable-server",
        lambda w: ["best", "--tracking-uri", "http://127.0.0.1:1", "--output", str(w.root / "b.yaml")],
        lambda w: ["http://127.0.0.1:1", "Connection refused"],
        "start the server or fix --tracking-uri",
    ),
    Case(
        "best-unknown-scheme",
        lambda w: ["best", "--tracking-uri", "bogus://x", "--output", str(w.root / "b.yaml")],
        lambda w: ["'bogus://x'"],
        "sqlite:///path/to/mlflow.db",
    ),
    Case(
        "best-store-missing",
        _best(),
        lambda w: [f"sqlite:///{w.db}", "no such SQLite file"],
        "point --tracking-uri at",
    ),
    Case(
        "best-unknown-experiment",
        _best("--experiment", "nope"),
        lambda w: ["'nope'", "'tests'"],
        "experiments there:",
        store=True,
    ),
    Case(
        "best-sweep-both-quotes",
        _best("--sweep", 'it\'s "x"'),
        lambda w: ['it\'s "x"'],
        "drop one kind of quote",
    ),
    Case(
        "train-name-both-quotes",
        lambda w: ["train", w.config, "--name", 'it\'s "x"'],
        lambda w: ['it\'s "x"'],
        "drop one kind of quote",
        store=True,
    ),
    Case(
        "tune-name-slash",
        _tune(lambda w: w.space(GOOD_SPACE), "--name", "a/b"),
        lambda w: ["'a/b'"],
        "use letters, digits",
        store=True,
    ),
    # storage
    Case(
        "storage-is-a-file",
        _validate(lambda w: w.with_config(tracking={"storage_path": w.write("runs", "x")})),
        lambda w: [f"tracking.storage_path={str(w.root / 'runs')!r}", "is a file"],
        "point it at a folder",
    ),
    Case(
        "storage-under-a-file",
        _validate(lambda w: w.with_config(tracking={"storage_path": w.write("runs", "x") + "/sub"})),
        lambda w: [str(w.root / "runs"), "is a file"],
        "point it at a folder",
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


def _params():
    for case in CASES:
        marks = list(case.marks)
        if case.xfail:
            marks.append(pytest.mark.xfail(reason=case.xfail, strict=True))
        yield pytest.param(case, id=case.id, marks=marks)


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


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input_is_one_clear_line(case, tmp_path, capsys, ray_tripwire, request):
    work = Work(tmp_path)
    if case.store:
        shutil.copyfile(request.getfixturevalue("store_template"), work.db)
    argv = case.argv(work)
    argv = [str(work.space(GARBAGE)) if a == "SPACE" else a for a in argv]
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
    for name in case.names(work):
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"
    assert case.hint in lines[0], f"no fix hint {case.hint!r} in {lines[0]!r}"
    assert not ray_tripwire
    assert _recorded_runs(work.db) == 0
    assert seconds < 10, f"refusing took {seconds:.1f} s"


def test_anchor_bomb_is_refused_within_a_second_everywhere(tmp_path):
    """Each loader (run config, search space, manifest, override) refuses the bomb in well under a second."""
    from uml_ray.config import load_config, read_yaml
    from uml_ray.data.format import load_manifest
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
