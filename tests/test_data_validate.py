"""``uml-ray data validate``: every shard problem reported at once, naming the file, row and fix; exit 2."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import moto_s3

from uml_ray.cli import main
from uml_ray.data.format import build_table, table_to_numpy, write_shard
from uml_ray.data.manifest import load_manifest
from uml_ray.data.synth import write_synthetic


@pytest.fixture
def dataset(tmp_path):
    """A tiny valid synthetic dataset (5 classes, image 32-d target, text 16-d auxiliary)."""
    return load_manifest(
        write_synthetic(str(tmp_path / "ds"), n_train=20, n_val=10, n_test=10, n_aux=40, seed=0)
    )


def read_shard(manifest, modality, split):
    spec = manifest.modalities[modality]
    uri = manifest.uris(modality, split)[0]
    features, labels = table_to_numpy(pq.read_table(uri), spec.kind, spec.dim)
    return uri, np.array(features), labels.astype(np.int32)


def rewrite(uri, features, labels, kind="vector", dim=None, layout="binary"):
    dim = dim or np.asarray(features).shape[-1]
    pq.write_table(build_table(features, labels, None, kind, dim, layout), uri)


def validate(capsys, path):
    code = main(["data", "validate", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def validate_run_config(capsys, path):
    """``uml-ray validate CONFIG``: the same data checks, reached through a run config."""
    folder = os.path.dirname(str(path))
    config = os.path.join(folder, "run.yaml")
    with open(config, "w") as handle:
        yaml.safe_dump(
            {
                "data": {"manifest": str(path)},
                "tracking": {"uri": f"sqlite:///{folder}/mlflow.db", "storage_path": f"{folder}/runs"},
            },
            handle,
        )
    code = main(["validate", config])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture(params=["data validate", "validate"])
def check(request):
    """Each data defect must be caught by both ``uml-ray data validate`` and ``uml-ray validate``."""
    return validate if request.param == "data validate" else validate_run_config


def test_valid_synthetic_manifest_passes_with_summary(dataset, capsys):
    code, out, err = validate(capsys, dataset.path)
    assert code == 0 and err == ""
    assert out.splitlines()[-1] == "OK"
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines()[2:-1]}
    assert rows["image", "train"][5] == "20" and rows["image", "train"][7:] == ["4"] * 5
    assert rows["text", "train"][5] == "40" and rows["text", "train"][7:] == ["8"] * 5


def test_wrong_schema_names_column_and_expected_type(dataset, capsys, check):
    uri, features, labels = read_shard(dataset, "image", "train")
    table = pa.table(
        {
            "feats": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), 32),
            "label": pa.array(labels.astype(np.int64)),
            "id": pa.array([str(i) for i in range(len(labels))]),
        }
    )
    pq.write_table(table, uri)
    code, _, err = check(capsys, dataset.path)
    assert code == 2
    assert f"{uri}: column 'features' is missing (expected fixed_size_binary[128])" in err
    assert f"{uri}: column 'label' has type int64, expected int32" in err
    assert f"{uri}: unexpected column(s) ['feats']" in err


def _narrowed(features, labels):
    return features[:, :12], labels


def _nan_and_inf(features, labels):
    features[3, 5], features[7, 0], features[7, 1] = np.nan, np.inf, -np.inf
    return features, labels


def _labels_out_of_range(features, labels):
    labels[4], labels[6] = 7, -1
    return features, labels


@pytest.mark.parametrize(
    "modality, split, corrupt, message",
    [
        pytest.param(
            "text",
            "train",
            _narrowed,
            "features have dim 12 (fixed_size_binary[48], 48 bytes per row) but modalities.text.dim is 16 "
            "(expected fixed_size_binary[64])",
            id="dim-mismatch-names-manifest-dim",
        ),
        pytest.param(
            "image",
            "train",
            _nan_and_inf,
            "2 row(s) have NaN/inf features (first at row 3); drop or repair those rows",
            id="nan-and-inf-rows-report-first-row-and-count",
        ),
        pytest.param(
            "image",
            "val",
            _labels_out_of_range,
            "2 label(s) outside [0, 5) (first at row 4: label 7)",
            id="label-out-of-range-reports-row-and-value",
        ),
    ],
)
def test_bad_shard_values_are_named_with_the_file(dataset, capsys, check, modality, split, corrupt, message):
    uri, features, labels = read_shard(dataset, modality, split)
    rewrite(uri, *corrupt(features, labels))
    code, _, err = check(capsys, dataset.path)
    assert code == 2
    assert f"{uri}: {message}" in err


def test_empty_modality_and_missing_target_split(dataset, capsys, check):
    uri, features, labels = read_shard(dataset, "text", "train")
    rewrite(uri, features[:0], labels[:0], dim=16)
    raw = yaml.safe_load(open(dataset.path))
    del raw["modalities"]["image"]["splits"]["test"]
    with open(dataset.path, "w") as handle:
        yaml.safe_dump(raw, handle)
    code, _, err = check(capsys, dataset.path)
    assert code == 2
    assert f"{dataset.path}: modalities.text.splits.train has 0 rows in its shards" in err
    assert f"{dataset.path}: modalities.image.splits.test has no shards; the target needs test rows" in err


def test_class_without_auxiliary_sample_is_named(dataset, capsys, check):
    uri, features, labels = read_shard(dataset, "text", "train")
    keep = labels != 3
    rewrite(uri, features[keep], labels[keep])
    code, _, err = check(capsys, dataset.path)
    assert code == 2
    assert (
        f"{dataset.path}: class 'class_3' (label 3) has 4 target train rows but no sample in any auxiliary "
        f"modality (text); add auxiliary rows labelled 3 or drop the class"
    ) in err


@pytest.mark.parametrize(
    "damage, reason", [("missing", "file not found"), ("corrupt", "Parquet magic bytes not found")]
)
def test_unreadable_shard(dataset, capsys, check, damage, reason):
    uri = dataset.uris("image", "test")[0]
    if damage == "missing":
        os.remove(uri)
    else:
        with open(uri, "wb") as handle:
            handle.write(b"not a parquet file at all")
    code, _, err = check(capsys, dataset.path)
    assert code == 2
    lines = [line for line in err.splitlines() if uri in line]
    assert len(lines) == 1 and "cannot read the Parquet shard" in lines[0] and reason in lines[0]


def test_every_problem_is_reported_together(dataset, capsys, check):
    uri_train, features, labels = read_shard(dataset, "image", "train")
    features[2, 0] = np.nan
    labels[9] = 5
    rewrite(uri_train, features, labels)
    uri_aux, features, labels = read_shard(dataset, "text", "train")
    pq.write_table(build_table(features, None, None, "vector", 16), uri_aux)  # no labels at all
    raw = yaml.safe_load(open(dataset.path))
    raw["modalities"]["image"]["splits"]["val"].append("image/train/part-00000.parquet")
    with open(dataset.path, "w") as handle:
        yaml.safe_dump(raw, handle)
    code, _, err = check(capsys, dataset.path)
    assert code == 2
    problems = err.split("error: ", 1)[1].splitlines()
    expected = [
        f"{uri_train}: listed 2 times (modalities.image.splits.train, modalities.image.splits.val)",
        f"{uri_train}: 1 row(s) have NaN/inf features (first at row 2)",
        f"{uri_train}: 1 label(s) outside [0, 5) (first at row 9: label 5)",
        f"{uri_aux}: 40 row(s) have no label (first at row 0)",
        f"{dataset.path}: class 'class_0' (label 0) has 4 target train rows but no sample",
    ]
    for start in expected:
        assert sum(line.startswith(start) for line in problems) == 1, start
    # the duplicate is read twice but each of its problems is listed once; every class lacks text
    assert len(problems) == 4 + 5


def test_sequence_manifest_validates_and_flags_empty_sequences(tmp_path, capsys):
    path = write_synthetic(
        str(tmp_path / "seq"), kind="sequence", seq_len=(3, 6), n_train=10, n_val=5, n_test=5, n_aux=10
    )
    code, out, _ = validate(capsys, path)
    assert code == 0 and out.rstrip().endswith("OK")

    manifest = load_manifest(path)
    uri = manifest.uris("text", "train")[0]
    (steps, lengths), labels = table_to_numpy(pq.read_table(uri), "sequence", 16)
    sequences = np.split(np.array(steps), np.cumsum(lengths)[:-1])
    sequences[4], sequences[8] = sequences[4][:0], sequences[8][:0]
    sequences[6][1, 2] = np.inf
    rewrite(uri, sequences, labels.astype(np.int32), kind="sequence", dim=16)
    code, _, err = validate(capsys, path)
    assert code == 2
    assert f"{uri}: 2 row(s) are empty sequences (T=0) (first at row 4); drop those rows" in err
    assert f"{uri}: 1 row(s) have NaN/inf features (first at row 6)" in err


def test_broken_manifest_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "manifest.yaml"
    path.write_text(
        "classes: [a, b]\ntarget: image\nmodalities: {text: {kind: vector, dim: 4, splits: {}}}\n"
    )
    code, _, err = validate(capsys, path)
    assert code == 2
    assert f"{path}: target 'image' is not one of the modalities ['text']" in err


@pytest.fixture
def s3_server(monkeypatch):
    """An in-process moto S3 server on 127.0.0.1 that boto3 and pyarrow both reach via AWS_ENDPOINT_URL."""
    with moto_s3("uml-data") as aws:
        for key, value in aws.items():
            monkeypatch.setenv(key, value)
        yield aws["AWS_ENDPOINT_URL"]


def test_s3_round_trip(s3_server, capsys):
    import boto3

    path = write_synthetic("s3://uml-data/synthetic", n_train=10, n_val=10, n_test=10, n_aux=20, seed=0)
    assert path == "s3://uml-data/synthetic/manifest.yaml"
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="uml-data")["Contents"]}
    assert "synthetic/text/train/part-00000.parquet" in keys
    code, out, _ = validate(capsys, path)
    assert code == 0 and out.rstrip().endswith("OK")
    assert " ".join(out.splitlines()[2].split()[:6]) == "image train vector 32 1 10"

    boto3.client("s3").delete_object(Bucket="uml-data", Key="synthetic/text/train/part-00000.parquet")
    code, _, err = validate(capsys, path)
    assert code == 2
    assert "s3://uml-data/synthetic/text/train/part-00000.parquet: cannot read the Parquet shard" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=0.1", "unknown config key 'train.learning_rate'; allowed keys in 'train': lr,"),
        ("train.lr=0", "train.lr: 0.0 is out of range; it must be > 0.0 and <= 10.0"),
    ],
)
def test_run_config_errors_name_the_key(dataset, capsys, override, message):
    folder = os.path.dirname(str(dataset.path))
    config = os.path.join(folder, "run.yaml")
    with open(config, "w") as handle:
        yaml.safe_dump({"data": {"manifest": str(dataset.path)}}, handle)
    code = main(["validate", config, override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda raw: raw.update(labels=["x"]),
            "unknown manifest field(s) ['labels']; allowed: name, classes, target, modalities",
        ),
        (
            lambda raw: raw["modalities"]["text"].update(dim=0),
            "modalities.text.dim: must be a positive integer, got 0",
        ),
    ],
)
def test_manifest_field_errors_name_the_field(dataset, capsys, check, edit, message):
    raw = yaml.safe_load(open(dataset.path))
    edit(raw)
    with open(dataset.path, "w") as handle:
        yaml.safe_dump(raw, handle)
    code, _, err = check(capsys, dataset.path)
    assert code == 2 and message in err


def test_finite_but_implausible_features_fail_naming_file_column_and_row(dataset, capsys, check):
    uri, features, labels = read_shard(dataset, "image", "train")
    features[4:] *= 1e37  # finite, and a loss of 3e36 once trained on (the case)
    rewrite(uri, features, labels)
    code, _, err = check(capsys, dataset.path)
    assert code == 2
    assert f"{uri}: column 'features': 16 row(s) hold values beyond ±1e+06 (first at row 4: " in err
    assert "raise the bound (data validate --max-abs, data.max_abs_feature)" in err


def test_magnitude_bound_is_raised_by_a_flag_and_the_statistics_are_printed(dataset, capsys):
    uri, features, labels = read_shard(dataset, "text", "train")
    rewrite(uri, features * 1e7, labels)
    largest = float(np.abs(features * np.float32(1e7)).max())
    code, out, _ = validate(capsys, dataset.path)
    assert code == 2
    assert main(["data", "validate", str(dataset.path), "--max-abs", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "feature magnitudes (|value|; the bound is 1e+09):" in out
    text_row = next(line for line in out.splitlines() if line.strip().startswith("text.train"))
    assert float(text_row.split()[2]) == pytest.approx(largest, rel=1e-3)
    assert main(["data", "validate", str(dataset.path), "--max-abs", "-1"]) == 2
    assert "--max-abs -1.0: give a positive, finite bound" in capsys.readouterr().err


def test_corrupted_data_page_is_named_by_its_checksum(dataset, capsys, check):
    """Shards carry page checksums (format.write_shard): flipped bytes in a data page are reported as
    corruption, where without checksums most of them decode into finite garbage that passes."""
    uri, features, labels = read_shard(dataset, "image", "train")
    write_shard(build_table(features, labels, None, "vector", 32), uri)
    column = pq.ParquetFile(uri).metadata.row_group(0).column(0)
    first_page = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    start = first_page + column.total_compressed_size // 2
    data = bytearray(open(uri, "rb").read())
    data[start : start + 64] = bytes(b ^ 0x5A for b in data[start : start + 64])
    open(uri, "wb").write(bytes(data))
    code, _, err = check(capsys, dataset.path)
    assert code == 2
    assert (
        f"{uri}: column 'features' has a corrupted data page after row 0 (its CRC checksum does not match)"
        in err
    )


def test_a_run_config_raises_the_magnitude_bound_with_data_max_abs_feature(dataset, capsys):
    uri, features, labels = read_shard(dataset, "text", "train")
    rewrite(uri, features * 1e7, labels)
    assert validate_run_config(capsys, dataset.path)[0] == 2
    config = os.path.join(os.path.dirname(str(dataset.path)), "run.yaml")
    assert main(["validate", config, "data.max_abs_feature=1e9"]) == 0


def _set_layout(path, modality, layout):
    raw = yaml.safe_load(open(path))
    if layout is None:
        raw["modalities"][modality].pop("layout", None)
    else:
        raw["modalities"][modality]["layout"] = layout
    with open(path, "w") as handle:
        yaml.safe_dump(raw, handle)


def test_a_list_layout_dataset_validates_and_its_defects_are_found(tmp_path, capsys):
    """``--feature-layout list`` writes a manifest without ``layout`` (as every manifest before the binary
    layout): it validates, and NaN/inf and magnitude checks read its list payload."""
    path = write_synthetic(str(tmp_path / "ds"), n_train=20, n_val=10, n_test=10, n_aux=40, layout="list")
    assert "layout" not in yaml.safe_load(open(path))["modalities"]["image"]
    manifest = load_manifest(path)
    assert manifest.modalities["image"].layout == "list"
    assert pq.read_schema(manifest.uris("image", "train")[0]).field("features").type == pa.list_(
        pa.float32(), 32
    )
    assert validate(capsys, path)[0] == 0
    uri, features, labels = read_shard(manifest, "image", "train")
    features[5, 1] = np.nan
    features[7] = 3e6
    rewrite(uri, features, labels, layout="list")
    code, _, err = validate(capsys, path)
    assert code == 2
    assert f"{uri}: 1 row(s) have NaN/inf features (first at row 5)" in err
    assert f"{uri}: column 'features': 1 row(s) hold values beyond ±1e+06 (first at row 7: 3e+06)" in err


@pytest.mark.parametrize(
    "manifest_layout, shard_layout, found, expected",
    [
        ("binary", "list", "fixed_size_list<element: float>[16]", "fixed_size_binary[64]"),
        (None, "binary", "fixed_size_binary[64]", "fixed_size_list<item: float>[16]"),
    ],
    ids=["binary-manifest-list-shard", "legacy-manifest-binary-shard"],
)
def test_a_shard_in_another_layout_than_the_manifest_names_both_and_the_fix(
    dataset, capsys, check, manifest_layout, shard_layout, found, expected
):
    uri, features, labels = read_shard(dataset, "text", "train")
    rewrite(uri, features, labels, layout=shard_layout)
    _set_layout(dataset.path, "text", manifest_layout)
    code, _, err = check(capsys, dataset.path)
    assert code == 2
    declared = manifest_layout or "list"
    assert (
        f"{uri}: column 'features' is in the {shard_layout} layout ({found}) but modalities.text.layout is "
        f"{declared} (expected {expected}); set modalities.text.layout: {shard_layout} in the manifest, or "
        f"rewrite the shards in the {declared} layout (uml-ray data convert)"
    ) in err
    _set_layout(dataset.path, "text", shard_layout)
    assert validate(capsys, dataset.path)[0] == 0


def test_a_binary_column_of_the_wrong_byte_width_is_named(dataset, capsys, check):
    uri, features, labels = read_shard(dataset, "text", "train")
    ragged = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(50), len(labels), [None, pa.py_buffer(np.zeros(len(labels) * 50, np.uint8))]
    )
    pq.write_table(
        pa.table(
            {"features": ragged, "label": pa.array(labels), "id": pa.array(map(str, range(len(labels))))}
        ),
        uri,
    )
    code, _, err = check(capsys, dataset.path)
    assert code == 2
    assert (
        f"{uri}: column 'features' is fixed_size_binary[50]: 50 bytes per row is not a whole number of "
        "float32 values; modalities.text.dim 16 needs fixed_size_binary[64]"
    ) in err


def test_null_rows_of_a_binary_column_are_counted(dataset, capsys):
    uri, features, labels = read_shard(dataset, "image", "train")
    column = build_table(features, labels, None, "vector", 32).column("features").combine_chunks()
    valid = np.ones(len(labels), bool)
    valid[[3, 11]] = False
    nulled = pa.FixedSizeBinaryArray.from_buffers(
        column.type, len(column), [pa.array(valid).buffers()[1], column.buffers()[1]]
    )
    table = pa.table(
        {"features": nulled, "label": pa.array(labels), "id": pa.array(map(str, range(len(labels))))}
    )
    pq.write_table(table, uri)
    code, _, err = validate(capsys, dataset.path)
    assert code == 2
    assert f"{uri}: 2 row(s) have null features (first at row 3); every row needs features" in err


@pytest.mark.parametrize(
    "modality, layout, message",
    [
        ("text", "floats", "modalities.text.layout: 'floats' is not one of ['binary', 'list']"),
        ("image", "binary", "modalities.image.layout: only vector modalities have a layout"),
    ],
)
def test_a_bad_layout_field_is_named(tmp_path, capsys, modality, layout, message):
    kind = "vector" if modality == "text" else "sequence"
    path = write_synthetic(str(tmp_path / "ds"), kind=kind, n_train=10, n_val=5, n_test=5, n_aux=10)
    _set_layout(path, modality, layout)
    code, _, err = validate(capsys, path)
    assert code == 2 and message in err
