"""Typed configs: YAML load, dotted overrides, and clear rejections naming the key."""

import pytest

from uml_ray.config import dump_config, load_config
from uml_ray.errors import ConfigError


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(
        None, ["train.lr=3e-4", "train.alpha.text=0.5", "model.head_init=text", "resources.num_workers=2"]
    )
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.alpha == {"text": 0.5}
    assert cfg.model.head_init == "text"
    assert cfg.resources.num_workers == 2
    assert cfg.flat()["train.alpha.text"] == 0.5


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.lr=0.02", "train.alpha.text=0.7", "data.manifest=/x/m.yaml"],
        ["train.lr=3e-4", "train.alpha.text=0.5", "model.head_init=text", "data.auxiliary=text"],
    ],
)
def test_a_dumped_config_loads_back_equal(tmp_path, overrides):
    cfg = load_config(None, overrides)
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_relative_manifest_resolves_against_config_folder(tmp_path):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "run.yaml").write_text("data:\n  manifest: ../data/manifest.yaml\n")
    cfg = load_config(tmp_path / "cfgs" / "run.yaml")
    assert cfg.data.manifest == str((tmp_path / "data" / "manifest.yaml").resolve())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'; allowed keys in 'train': lr,"),
        (["trian.lr=1"], "unknown config section 'trian'"),
        (["train.lr=-1"], "train.lr: -1.0 is out of range; it must be > 0.0"),
        (["train.batch_size=0"], "train.batch_size: 0 is out of range; it must be >= 1"),
        (
            ["model.regime=unsupervised"],
            "model.regime: 'unsupervised' is not allowed; choose one of ['supervised', 'sequence']",
        ),
        (["train.alpha.text=-0.5"], "train.alpha: -0.5 is out of range"),
        (["train.max_steps=ten"], "train.max_steps: expected an integer, got 'ten'"),
        (
            ["model.regime=sequence", "model.zdim=30", "model.heads=4"],
            "model.zdim=30 is not divisible by model.heads=4",
        ),
        (
            ["train.warmup_steps=600", "train.max_steps=500"],
            "train.warmup_steps=600 must be smaller than train.max_steps=500",
        ),
        (["resources.trainer=inline", "resources.num_workers=2"], "resources.trainer=inline runs one worker"),
        (
            ["resources.data_cpus=0.5"],
            "resources.data_cpus=0.5: Ray Data's file-listing task needs a whole CPU",
        ),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_duplicate_yaml_keys_rejected(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr' at line 3"):
        load_config(path)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  zdimm: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "model.zdimm" in str(info.value) and "zdim" in str(info.value)
