"""``uml-ray extract`` (any source → feature shards) and ``uml-ray case`` (the offline real cases)."""

from __future__ import annotations

import json
from pathlib import Path

from uml_ray.data.format import DEFAULT_LAYOUT, LAYOUT_HELP, LAYOUTS
from uml_ray.errors import DataError

VERBOSE_HELP = "Ray Data's progress bars and execution banners on the console"


def _text_sources(value: str) -> tuple[str, ...]:
    """``--text templates,wordnet`` as the builder's tuple of sources."""
    return tuple(s.strip() for s in value.split(",") if s.strip())


# the fashion-mnist builder's keyword options, each flag named after its parameter: (flag, argparse options)
CASE_OPTIONS = (
    (
        "--train-pool",
        {"type": int, "default": 100, "help": "train-file images per class the few-shot splits draw from"},
    ),
    ("--test-size", {"type": int, "default": 1000, "help": "test images, balanced over the classes"}),
    (
        "--image-size",
        {
            "type": int,
            "default": 128,
            "help": "encoder input size in pixels (probe regime; fine-tuning sets model.image_size)",
        },
    ),
    (
        "--regime",
        {
            "choices": ["probe", "finetune"],
            "default": "probe",
            "help": "fashion-mnist: probe = frozen EfficientNet-Lite0 image features; finetune = images kept "
            "as PNG bytes (kind image) for fine-tuning a backbone; text is MiniLM features either way",
        },
    ),
    (
        "--text",
        {
            "type": _text_sources,
            "default": "templates,wordnet",
            "help": "text sources: templates, wordnet or both",
        },
    ),
    (
        "--text-modalities",
        {
            "choices": ["joint", "separate"],
            "default": "joint",
            "help": "fashion-mnist: the text sources as one auxiliary modality 'text' (joint) or one per "
            "source (separate: 'wordnet', 'templates', each with its own alpha)",
        },
    ),
    ("--cache-dir", {"help": "feature cache (default: $UML_RAY_CACHE or OUT/../.feature-cache)"}),
    (
        "--feature-layout",
        {"choices": list(LAYOUTS), "default": DEFAULT_LAYOUT, "help": f"fashion-mnist: {LAYOUT_HELP}"},
    ),
    ("--batch-size", {"type": int, "default": 64}),
    ("--num-actors", {"type": int}),
)
# the fashion-mnist-rows builder's keyword options, likewise
ROWS_OPTIONS = (
    (
        "--train-per-class",
        {"type": int, "default": 100, "help": "fashion-mnist-rows: train sequences per class"},
    ),
    ("--val-per-class", {"type": int, "default": 50, "help": "fashion-mnist-rows: val sequences per class"}),
    (
        "--test-per-class",
        {"type": int, "default": 100, "help": "fashion-mnist-rows: test sequences per class"},
    ),
)


def _builder_options(args, table) -> dict:
    """The keyword arguments a table's flags give the builder (``--train-pool`` → ``train_pool``)."""
    names = [flag[2:].replace("-", "_") for flag, _ in table]
    return {name: getattr(args, name) for name in names}


