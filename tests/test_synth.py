"""The synthetic linear generative model (docs/method.md §4): layout, determinism, and the information
each modality carries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from uml_ray.cli import main
from uml_ray.data.format import table_to_numpy
from uml_ray.data.manifest import load_manifest
from uml_ray.data.synth import write_synthetic


def read(manifest, modality, split):
    spec = manifest.modalities[modality]
    table = pq.read_table(manifest.uris(modality, split))
    features, labels = table_to_numpy(table, spec.kind, spec.dim)
    return features, labels, table.column("id").to_pylist()


def nearest_class_mean_accuracy(features, labels, n_classes):
    """Fit class means on the first half, score the second half."""
    half = len(labels) // 2
    means = np.stack([features[:half][labels[:half] == c].mean(axis=0) for c in range(n_classes)])
    distances = ((features[half:, None, :] - means[None]) ** 2).sum(axis=-1)
    return float((distances.argmin(axis=1) == labels[half:]).mean())


def test_layout_target_splits_and_unpaired_auxiliaries(tmp_path):
    manifest = load_manifest(
        write_synthetic(str(tmp_path), dims_aux=(16, 8), n_train=30, n_val=20, n_test=25, n_aux=40)
    )
    assert manifest.target == "image" and manifest.auxiliary == ["text", "aux2"]
    assert manifest.classes == [f"class_{c}" for c in range(5)]
    assert {s: list(spec.splits) for s, spec in manifest.modalities.items()} == {
        "image": ["train", "val", "test"],
        "text": ["train"],
        "aux2": ["train"],
    }
    rows = {}
    for modality, split, dim, n in [
        ("image", "train", 32, 30),
        ("image", "test", 32, 25),
        ("text", "train", 16, 40),
        ("aux2", "train", 8, 40),
    ]:
        features, labels, ids = read(manifest, modality, split)
        assert features.shape == (n, dim) and features.dtype == np.float32
        assert np.bincount(labels, minlength=5).tolist() == [n // 5] * 5  # balanced classes
        rows[modality, split] = set(ids)
    assert not rows["image", "train"] & rows["text", "train"]  # ids never pair rows across modalities


def test_same_seed_writes_identical_bytes(tmp_path):
    first = load_manifest(write_synthetic(str(tmp_path / "a"), n_aux=50, seed=3))
    second = load_manifest(write_synthetic(str(tmp_path / "b"), n_aux=50, seed=3))
    other = load_manifest(write_synthetic(str(tmp_path / "c"), n_aux=50, seed=4))
    for modality, split in [("image", "train"), ("image", "val"), ("image", "test"), ("text", "train")]:
        a, b, c = (Path(m.uris(modality, split)[0]).read_bytes() for m in (first, second, other))
        assert a == b
        assert not np.array_equal(read(first, modality, split)[0], read(other, modality, split)[0])
    seq_a = load_manifest(write_synthetic(str(tmp_path / "sa"), kind="sequence", n_aux=20, seed=1))
    seq_b = load_manifest(write_synthetic(str(tmp_path / "sb"), kind="sequence", n_aux=20, seed=1))
    assert (
        Path(seq_a.uris("text", "train")[0]).read_bytes() == Path(seq_b.uris("text", "train")[0]).read_bytes()
    )


def test_auxiliary_carries_class_information_unless_pure_noise(tmp_path):
    informative = load_manifest(write_synthetic(str(tmp_path / "real"), n_train=2000, n_aux=2000, seed=0))
    pure_noise = load_manifest(
        write_synthetic(str(tmp_path / "noise"), n_aux=2000, aux_pure_noise=True, seed=0)
    )
    features, labels, _ = read(informative, "text", "train")
    text_acc = nearest_class_mean_accuracy(features, labels, 5)
    features, labels, _ = read(informative, "image", "train")
    image_acc = nearest_class_mean_accuracy(features, labels, 5)
    features, labels, _ = read(pure_noise, "text", "train")
    noise_acc = nearest_class_mean_accuracy(features, labels, 5)
    print(f"nearest class mean: text {text_acc:.3f}, image {image_acc:.3f}, pure-noise text {noise_acc:.3f}")
    assert text_acc > 0.9
    assert abs(noise_acc - 0.2) < 0.05  # chance with 5 classes, 1000 held-out rows
    # X sees part of the latent space poorly: the same classes are harder to tell apart in it
    assert text_acc - image_acc > 0.05
    # the target itself is untouched by aux_pure_noise
    assert nearest_class_mean_accuracy(*read(pure_noise, "image", "test")[:2], 5) > 0.6


def test_sequences_are_predictable_and_carry_the_class(tmp_path):
    manifest = load_manifest(
        write_synthetic(str(tmp_path), kind="sequence", seq_len=(8, 16), n_train=1000, seed=0)
    )
    assert manifest.modalities["image"].kind == "sequence"
    (steps, lengths), labels, _ = read(manifest, "image", "train")
    assert lengths.min() >= 8 and lengths.max() <= 16 and steps.shape == (lengths.sum(), 32)
    starts = np.cumsum(lengths) - lengths
    sequences = [steps[s : s + n] for s, n in zip(starts, lengths)]
    # a linear one-step predictor already explains most of the next step: next-step prediction is learnable
    previous = np.concatenate([s[:-1] for s in sequences])
    following = np.concatenate([s[1:] for s in sequences])
    design = np.c_[previous, np.ones(len(previous))]
    weights, *_ = np.linalg.lstsq(design, following, rcond=None)
    r2 = 1 - ((design @ weights - following) ** 2).sum() / ((following - following.mean(axis=0)) ** 2).sum()
    pooled = np.stack([s.mean(axis=0) for s in sequences])
    pooled_acc = nearest_class_mean_accuracy(pooled, labels, 5)
    print(f"next-step R2 {r2:.3f}, mean-pooled nearest class mean {pooled_acc:.3f}")
    assert r2 > 0.5
    assert pooled_acc > 0.5  # chance is 0.2


def test_synth_cli_writes_a_valid_manifest(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "data",
                "synth",
                str(out),
                "--classes",
                "3",
                "--dim-x",
                "6",
                "--dims-aux",
                "4",
                "5",
                "--n-train",
                "9",
                "--n-val",
                "6",
                "--n-test",
                "6",
                "--n-aux",
                "12",
                "--seed",
                "2",
            ]
        )
        == 0
    )
    path = capsys.readouterr().out.strip()
    assert path == str(out / "manifest.yaml")
    manifest = load_manifest(path)
    assert len(manifest.classes) == 3 and manifest.auxiliary == ["text", "aux2"]
    assert [manifest.modalities[m].dim for m in ("image", "text", "aux2")] == [6, 4, 5]
    assert main(["data", "validate", path]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")


def test_synth_cli_rejects_bad_sequence_lengths(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path), "--kind", "sequence", "--seq-len", "5", "2"]) == 2
    err = capsys.readouterr().err
    assert "seq_len must be (min, max) with 1 <= min <= max, got (5, 2)" in err and "Traceback" not in err
