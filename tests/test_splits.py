"""Few-shot splits: seeded, stable, disjoint; CoOp and cross_modal_adaptation index import."""

from __future__ import annotations

import json

import numpy as np
import pytest

from uml_ray.data.splits import few_shot_split, load_coop_split, load_few_shot_index
from uml_ray.errors import DataError

IDS = [f"img-{i:03d}" for i in range(30)]
LABELS = [i % 3 for i in range(30)]


def test_k_shot_split_is_pinned_for_a_fixed_seed():
    # hard-coded: a change here means every published split moved
    assert few_shot_split(IDS, LABELS, shots=2, seed=7) == {
        "train": ["img-000", "img-024", "img-007", "img-013", "img-014", "img-020"],
        "val": ["img-003", "img-021", "img-010", "img-025", "img-011", "img-023"],
    }
    assert few_shot_split(IDS, LABELS, shots=1, seed=7) == {
        "train": ["img-024", "img-013", "img-020"],
        "val": ["img-000", "img-007", "img-014"],
    }


@pytest.mark.parametrize("shots", [1, 2, 4, 6])
def test_split_sizes_are_k_and_min_4_k_per_class_and_disjoint(shots):
    split = few_shot_split(IDS, LABELS, shots=shots, seed=3)
    label_of = dict(zip(IDS, LABELS))
    for name, per_class in (("train", shots), ("val", min(4, shots))):
        counts = np.bincount([label_of[i] for i in split[name]], minlength=3)
        assert counts.tolist() == [per_class] * 3
    assert not set(split["train"]) & set(split["val"])


def test_split_does_not_depend_on_input_order_and_changes_with_seed():
    order = np.random.default_rng(0).permutation(len(IDS))
    shuffled = few_shot_split([IDS[i] for i in order], [LABELS[i] for i in order], shots=4, seed=1)
    assert shuffled == few_shot_split(IDS, LABELS, shots=4, seed=1)
    assert few_shot_split(IDS, LABELS, shots=4, seed=2) != shuffled


def test_split_names_classes_that_are_too_small():
    with pytest.raises(DataError, match=r"class 1 has 3 rows, needs 6"):
        few_shot_split(
            ["a", "b", "c", "d", "e", "f", "g", "h", "i"], [0, 0, 0, 0, 0, 0, 1, 1, 1], shots=3, seed=0
        )


def test_coop_split_json_import(tmp_path):
    path = tmp_path / "split_zhou_Toy.json"
    path.write_text(
        json.dumps(
            {
                "train": [["cat/1.jpg", 0, "cat"], ["dog/2.jpg", 1, "dog"], ["cat/3.jpg", 0, "cat"]],
                "val": [["dog/4.jpg", 1, "dog"]],
                "test": [["cat/5.jpg", 0, "cat"], ["dog/6.jpg", 1, "dog"]],
            }
        )
    )
    splits = load_coop_split(str(path), image_dir="/data/toy")
    assert splits["train"].classes == ["cat", "dog"]
    assert splits["train"].paths[1] == "/data/toy/dog/2.jpg"
    assert splits["train"].ids == ["cat/1.jpg", "dog/2.jpg", "cat/3.jpg"]
    assert splits["train"].labels.tolist() == [0, 1, 0]
    assert splits["test"].labels.tolist() == [0, 1]

    path.write_text(json.dumps({"train": [["a.jpg", 0, "cat"], ["b.jpg", 0, "kitten"]]}))
    with pytest.raises(DataError, match="label 0 is named both 'cat' and 'kitten'"):
        load_coop_split(str(path))


def test_few_shot_index_import(tmp_path):
    path = tmp_path / "shot_1-seed_1.json"
    path.write_text(
        json.dumps(
            {
                "train": {
                    "data": [
                        {"impath": "./data/toy/cat/1.jpg", "label": 0, "classname": "cat"},
                        {"impath": "./data/toy/dog/2.jpg", "label": 1, "classname": "dog"},
                    ],
                    "indices": [4, 9],
                },
                "val": {
                    "data": [
                        {"impath": "./data/toy/cat/7.jpg", "label": 0, "classname": "cat"},
                        {"impath": "./data/toy/dog/8.jpg", "label": 1, "classname": "dog"},
                    ],
                    "indices": [1, 3],
                },
            }
        )
    )
    splits = load_few_shot_index(str(path))
    assert splits["train"].classes == ["cat", "dog"]
    assert splits["train"].indices == [4, 9]
    assert splits["val"].paths == ["./data/toy/cat/7.jpg", "./data/toy/dog/8.jpg"]
    assert splits["val"].labels.tolist() == [0, 1]