def register(subparsers) -> None:
    """Add the extract and case commands."""
    extract = subparsers.add_parser(
        "extract", help="encode images or text with a frozen encoder into feature shards"
    )
    extract.add_argument(
        "--out",
        required=True,
        help="dataset folder: shards go to OUT/<modality>/<split>, manifest to OUT/manifest.yaml",
    )
    extract.add_argument(
        "--encoder",
        required=True,
        help="e.g. open_clip:ViT-B-16@openai, timm:vit_small_patch14_dinov2.lvd142m, hf:PATH, "
        "efficientnet-lite0, minilm",
    )
    extract.add_argument("--split", default="train", choices=["train", "val", "test"])
    extract.add_argument("--modality", help="modality name in the manifest (default: image or text)")
    extract.add_argument("--target", default="image", help="target modality when a new manifest is created")
    source = extract.add_mutually_exclusive_group(required=True)
    source.add_argument("--image-folder", help="ImageFolder-style directory root/<class>/<image>")
    source.add_argument(
        "--image-parquet", help="Parquet file(s) of encoded image bytes (columns image, label, id)"
    )
    source.add_argument("--fashion-mnist", choices=["train", "test"], help="a Fashion-MNIST idx split")
    source.add_argument("--cupl", help="CuPL JSON {classname: [sentences]}")
    source.add_argument(
        "--templates", help="prompt templates separated by '|', e.g. 'a photo of a {}.|a sketch of a {}.'"
    )
    source.add_argument("--wordnet", action="store_true", help="WordNet glosses of the class names")
    extract.add_argument(
        "--classes",
        help="ordered class names, comma-separated or a file with one per line "
        "(default: the image folder's, Fashion-MNIST's, or the existing manifest's)",
    )
    extract.add_argument("--limit", type=int, help="encode only the first N rows (smoke runs)")
    extract.add_argument("--batch-size", type=int, default=64)
    extract.add_argument(
        "--num-actors", type=int, help="encoder copies (default: one per GPU, else one per node)"
    )
    extract.add_argument(
        "--feature-layout",
        choices=list(LAYOUTS),
        help=f"{LAYOUT_HELP}; adding a split to an existing modality keeps that modality's layout",
    )
    extract.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    extract.set_defaults(func=run_extract)

    case = subparsers.add_parser("case", help="build a real offline dataset")
    case.add_argument(
        "name",
        choices=["fashion-mnist", "fashion-mnist-rows"],
        help="fashion-mnist: EfficientNet-Lite0 image features + MiniLM WordNet/template text (supervised); "
        "fashion-mnist-rows: images as 28-step row sequences + MiniLM token sequences (sequence regime)",
    )
    case.add_argument("--out", required=True, help="dataset folder (manifest.yaml is written there)")
    case.add_argument(
        "--shots", type=int, help="fashion-mnist: train images per class (required); val gets min(4, shots)"
    )
    case.add_argument("--split-seed", type=int, default=0, help="seed of the few-shot draw")
    for flag, options in CASE_OPTIONS + ROWS_OPTIONS:
        case.add_argument(flag, **options)
    case.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    case.set_defaults(func=run_case)


def _class_list(value: str | None) -> list[str] | None:
    if not value:
        return None
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [name.strip() for name in value.split(",") if name.strip()]


def _extract_layout(asked: str | None, existing, modality: str, manifest_path: Path) -> str:
    """The layout ``extract`` writes: ``--feature-layout``, else the existing modality's (its splits
    share one), else the default; a layout other than the existing modality's is refused up front."""
    held = existing.modalities.get(modality) if existing else None
    if held is None or held.kind != "vector":
        return asked or DEFAULT_LAYOUT
    if asked and asked != held.layout:
        raise DataError(
            f"{manifest_path}: modality '{modality}' holds {held.layout}-layout shards; write its new split "
            f"with --feature-layout {held.layout}, or convert it first (uml-ray data convert "
            f"{manifest_path} --feature-layout {asked})"
        )
    return held.layout


