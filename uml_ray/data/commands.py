"""``uml-ray data validate``, ``synth``, ``images`` and ``convert``."""

from __future__ import annotations

import inspect

from uml_ray.data.format import LAYOUT_HELP, LAYOUTS
from uml_ray.data.synth import write_synthetic

# the CLI's defaults are the generator's own, so the two never drift apart
SYNTH_DEFAULTS = {name: p.default for name, p in inspect.signature(write_synthetic).parameters.items()}
# one ``data synth`` option per generator parameter: (flag, parameter, argparse options)
SYNTH_OPTIONS = (
    ("--classes", "n_classes", {"type": int, "help": "number of classes"}),
    ("--latent-dim", "latent_dim", {"type": int, "help": "dim of the shared latent z"}),
    ("--dim-x", "dim_x", {"type": int, "help": "dim of the target modality 'image'"}),
    (
        "--dims-aux",
        "dims_aux",
        {"type": int, "nargs": "+", "help": "dims of the auxiliary modalities (text, aux2, ...)"},
    ),
    ("--n-train", "n_train", {"type": int, "help": "target train rows"}),
    ("--n-val", "n_val", {"type": int, "help": "target val rows"}),
    ("--n-test", "n_test", {"type": int, "help": "target test rows"}),
    ("--n-aux", "n_aux", {"type": int, "help": "train rows of each auxiliary modality"}),
    ("--noise-x", "noise_x", {"type": float, "help": "observation noise of the target"}),
    ("--noise-aux", "noise_aux", {"type": float, "help": "observation noise of the auxiliary modalities"}),
    ("--class-sep", "class_sep", {"type": float, "help": "scale of the class means in latent space"}),
    (
        "--aux-pure-noise",
        "aux_pure_noise",
        {"action": "store_true", "help": "auxiliary modalities are pure noise (control case)"},
    ),
    (
        "--aux-shared-mixing",
        "aux_shared_mixing",
        {
            "action": "store_true",
            "help": "auxiliary modalities observed through the target's own mixing "
            "(aligned spaces; dims must equal --dim-x)",
        },
    ),
    (
        "--aux-spread",
        "aux_spread",
        {
            "type": float,
            "help": "within-class latent spread of the auxiliary rows "
            "(below 1: each row pins its class down more tightly)",
        },
    ),
    ("--kind", "kind", {"choices": ["vector", "sequence"], "help": "row kind"}),
    (
        "--seq-len",
        "seq_len",
        {"type": int, "nargs": 2, "metavar": ("MIN", "MAX"), "help": "sequence length range"},
    ),
    ("--rows-per-shard", "rows_per_shard", {"type": int, "help": "rows per Parquet shard"}),
    ("--feature-layout", "layout", {"choices": list(LAYOUTS), "help": LAYOUT_HELP}),
    ("--seed", "seed", {"type": int, "help": "seed; the same seed writes byte-identical shards"}),
)


def register(subparsers) -> None:
    """Add the ``data`` command group."""
    data = subparsers.add_parser("data", help="check and generate datasets (Parquet shards + manifest)")
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    validate = commands.add_parser("validate", help="check a manifest and every shard; list every problem")
    validate.add_argument("manifest", help="manifest file (YAML or JSON), local or s3:// / gs://")
    validate.add_argument(
        "--max-abs",
        type=float,
        default=None,
        help="the largest |feature value| accepted (default 1e6); raise it for features that are right so",
    )
    validate.set_defaults(func=run_validate)

    convert = commands.add_parser(
        "convert",
        help="rewrite a dataset's vector shards in another payload layout, in place (docs/data-format.md §1)",
    )
    convert.add_argument("manifest", help="manifest file (YAML or JSON), local or s3:// / gs://")
    convert.add_argument("--feature-layout", required=True, choices=list(LAYOUTS), help=LAYOUT_HELP)
    convert.add_argument("--modality", nargs="+", help="vector modalities to convert (default: all)")
    convert.set_defaults(func=run_convert)

    synth = commands.add_parser(
        "synth", help="write the synthetic linear-generative-model dataset (docs/method.md §4)"
    )
    synth.add_argument("out_dir", help="output folder (local or s3:// / gs://)")
    for flag, parameter, options in SYNTH_OPTIONS:
        default = SYNTH_DEFAULTS[parameter]
        synth.add_argument(flag, default=list(default) if isinstance(default, tuple) else default, **options)
    synth.set_defaults(func=run_synth)

    images = commands.add_parser(
        "images", help="write one split of images as PNG shards (kind: image) for fine-tuning"
    )
    images.add_argument(
        "out_dir",
        help="dataset folder: shards go to OUT/<modality>/<split>, the manifest to OUT/manifest.yaml",
    )
    images.add_argument("--split", required=True, choices=["train", "val", "test"])
    source = images.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--fashion-mnist",
        choices=["train", "test"],
        help="a Fashion-MNIST idx split (Debian dataset-fashion-mnist)",
    )
    source.add_argument("--image-folder", help="ImageFolder-style directory root/<class>/<image>")
    source.add_argument(
        "--image-parquet", nargs="+", help="Parquet file(s) of encoded image bytes (columns image, label, id)"
    )
    images.add_argument(
        "--classes",
        help="ordered class names, comma-separated "
        "(default: the folder's, Fashion-MNIST's or the manifest's)",
    )
    images.add_argument("--modality", default="image", help="modality name in the manifest")
    images.add_argument("--target", default="image", help="target modality when a new manifest is created")
    images.add_argument(
        "--size", type=int, default=0, help="shrink each image's shorter side to this many pixels (0 = keep)"
    )
    images.add_argument("--limit", type=int, default=0, help="write only the first N images (smoke runs)")
    images.set_defaults(func=run_images)


