"""The two payload layouts of vector features (docs/data-format.md §1): the same features written as
``binary`` and as ``list`` give bit-identical batches on every read path (streamed, its decoded cache,
a worker's row range, in memory, Ray Data) and bit-identical training, and ``uml-ray data convert``
turns one layout into the other without changing a value."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import ALIGNED, write_config

from uml_ray.cli import main
from uml_ray.config import load_config
from uml_ray.data.feature_cache import CACHE_ENV
from uml_ray.data.format import build_table, layout_of, table_to_numpy, write_shards
from uml_ray.data.manifest import Manifest, ModalitySpec, load_manifest
from uml_ray.data.parquet_source import ParquetSource
from uml_ray.data.streams import BatchStream, StreamSpec, TableSource, read_table
from uml_ray.data.synth import write_synthetic
from uml_ray.driver.plan import build_plan
from uml_ray.train.context import LocalContext
from uml_ray.train.loop import train_supervised

ROWS, DIM = 300, 8
LAYOUTS = ("binary", "list")


@pytest.fixture
def both(tmp_path, monkeypatch):
    """The same rows written in each layout: {layout: shard URIs} (shards of 128 rows)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    features = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    labels = rng.integers(0, 5, ROWS)
    return {
        layout: write_shards(
            str(tmp_path / layout), "text", "train", features, labels, rows_per_shard=128, layout=layout
        )
        for layout in LAYOUTS
    }


def drawn(source, cached: bool = False, rank: int = 0, world_size: int = 1, epochs: int = 3) -> list:
    """Every batch of ``epochs`` epochs as (features bytes, labels bytes), then one ordered pass."""
    spec = StreamSpec("text.train", "vector", DIM, ROWS, cached=cached)
    stream = BatchStream(source, spec, 16, seed=7, rank=rank, world_size=world_size, shuffle_buffer=50)
    batches = []
    while stream.epoch < epochs:
        features, labels = stream.next()
        assert features.dtype == np.float32 and features.shape[1] == DIM
        batches.append((features.tobytes(), labels.tobytes()))
    batches += [(rows.tobytes(), labels.tobytes()) for rows, labels in stream.iter_once(64)]
    stream.close()
    return batches


def test_binary_rows_are_a_zero_copy_view_of_a_slice():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(20, DIM)).astype(np.float32)
    table = build_table(features, np.arange(20), None, "vector", DIM)  # binary: the default
    assert table.schema.field("features").type == pa.binary(4 * DIM)
    sliced = table.slice(5, 7)
    rows, labels = table_to_numpy(sliced, "vector", DIM)
    assert rows.dtype == np.float32 and rows.shape == (7, DIM)
    assert np.array_equal(rows, features[5:12]) and labels.tolist() == list(range(5, 12))
    data = np.frombuffer(table.column("features").chunk(0).buffers()[1], np.uint8)
    assert np.shares_memory(rows, data)  # the Arrow buffer itself, from the slice's offset
    as_list, _ = table_to_numpy(build_table(features, None, None, "vector", DIM, "list"), "vector", DIM)
    assert as_list.tobytes() == table_to_numpy(table, "vector", DIM)[0].tobytes()
    assert torch.equal(torch.from_numpy(rows.copy()), torch.from_numpy(features[5:12]))


def test_a_shuffle_buffer_fill_of_one_block_is_not_copied():
    """A fill that is one contiguous block (an empty remainder before it) is used as it is; only a
    fill of several blocks is combined, into one chunk per column."""
    from uml_ray.data.streams import _concat

    rng = np.random.default_rng(2)
    block = build_table(rng.normal(size=(20, DIM)).astype(np.float32), np.arange(20), None, "vector", DIM)
    assert _concat([block]) is block and _concat([block.slice(20), block]) is block
    joined = _concat([block.slice(15), block])
    assert len(joined) == 25 and all(column.num_chunks == 1 for column in joined.columns)
    rows, _ = table_to_numpy(joined, "vector", DIM)
    assert np.array_equal(rows[5:], table_to_numpy(block, "vector", DIM)[0])


def test_every_pyarrow_read_path_gives_the_same_batches_in_both_layouts(both):
    paths = {}
    for layout, uris in both.items():
        assert layout_of(pq.read_schema(uris[0]).field("features").type) == layout
        cached = ParquetSource(uris, block_rows=37)  # epoch 0 decoded and recorded, epochs 1-2 replayed
        paths[layout] = {
            "streamed": drawn(ParquetSource(uris, block_rows=37, cache=False)),
            "streamed + decoded cache": drawn(cached),
            "worker 0 of 2": drawn(ParquetSource(uris, rank=0, world_size=2), rank=0, world_size=2),
            "worker 1 of 2": drawn(ParquetSource(uris, rank=1, world_size=2), rank=1, world_size=2),
            "in memory": drawn(TableSource(read_table(uris).sort_by("id")), cached=True),
        }
        assert cached.cache.ready
    for path in paths["binary"]:
        assert paths["binary"][path] == paths["list"][path], path


