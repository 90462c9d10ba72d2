"""The fine-tuning regime: image shards, the Ray Data image pipeline, a timm backbone under the shared head.

A tiny random-init timm model (``test_efficientnet``, 99k parameters, with BatchNorm) on 32 px
synthetic images whose class is the colour of a square: fast on CPU, and learnable.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_config
from helpers import fashion_mnist_case, interrupted_and_resumed

from uml_ray.cli import main
from uml_ray.config import load_config
from uml_ray.data.format import write_shards
from uml_ray.data.image_pipeline import ImageStream, ImageTransform, crop_box, transform_image
from uml_ray.data.images import encode_png, to_picture, write_image_shards
from uml_ray.data.manifest import Manifest, ModalitySpec, load_manifest, write_manifest
from uml_ray.data.streams import StreamSpec, TableSource
from uml_ray.driver.plan import build_plan
from uml_ray.models.backbone import build_backbone, param_groups
from uml_ray.train.context import LocalContext
from uml_ray.train.loop import Supervised, train_supervised

CLASSES = ["red", "green", "blue", "yellow"]
COLORS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
BACKBONE = "timm:test_efficientnet,pretrained=false"
FINETUNE = {
    "model": {
        "regime": "supervised",
        "backbone": BACKBONE,
        "image_size": 32,
        "freeze_blocks": 2,
        "head_init": "text",
    },
    "train": {
        "lr": 0.01,
        "batch_size": 8,
        "max_steps": 12,
        "warmup_steps": 2,
        "val_every": 4,
        "checkpoint_every": 1,
        "backbone_lr_scale": 0.5,
        "weight_decay": 0.01,
        "grad_clip": 1.0,
    },
    "data": {"augment_min_scale": 0.5},
    "resources": {"decode_cpus": 0.5},
}


def color_images(labels: np.ndarray, rng: np.random.Generator, size: int = 40) -> np.ndarray:
    """RGB noise images with a square of the class's colour at a random place (the class survives crops
    and flips)."""
    images = rng.integers(0, 110, size=(len(labels), size, size, 3)).astype(np.uint8)
    side = size // 2
    for image, label in zip(images, labels):
        top, left = rng.integers(0, size - side, 2)
        image[top : top + side, left : left + side] += (140 * COLORS[label]).astype(np.uint8)
    return images


def write_image_case(out: Path, per_class: dict[str, int], seed: int = 0) -> str:
    """A colour-square image target (PNG shards) + 8-d 'text' feature vectors carrying the class, with its
    manifest."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in per_class.items():
        labels = np.repeat(np.arange(len(CLASSES)), count)
        ids = [f"{split}-{i:03d}" for i in range(len(labels))]
        splits[split], _ = write_image_shards(
            str(out), "image", split, color_images(labels, rng), labels, ids
        )
    text_labels = np.repeat(np.arange(len(CLASSES)), 10)
    text = np.eye(len(CLASSES), 8, dtype=np.float32)[text_labels] * 2 + rng.normal(
        0, 0.3, (len(text_labels), 8)
    ).astype(np.float32)
    manifest = Manifest(
        "quadrants",
        CLASSES,
        "image",
        {
            "image": ModalitySpec(kind="image", dim=3, splits=splits),
            "text": ModalitySpec(
                kind="vector",
                dim=8,
                splits={"train": write_shards(str(out), "text", "train", text, text_labels)},
            ),
        },
    )
    return write_manifest(manifest, str(out / "manifest.yaml"))


@pytest.fixture(scope="module")
def image_manifest(tmp_path_factory):
    """4 classes: 4 train, 2 val and 4 test images per class."""
    return write_image_case(tmp_path_factory.mktemp("images"), {"train": 4, "val": 2, "test": 4})


def finetune_config(path: Path, manifest: str, workdir: Path, **sections) -> Path:
    merged = {
        section: {**FINETUNE.get(section, {}), **sections.get(section, {})}
        for section in set(FINETUNE) | set(sections)
    }
    return write_config(path, manifest, workdir, **merged)