def format_summary(summary: dict) -> str:
    """A readable table of shards, rows and per-class counts per modality and split."""
    classes = summary["classes"]
    lines = [f"dataset {summary['name']}: {len(classes)} classes, target {summary['target']}"]
    lines.append(
        f"{'modality':<12}{'split':<7}{'kind':<10}{'dim':>6}{'shards':>8}{'rows':>9}"
        f"{'unlabeled':>11}  per class"
    )
    for modality, spec in summary["modalities"].items():
        for split, counts in spec["splits"].items():
            per_class = " ".join(str(counts["per_class"][name]) for name in classes)
            lines.append(
                f"{modality:<12}{split:<7}{spec['kind']:<10}{spec['dim']:>6}{counts['shards']:>8}{counts['rows']:>9}"
                f"{counts['unlabeled']:>11}  {per_class}"
            )
    return "\n".join(lines)


def run_validate(args) -> int:
    """Print the dataset summary with each feature split's |value| statistics and OK, or raise
    DataError listing every problem (exit 2)."""
    import math

    from uml_ray.data.validate import DEFAULT_MAX_ABS, summarize_manifest, validate_manifest
    from uml_ray.errors import ConfigError, DataError

    max_abs = DEFAULT_MAX_ABS if args.max_abs is None else args.max_abs
    if not (math.isfinite(max_abs) and max_abs > 0):
        raise ConfigError(
            f"--max-abs {args.max_abs}: give a positive, finite bound (default {DEFAULT_MAX_ABS:g})"
        )
    manifest, problems, magnitudes = validate_manifest(args.manifest, max_abs)
    if problems:
        raise DataError(problems)
    print(format_summary(summarize_manifest(manifest)))
    print(f"feature magnitudes (|value|; the bound is {max_abs:g}):")
    for name, found in magnitudes.items():
        print(f"  {name:<24} max {found['abs_max']:<12.4g} mean {found['abs_mean']:.4g}")
    print("OK")
    return 0


def run_images(args) -> int:
    """Write one split of images and print a JSON summary."""
    import json
    from pathlib import Path

    from uml_ray.data.images import write_image_dataset
    from uml_ray.data.manifest import load_manifest

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    existing = Path(args.out_dir, "manifest.yaml")
    if classes is None and existing.exists():
        classes = load_manifest(str(existing)).classes
    summary = write_image_dataset(
        args.out_dir,
        args.split,
        fashion_mnist=args.fashion_mnist,
        image_folder=args.image_folder,
        image_parquet=args.image_parquet,
        classes=classes,
        modality=args.modality,
        target=args.target,
        size=args.size,
        limit=args.limit,
    )
    print(json.dumps(summary))
    return 0


def run_synth(args) -> int:
    """Write the synthetic dataset and print its manifest path."""
    values = {parameter: getattr(args, flag[2:].replace("-", "_")) for flag, parameter, _ in SYNTH_OPTIONS}
    # list-valued options (nargs) are tuples in the generator's signature
    path = write_synthetic(
        args.out_dir, **{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()}
    )
    print(path)
    return 0


def run_convert(args) -> int:
    """Convert the vector shards and print what was rewritten as JSON."""
    import json

    from uml_ray.data.convert import convert_layout

    rewritten = convert_layout(args.manifest, args.feature_layout, args.modality)
    print(json.dumps({"manifest": args.manifest, "layout": args.feature_layout, "rewritten": rewritten}))
    return 0