def run_extract(args) -> int:
    """Encode one source into OUT/<modality>/<split> shards and add them to OUT/manifest.yaml."""
    import numpy as np

    from uml_ray.data import sources
    from uml_ray.data.manifest import Manifest, ModalitySpec, load_manifest, write_manifest
    from uml_ray.encoders import extract
    from uml_ray.encoders.registry import feature_dim, parse_encoder

    spec = parse_encoder(args.encoder)
    manifest_path = Path(args.out) / "manifest.yaml"
    existing = load_manifest(manifest_path) if manifest_path.exists() else None
    classes = _class_list(args.classes) or (existing.classes if existing else None)
    kind = "image" if (args.image_folder or args.image_parquet or args.fashion_mnist) else "text"
    extract.show_ray_data_progress(args.verbose)
    extract.ensure_ray()
    if args.image_folder:
        folder = sources.list_image_folder(args.image_folder, classes)
        classes, limit = folder.classes, slice(0, args.limit)
        rows = extract.rows_from_paths(folder.paths[limit], folder.labels[limit], folder.ids[limit])
    elif args.fashion_mnist:
        images, labels = sources.load_fashion_mnist(args.fashion_mnist)
        classes, count = sources.FASHION_MNIST_CLASSES, args.limit or len(images)
        rows = extract.rows_from_arrays(
            images[:count], labels[:count], [f"{args.fashion_mnist}-{i:05d}" for i in range(count)]
        )
    elif args.image_parquet:
        if not classes:
            raise DataError("--image-parquet needs --classes (or an existing manifest) to name the labels")
        rows = extract.rows_from_image_parquet(args.image_parquet)
        rows = rows.limit(args.limit) if args.limit else rows
    else:
        if not classes:
            raise DataError(
                "text sources need --classes (or an existing manifest) to match class names against"
            )
        if args.cupl:
            pairs = sources.load_cupl(args.cupl, classes)
        elif args.templates:
            pairs = sources.template_texts(classes, args.templates.split("|"))
        else:
            pairs = sources.wordnet_glosses(classes)
        pairs = pairs[: args.limit] if args.limit else pairs
        rows = extract.rows_from_texts([t for t, _ in pairs], np.array([label for _, label in pairs]))
    modality = args.modality or kind
    layout = _extract_layout(args.feature_layout, existing, modality, manifest_path)
    uris = extract.extract_features(
        rows,
        spec,
        kind,
        args.split,
        args.out,
        batch_size=args.batch_size,
        num_actors=args.num_actors,
        name=modality,
        layout=layout,
    )
    dim = feature_dim(spec, kind)
    manifest = existing or Manifest(
        name=Path(args.out).name, classes=list(classes), target=args.target, modalities={}
    )
    if list(manifest.classes) != list(classes):
        raise DataError(f"{manifest_path}: classes {manifest.classes} differ from this source's {classes}")
    spec_entry = manifest.modalities.setdefault(
        modality, ModalitySpec(kind="vector", dim=dim, encoder=spec.text, layout=layout)
    )
    if spec_entry.dim != dim or spec_entry.encoder != spec.text:
        raise DataError(
            f"{manifest_path}: modality '{modality}' holds {spec_entry.encoder} ({spec_entry.dim}-d) "
            f"features; write {spec.text} ({dim}-d) under another --modality or --out"
        )
    spec_entry.splits[args.split] = uris
    write_manifest(manifest, manifest_path)
    print(
        json.dumps(
            {
                "manifest": str(manifest_path),
                "modality": modality,
                "split": args.split,
                "shards": len(uris),
                "dim": dim,
            }
        )
    )
    return 0


def run_case(args) -> int:
    """Build (or reuse) a real offline case and print its summary as JSON."""
    from uml_ray.encoders.cases import build_fashion_mnist_case
    from uml_ray.encoders.extract import show_ray_data_progress
    from uml_ray.errors import ConfigError

    show_ray_data_progress(args.verbose)  # for the extractions of a cache miss (cases.py: ensure_ray)

    if args.name == "fashion-mnist-rows":
        from uml_ray.encoders.sequence_case import build_fashion_sequence_case

        manifest = build_fashion_sequence_case(
            args.out, seed=args.split_seed, **_builder_options(args, ROWS_OPTIONS)
        )
        print(json.dumps({"manifest": str(manifest)}))
        return 0
    if args.shots is None:
        raise ConfigError("case fashion-mnist needs --shots K (train images per class)")

    summary = build_fashion_mnist_case(
        args.out, args.shots, args.split_seed, **_builder_options(args, CASE_OPTIONS)
    )
    print(json.dumps(summary))
    return 0