def test_resumed_finetune_continues_exactly(ray_session, image_manifest, tmp_path):
    # two micro-batches per step: the streams' positions must survive accumulation too
    plan = build_plan(
        load_config(finetune_config(tmp_path / "c.yaml", image_manifest, tmp_path, train={"grad_accum": 2}))
    )
    whole = LocalContext(plan)
    train_supervised(plan, whole)
    # 16 train images in batches of 8: 2 per epoch; 12 steps x 2 micro-batches = 24 batches = 12 epochs
    assert whole.saved["streams"]["image"] == {"epoch": 11, "drawn": 2}

    first, second = interrupted_and_resumed(plan, train_supervised, fail_after=1)
    assert first.saved["progress"]["step"] == 4

    assert [r["step"] for r in second.reports] == [8, 12]
    for resumed, uninterrupted in zip(second.reports, whole.reports[1:]):
        assert resumed == uninterrupted  # losses, accuracies, lr: bit-identical
    for name, weight in whole.saved["model"].items():
        assert torch.equal(weight, second.saved["model"][name]), name


def test_linear_probe_then_fine_tune_starts_from_a_fitted_head_and_resumes_exactly(
    ray_session, image_manifest, tmp_path
):
    """model.head_init=probe (LP-FT): the head is fitted on the frozen backbone's features before any
    backbone step, so fine-tuning starts from a far lower loss than from a random head; a resumed run
    restores the probed head instead of probing again, and continues bit-identically."""
    losses = {}
    for head_init in ("random", "probe"):
        plan = build_plan(
            load_config(
                finetune_config(
                    tmp_path / f"{head_init}.yaml",
                    image_manifest,
                    tmp_path,
                    model={"head_init": head_init},
                    train={"probe_steps": 30, "max_steps": 4, "val_every": 1, "warmup_steps": 1},
                )
            )
        )
        run = LocalContext(plan)
        train_supervised(plan, run)
        losses[head_init] = run.reports[0]["train_loss"]
    assert losses["probe"] < 0.6 * losses["random"], losses

    plan = build_plan(
        load_config(
            finetune_config(
                tmp_path / "c.yaml",
                image_manifest,
                tmp_path,
                model={"head_init": "probe"},
                train={"probe_steps": 10},
            )
        )
    )
    whole = LocalContext(plan)
    train_supervised(plan, whole)
    _, second = interrupted_and_resumed(plan, train_supervised, fail_after=1)
    assert second.reports == whole.reports[1:]
    for name, weight in whole.saved["model"].items():
        assert torch.equal(weight, second.saved["model"][name]), name


def test_a_train_share_over_the_cache_streams_through_a_shuffle_buffer(ray_session, image_manifest):
    """Encoded images larger than data.cache_max_mb stream: never held whole, every row once per
    epoch (a shuffle buffer of 6 rows, batches of 4), shuffled differently each epoch, and a stream
    resumed mid-epoch continues with the batches an uninterrupted one draws next."""
    from uml_ray.data.streams import plan_streams, read_table

    manifest = load_manifest(image_manifest)
    assert plan_streams(manifest, ["text"], cache_max_mb=0)["image.train"].cached is False
    assert plan_streams(manifest, ["text"], cache_max_mb=0)["image.val"].cached is True  # ordered passes
    share = read_table(manifest.uris("image", "train"))
    spec = StreamSpec("image.train", "image", 3, len(share), cached=False)
    transform = ImageTransform(size=16, mean=(0.5,) * 3, std=(0.5,) * 3, train=True, min_scale=0.5, seed=0)

    def stream():
        return ImageStream(
            TableSource(share),
            spec,
            4,
            seed=0,
            rank=0,
            world_size=1,
            transform=transform,
            decode_cpus=0.5,
            eval_cache_mb=0,
            window_batches=2,
            shuffle_buffer=6,
        )

    whole = stream()
    epochs = [[whole.next() for _ in range(4)] for _ in range(2)]  # 16 rows: 4 batches per epoch
    assert whole._table is None and whole.state_dict() == {"epoch": 1, "drawn": 4}
    labels = share.column("label").to_numpy()
    for batches in epochs:
        assert all(images.shape == (4, 3, 16, 16) for images, _ in batches)
        assert sorted(np.concatenate([b[1] for b in batches]).tolist()) == sorted(labels.tolist())
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(*epochs))  # a new order each epoch

    resumed = stream()
    resumed.load_state_dict({"epoch": 1, "drawn": 2})
    for images, labels_ in epochs[1][2:]:
        again = resumed.next()
        assert np.array_equal(again[1], labels_) and np.array_equal(again[0], images)


def test_finetune_cli_streams_images_over_the_cache(ray_session, image_manifest, tmp_path, capsys):
    """The same fine-tuning with the train images streamed (data.cache_max_mb=0) learns as well."""
    config = finetune_config(
        tmp_path / "c.yaml",
        image_manifest,
        tmp_path,
        data={"cache_max_mb": 0, "shuffle_buffer": 8},
        train={"max_steps": 24, "val_every": 8, "backbone_lr_scale": 1.0},
    )
    assert main(["train", str(config), "--name", "streamed"]) == 0
    result = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    assert result["best_val_acc"] >= 0.5 and result["step"] == 24  # 4 classes: chance is 0.25