def test_ray_data_reads_both_layouts_into_the_same_batches(ray_session, both, tmp_path):
    from uml_ray.data.ray_streams import build_streamed_datasets

    found, means = {}, {}
    for layout, uris in both.items():
        manifest = Manifest(
            "layouts",
            [str(c) for c in range(5)],
            "image",
            {
                "image": ModalitySpec("vector", DIM, None, {"train": uris}, layout),
                "text": ModalitySpec("vector", DIM, None, {"train": uris}, layout),
            },
        )
        spec = StreamSpec("image.train", "vector", DIM, ROWS, cached=False)
        datasets = build_streamed_datasets(manifest, {"image.train": spec}, 0, False, 0)
        table = pa.concat_tables(
            list(datasets["image.train"].iter_batches(batch_size=None, batch_format="pyarrow"))
        ).sort_by("id")
        found[layout] = table_to_numpy(table, "vector", DIM)[0].tobytes()
        aux = StreamSpec("text.train", "vector", DIM, ROWS, cached=False)
        shaped = build_streamed_datasets(manifest, {"text.train": aux}, 0, True, 0)["text.train"]
        table = pa.concat_tables(list(shaped.iter_batches(batch_size=None, batch_format="pyarrow")))
        assert table.schema.field("features").type == read_table(uris).schema.field("features").type
        features, labels = table_to_numpy(table.sort_by("label"), "vector", DIM)
        means[layout] = (features.copy(), labels.copy())
    assert found["binary"] == found["list"]
    assert np.array_equal(means["binary"][1], np.arange(5))
    # Ray Data's hash-shuffle groupby orders a class's rows at run time (either layout, run to run):
    # float32 sums in another order differ in the last bits
    np.testing.assert_allclose(means["binary"][0], means["list"][0], rtol=1e-5, atol=1e-6)
    features, labels = table_to_numpy(read_table(both["list"]), "vector", DIM)
    expected = np.stack([features[labels == c].mean(axis=0) for c in range(5)])
    np.testing.assert_allclose(means["binary"][0], expected, rtol=1e-5, atol=1e-6)


def _plan(manifest: str, tmp_path):
    return build_plan(load_config(write_config(tmp_path / "c.yaml", manifest, tmp_path)))


def test_training_is_bit_identical_in_both_layouts_and_convert_keeps_every_value(tmp_path, capsys):
    path = write_synthetic(str(tmp_path / "ds"), seed=0, **ALIGNED)
    manifest = load_manifest(path)
    assert all(spec.layout == "binary" for spec in manifest.modalities.values())
    before = {
        uri: pq.read_table(uri) for uri in manifest.uris("text", "train") + manifest.uris("image", "val")
    }
    runs = {}
    for layout in ("binary", "list"):
        if layout == "list":
            capsys.readouterr()
            assert main(["data", "convert", path, "--feature-layout", "list", "--modality", "text"]) == 0
            assert json.loads(capsys.readouterr().out)["rewritten"] == {"text": 1}
            assert main(["data", "convert", path, "--feature-layout", "list"]) == 0  # text: done already
            assert json.loads(capsys.readouterr().out)["rewritten"] == {"image": 3, "text": 0}
            assert "layout" not in yaml.safe_load(open(path))["modalities"]["image"]  # list: as before
        assert main(["data", "validate", path]) == 0
        capsys.readouterr()
        context = LocalContext(_plan(path, tmp_path))
        train_supervised(context.plan, context)
        runs[layout] = context
    for uri, table in before.items():
        converted = pq.read_table(uri)
        assert layout_of(table.schema.field("features").type) == "binary"
        assert layout_of(converted.schema.field("features").type) == "list"
        values = [table_to_numpy(t, "vector", 32)[0].tobytes() for t in (table, converted)]
        assert values[0] == values[1]
        assert converted.column("id").equals(table.column("id"))
        assert converted.column("label").equals(table.column("label"))
    assert runs["list"].reports == runs["binary"].reports  # losses, accuracies: bit for bit
    for name, weight in runs["binary"].saved["model"].items():
        assert torch.equal(weight, runs["list"].saved["model"][name]), name


def test_convert_refuses_what_it_cannot_convert(tmp_path, capsys):
    path = write_synthetic(str(tmp_path / "seq"), kind="sequence", n_train=10, n_val=5, n_test=5, n_aux=10)
    assert main(["data", "convert", path, "--feature-layout", "list", "--modality", "text"]) == 2
    assert "--modality text: not a vector modality of this manifest" in capsys.readouterr().err


@pytest.mark.parametrize(
    "workers", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["1-process", "2-workers"]
)
def test_a_streamed_run_trains_identically_in_both_layouts(ray_session, tmp_path, capsys, workers):
    """``uml-ray train`` with every share streamed by pyarrow through the decoded cache (in one process,
    or a row range per Ray Train worker): a run over binary shards reports exactly what a run over the
    same rows converted to lists does."""
    resources = ["resources.num_workers=2", "resources.cpus_per_worker=0.25", "resources.data_cpus=1"]
    path = write_synthetic(str(tmp_path / "ds"), seed=0, **ALIGNED)
    results = {}
    for layout in ("binary", "list"):
        if layout == "list":
            assert main(["data", "convert", path, "--feature-layout", "list"]) == 0
        config = write_config(
            tmp_path / f"{layout}.yaml", path, tmp_path, data={"cache_max_mb": 0, "shuffle_buffer": 64}
        )
        capsys.readouterr()
        overrides = resources if workers == 2 else []
        assert main(["train", str(config), *overrides, "--name", layout]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        results[layout] = json.loads(lines[-1])
    assert results["binary"]["test_acc"] > 0.4  # 5 classes: chance is 0.2
    for name in ("step", "best_step", "best_val_acc", "test_acc"):
        assert results["list"][name] == results["binary"][name], name
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    run_ids = {run.info.run_name: run.info.run_id for run in runs}
    for name in ("train_loss", "val_loss", "val_acc", "test_loss"):
        histories = [
            [(m.step, m.value) for m in client.get_metric_history(run_ids[layout], name)]
            for layout in LAYOUTS
        ]
        assert histories[0] and histories[0] == histories[1], name  # every value, bit for bit