def test_augmentation_is_a_function_of_seed_epoch_and_row_id():
    picture = color_images(np.array([2]), np.random.default_rng(0))[0]
    payload = encode_png(to_picture(picture))
    train = ImageTransform(
        size=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), train=True, min_scale=0.3, seed=7
    )
    first = transform_image(payload, "row-1", 3, train)
    assert first.shape == (24, 24, 3) and first.dtype == np.uint8
    assert np.array_equal(first, transform_image(payload, "row-1", 3, train))
    others = [
        transform_image(payload, "row-1", 4, train),
        transform_image(payload, "row-2", 3, train),
        transform_image(payload, "row-1", 3, ImageTransform(**{**vars(train), "seed": 8})),
    ]
    assert all(not np.array_equal(first, other) for other in others)
    # eval: shorter side to 24 / 0.875 = 27 px, then the centre 24 x 24, the same every time
    evaluated = transform_image(payload, "row-1", 3, train.for_eval())
    assert np.array_equal(evaluated, transform_image(payload, "row-9", 0, train.for_eval()))
    rng = np.random.default_rng(0)
    boxes = np.array([crop_box(40, 30, rng, 0.3) for _ in range(500)])
    assert (
        (boxes[:, 0] >= 0).all()
        and (boxes[:, 0] + boxes[:, 2] <= 40).all()
        and (boxes[:, 1] + boxes[:, 3] <= 30).all()
    )
    areas = boxes[:, 2] * boxes[:, 3] / (40 * 30)
    assert areas.min() >= 0.28 and areas.max() <= 1.0 and areas.std() > 0.1


def test_param_groups_scale_the_backbone_lr_and_spare_norms_and_biases_from_decay():
    from uml_ray.models.supervised import SharedHeadUML

    torch.manual_seed(0)
    backbone = build_backbone(BACKBONE)
    backbone.freeze(2)
    model = SharedHeadUML({"image": backbone.num_features, "text": 8}, "image", 4, backbone=backbone)
    groups = {g["name"]: g for g in param_groups(model, 0.1, 0.05, 0.2)}
    assert groups["backbone"]["lr"] == pytest.approx(0.02) and groups["head"]["lr"] == 0.1
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.05
    assert all(p.ndim == 1 for p in groups["backbone_no_decay"]["params"])
    frozen = {id(p) for p in backbone.model.conv_stem.parameters()}
    assert not frozen & {id(p) for g in groups.values() for p in g["params"]}
    head_only = SharedHeadUML({"image": 16, "text": 8}, "image", 4, logit_scale=True)
    (group,) = param_groups(head_only, 0.1, 0.05, 0.2)
    assert group["params"] == list(head_only.parameters()) and group["weight_decay"] == 0.05


def rewrite_row(uri: str, row: int, payload: bytes) -> None:
    table = pq.read_table(uri)
    images = table.column("image").to_pylist()
    images[row] = payload
    pq.write_table(
        table.set_column(0, pa.field("image", pa.binary(), nullable=False), pa.array(images, pa.binary())),
        uri,
    )


@pytest.mark.parametrize("defect", ["undecodable", "channels", "empty"])
def test_each_bad_image_input_is_one_clear_error(defect, tmp_path, capsys):
    manifest = write_image_case(tmp_path / "data", {"train": 2, "val": 1, "test": 1})
    spec = load_manifest(manifest).modalities["image"]
    if defect == "undecodable":
        rewrite_row(spec.splits["train"][0], 5, b"\x89PNG\r\n\x1a\n not really")
        expected = [f"{spec.splits['train'][0]}: 1 row(s) are not decodable images (first at row 5"]
    elif defect == "channels":
        rewrite_row(spec.splits["test"][0], 2, encode_png(to_picture(np.zeros((8, 8), np.uint8))))
        expected = [
            f"{spec.splits['test'][0]}: 1 image(s) do not have the 3 channel(s) of modalities.image.dim "
            "(first at row 2: 1 channel(s) (L))"
        ]
    else:
        uris, _ = write_image_shards(str(tmp_path / "data"), "image", "val", [], [], [])
        expected = ["modalities.image.splits.val has 0 rows in its shards"]
    assert main(["data", "validate", manifest]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(text in lines[0] for text in expected), lines
    # training refuses the same input with the same line, before Ray starts
    config = finetune_config(tmp_path / "c.yaml", manifest, tmp_path)
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(lines[0].split(": ", 1)[1])


def test_image_writers_from_fashion_mnist_image_folder_and_parquet_bytes(tmp_path, capsys):
    from PIL import Image

    from uml_ray.data.images import fashion_mnist_images

    out = tmp_path / "fm"
    assert (
        main(["data", "images", str(out), "--split", "train", "--fashion-mnist", "train", "--limit", "12"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["channels"] == 1 and summary["rows"] == 12
    table = pq.read_table(load_manifest(summary["manifest"]).uris("image", "train"))
    images, labels, ids = fashion_mnist_images("train", np.arange(12))
    assert table.column("id").to_pylist() == ids and table.column("label").to_pylist() == labels.tolist()
    decoded = np.asarray(Image.open(__import__("io").BytesIO(table.column("image")[3].as_py())))
    assert np.array_equal(decoded, images[3])  # lossless: PNG keeps every pixel

    folder = tmp_path / "folder"
    for name, mode in (("cat", "RGBA"), ("dog", "RGB")):
        (folder / name).mkdir(parents=True)
        for i in range(2):
            Image.new(mode, (50, 30), (200, 10 * i, 30, 255)[: len(mode)]).save(folder / name / f"{i}.png")
    assert (
        main(
            [
                "data",
                "images",
                str(tmp_path / "ds"),
                "--split",
                "train",
                "--image-folder",
                str(folder),
                "--size",
                "20",
            ]
        )
        == 0
    )
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert written["channels"] == 3 and written["rows"] == 4
    bytes_file = tmp_path / "bytes.parquet"
    source = pq.read_table(load_manifest(written["manifest"]).uris("image", "train"))
    pq.write_table(source, bytes_file)
    for split in ("val", "test"):
        assert (
            main(
                ["data", "images", str(tmp_path / "ds"), "--split", split, "--image-parquet", str(bytes_file)]
            )
            == 0
        )
    capsys.readouterr()
    assert main(["data", "validate", written["manifest"]]) == 0
    stored = Image.open(__import__("io").BytesIO(source.column("image")[0].as_py()))
    assert stored.mode == "RGB" and stored.size == (33, 20)  # alpha dropped, shorter side shrunk to 20


def accuracy_on_test_images(config: Path, weights: dict) -> float:
    """Accuracy of ``weights`` on the 16 test images, counted here: the run's model and eval
    transform, one argmax per image."""
    plan = build_plan(load_config(config))
    correct, rows = 0, 0
    with contextlib.ExitStack() as closing, torch.no_grad():
        regime = Supervised(plan, LocalContext(plan), closing)
        regime.model.load_state_dict(weights)
        regime.model.eval()
        for images, labels in regime.test_stream.iter_once(5):
            logits = regime.model.logits("image", torch.from_numpy(np.ascontiguousarray(images)))
            correct += int((logits.argmax(1).numpy() == labels).sum())
            rows += len(labels)
    assert rows == 16
    return correct / rows


def test_finetune_cli_trains_the_backbone_into_mlflow(ray_session, image_manifest, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    config = finetune_config(
        tmp_path / "c.yaml",
        image_manifest,
        tmp_path,
        train={"max_steps": 24, "val_every": 8, "backbone_lr_scale": 1.0},
    )
    assert main(["train", str(config), "--name", "finetune"]) == 0
    result = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    # 4 classes: chance is 4 of the 16 test images; 10 or more by chance has p = 0.002
    assert result["best_val_acc"] >= 0.5 and result["test_acc"] >= 10 / 16

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["model.backbone"] == BACKBONE
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [8, 16, 24]
    best = torch.load(
        client.download_artifacts(run.info.run_id, "checkpoint/best.pt", str(tmp_path)), weights_only=False
    )
    # the score is the stored best-val weights' accuracy on the test images, not the last step's
    assert (best["val_acc"], best["step"]) == (result["best_val_acc"], result["best_step"])
    assert result["test_acc"] == accuracy_on_test_images(config, best["model"])

    torch.manual_seed(0)  # train.seed: the loop builds the backbone right after seeding
    initial = build_backbone(BACKBONE)
    initial.freeze(2)  # model.freeze_blocks: the stem and the first block
    trained = {
        name[len("backbone.") :]: value
        for name, value in best["model"].items()
        if name.startswith("backbone.")
    }
    frozen = tuple(f"model.{module}." for module in initial.frozen_modules)
    kept = [name for name in initial.state_dict() if name.startswith(frozen)]
    assert any(name.endswith("running_mean") for name in kept)  # BatchNorm statistics are frozen too
    for name in kept:
        assert torch.equal(initial.state_dict()[name], trained[name]), f"frozen {name} changed"
    learned = [f"model.{name}" for group in initial.groups[2:] for name in group]
    changed = [name for name in learned if not torch.equal(initial.state_dict()[name], trained[name])]
    assert len(changed) == len(learned), sorted(set(learned) - set(changed))


@pytest.mark.slow
def test_two_ddp_workers_reach_the_accuracy_of_one(ray_session, tmp_path, capsys):
    manifest = write_image_case(tmp_path / "data", {"train": 8, "val": 4, "test": 8}, seed=1)
    config = finetune_config(
        tmp_path / "c.yaml",
        manifest,
        tmp_path,
        train={"max_steps": 60, "val_every": 20, "backbone_lr_scale": 1.0},
        resources={"cpus_per_worker": 0.5, "decode_cpus": 0.25},
    )
    results = {}
    for workers in (1, 2):
        assert (
            main(["train", str(config), f"resources.num_workers={workers}", "--name", f"workers-{workers}"])
            == 0
        )
        results[workers] = json.loads(
            [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1]
        )
    print(f"1 worker {results[1]} / 2 DDP workers {results[2]}")
    assert results[1]["test_acc"] >= 0.75 and results[2]["test_acc"] >= 0.75  # chance: 0.25
    assert abs(results[1]["test_acc"] - results[2]["test_acc"]) <= 0.2


@pytest.mark.slow
def test_fashion_mnist_finetune_case_scores_the_probe_cases_images(ray_session, tmp_path, capsys):
    import io

    from PIL import Image

    from uml_ray.data.sources import load_fashion_mnist

    cases = {}
    for regime in ("probe", "finetune"):
        made = fashion_mnist_case(
            capsys, tmp_path / regime, tmp_path / "cache", shots=2, split_seed=1, regime=regime
        )
        cases[regime] = load_manifest(made["manifest"])
    finetune, probe = cases["finetune"], cases["probe"]
    assert (finetune.modalities["image"].kind, finetune.modalities["image"].dim) == ("image", 1)
    assert finetune.modalities["text"].dim == 384
    for split in ("train", "val", "test"):
        ids = pq.read_table(finetune.uris("image", split)).column("id").to_pylist()
        assert sorted(ids) == sorted(pq.read_table(probe.uris("image", split)).column("id").to_pylist()), (
            split
        )
    table = pq.read_table(finetune.uris("image", "test"))
    images, _ = load_fashion_mnist("test")
    row = int(table.column("id")[0].as_py().split("-")[1])
    stored = np.asarray(Image.open(io.BytesIO(table.column("image")[0].as_py())))
    assert np.array_equal(stored, 255 - images[row])  # inverted, native 28 px, lossless
    assert main(["data", "validate", str(finetune.path)]) == 0


# a tiny random-init open_clip ViT (2 blocks: 4 parameter groups), as fine-tuning backbone; a name of its own,
# since open_clip keeps registered configs process-wide
CLIP_TOWER = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def clip_tower(tmp_path_factory):
    """The backbone spec of a tiny open_clip ViT whose config is written to a JSON file."""
    path = tmp_path_factory.mktemp("clip") / "TinyClipTower.json"
    path.write_text(json.dumps(CLIP_TOWER))
    return f"open_clip:TinyClipTower,config={path},pretrained=false"


def test_open_clip_backbone_is_the_image_tower_in_groups_in_forward_order(clip_tower):
    import open_clip

    from uml_ray.data.image_pipeline import transform_from_data_config
    from uml_ray.models.backbone import check_backbone

    torch.manual_seed(0)
    backbone = build_backbone(clip_tower)
    assert isinstance(backbone.model, open_clip.transformer.VisionTransformer)  # the text tower is gone
    assert backbone.num_features == 16 and backbone.training
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 16)  # pooled, projected embeddings

    names = [name for name, _ in backbone.model.named_parameters()]
    grouped = [name for group in backbone.groups for name in group]
    assert (
        len(backbone.groups) == 4 and sorted(grouped) == sorted(names) and len(grouped) == len(set(grouped))
    )
    stem, first, second, last = (set(group) for group in backbone.groups)
    assert {"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight"} <= stem
    assert all(n.startswith("transformer.resblocks.0.") for n in first) and all(
        n.startswith("transformer.resblocks.1.") for n in second
    )
    assert last == {"ln_post.weight", "ln_post.bias", "proj"}

    config = backbone.data_config  # CLIP's preprocessing: bicubic resize of the shorter side + centre crop
    assert (
        config["input_size"] == (3, 32, 32)
        and config["crop_pct"] == 1.0
        and config["interpolation"] == "bicubic"
    )
    assert config["mean"] == tuple(open_clip.OPENAI_DATASET_MEAN) and config["std"] == tuple(
        open_clip.OPENAI_DATASET_STD
    )
    transform = transform_from_data_config(config, 0, 0.5, True, 0)
    assert (transform.size, transform.crop_pct, transform.mean) == (32, 1.0, config["mean"])
    assert check_backbone(clip_tower, 4) == 16  # the weightless check sees the same dim and groups


def test_freezing_an_open_clip_tower_keeps_its_first_groups_out_of_the_optimizer(clip_tower):
    from uml_ray.models.supervised import SharedHeadUML

    torch.manual_seed(0)
    backbone = build_backbone(clip_tower)
    backbone.freeze(2)  # the stem and the first block
    frozen = {name for group in backbone.groups[:2] for name in group}
    assert {n for n, p in backbone.model.named_parameters() if not p.requires_grad} == frozen
    model = SharedHeadUML({"image": backbone.num_features, "text": 8}, "image", 4, backbone=backbone)
    optimizer = torch.optim.AdamW(param_groups(model, 0.01, 0.01, 0.5))
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    parameters = dict(backbone.model.named_parameters())
    assert not {id(parameters[name]) for name in frozen} & optimized

    before = {name: p.detach().clone() for name, p in parameters.items()}
    loss = torch.nn.functional.cross_entropy(
        model.logits("image", torch.randn(4, 3, 32, 32)), torch.arange(4)
    )
    loss.backward()
    optimizer.step()
    changed = {name for name, p in parameters.items() if not torch.equal(before[name], p)}
    assert changed == set(parameters) - frozen


@pytest.mark.parametrize(
    "tower,groups",
    [
        (
            {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
            6,
        ),  # ModifiedResNet: stem, layer1..4, attention pool
        (
            {"image_size": 32, "timm_model_name": "test_vit", "timm_pool": "", "timm_proj": "linear"},
            7,
        ),  # timm trunk + projection
    ],
)
def test_open_clip_resnet_and_timm_towers_are_grouped_too(tower, groups, tmp_path):
    from uml_ray.models.backbone import check_backbone

    path = tmp_path / "TinyClipOtherTower.json"
    path.write_text(json.dumps({**CLIP_TOWER, "vision_cfg": tower}))
    spec = f"open_clip:TinyClipOtherTower,config={path},pretrained=false"
    backbone = build_backbone(spec)
    size = tower["image_size"]
    assert backbone(torch.randn(2, 3, size, size)).shape == (2, 16)
    grouped = [name for group in backbone.groups for name in group]
    assert sorted(grouped) == sorted(name for name, _ in backbone.model.named_parameters())
    assert len(backbone.groups) == groups and check_backbone(spec, groups) == 16


def test_check_backbone_names_the_field_for_bad_open_clip_specs(clip_tower, tmp_path):
    from uml_ray.errors import ConfigError
    from uml_ray.models.backbone import check_backbone

    bad = [
        (clip_tower, 5, 0, "model.freeze_blocks=5: backbone TinyClipTower has 4 parameter groups"),
        (
            "open_clip:NoSuchClip,pretrained=false",
            0,
            0,
            "model.backbone='open_clip:NoSuchClip,pretrained=false': open_clip has no model config",
        ),
        (f"open_clip:Gone,config={tmp_path / 'Gone.json'},pretrained=false", 0, 0, "does not exist"),
        ("open_clip:ViT-B-16", 0, 0, "model.backbone='open_clip:ViT-B-16': no weights named; add @TAG"),
        ("open_clip:ViT-B-16@nope", 0, 0, "no pretrained tag 'nope'"),
        (clip_tower, 0, 64, "model.image_size=64: backbone TinyClipTower takes 32 px images"),
    ]
    for spec, freeze_blocks, image_size, expected in bad:
        with pytest.raises(ConfigError) as error:
            check_backbone(spec, freeze_blocks, image_size)
        assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)
    # the real pretrained spec passes without loading (or downloading) a weight
    assert check_backbone("open_clip:ViT-B-16@openai", 14) == 512
