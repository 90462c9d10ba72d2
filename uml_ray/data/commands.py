"""``uml-ray data validate`` and ``uml-ray data synth``."""

from __future__ import annotations

import inspect

from uml_ray.data.synth import write_synthetic
from uml_ray.uri import output_folder

# the CLI's defaults are the generator's own, so the two never drift apart
SYNTH_DEFAULTS = {name: p.default for name, p in inspect.signature(write_synthetic).parameters.items()}


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

    synth = commands.add_parser(
        "synth", help="write the synthetic linear-generative-model dataset (docs/method.md §4)"
    )
    synth.add_argument("out_dir", type=output_folder, help="output folder (local or s3:// / gs://)")
    synth.add_argument("--classes", type=int, default=SYNTH_DEFAULTS["n_classes"], help="number of classes")
    synth.add_argument(
        "--latent-dim", type=int, default=SYNTH_DEFAULTS["latent_dim"], help="dim of the shared latent z"
    )
    synth.add_argument(
        "--dim-x", type=int, default=SYNTH_DEFAULTS["dim_x"], help="dim of the target modality 'image'"
    )
    synth.add_argument(
        "--dims-aux",
        type=int,
        nargs="+",
        default=list(SYNTH_DEFAULTS["dims_aux"]),
        help="dims of the auxiliary modalities (text, aux2, ...)",
    )
    synth.add_argument("--n-train", type=int, default=SYNTH_DEFAULTS["n_train"], help="target train rows")
    synth.add_argument("--n-val", type=int, default=SYNTH_DEFAULTS["n_val"], help="target val rows")
    synth.add_argument("--n-test", type=int, default=SYNTH_DEFAULTS["n_test"], help="target test rows")
    synth.add_argument(
        "--n-aux", type=int, default=SYNTH_DEFAULTS["n_aux"], help="train rows of each auxiliary modality"
    )
    synth.add_argument(
        "--noise-x", type=float, default=SYNTH_DEFAULTS["noise_x"], help="observation noise of the target"
    )
    synth.add_argument(
        "--noise-aux",
        type=float,
        default=SYNTH_DEFAULTS["noise_aux"],
        help="observation noise of the auxiliary modalities",
    )
    synth.add_argument(
        "--class-sep",
        type=float,
        default=SYNTH_DEFAULTS["class_sep"],
        help="scale of the class means in latent space",
    )
    synth.add_argument(
        "--aux-pure-noise", action="store_true", help="auxiliary modalities are pure noise (control case)"
    )
    synth.add_argument(
        "--aux-shared-mixing",
        action="store_true",
        help="auxiliary modalities observed through the target's own mixing (aligned spaces; dims must equal --dim-x)",
    )
    synth.add_argument(
        "--aux-spread",
        type=float,
        default=SYNTH_DEFAULTS["aux_spread"],
        help="within-class latent spread of the auxiliary rows (below 1: each row pins its class down more tightly)",
    )
    synth.add_argument(
        "--kind", choices=["vector", "sequence"], default=SYNTH_DEFAULTS["kind"], help="row kind"
    )
    synth.add_argument(
        "--seq-len",
        type=int,
        nargs=2,
        default=list(SYNTH_DEFAULTS["seq_len"]),
        metavar=("MIN", "MAX"),
        help="sequence length range",
    )
    synth.add_argument(
        "--rows-per-shard", type=int, default=SYNTH_DEFAULTS["rows_per_shard"], help="rows per Parquet shard"
    )
    synth.add_argument(
        "--seed",
        type=int,
        default=SYNTH_DEFAULTS["seed"],
        help="seed; the same seed writes byte-identical shards",
    )
    synth.set_defaults(func=run_synth)

    images = commands.add_parser(
        "images", help="write one split of images as PNG shards (kind: image) for fine-tuning"
    )
    images.add_argument(
        "out_dir",
        type=output_folder,
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
        help="ordered class names, comma-separated (default: the folder's, Fashion-MNIST's or the manifest's)",
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
        f"{'modality':<12}{'split':<7}{'kind':<10}{'dim':>6}{'shards':>8}{'rows':>9}{'unlabeled':>11}  per class"
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

    from uml_ray.data.format import load_manifest
    from uml_ray.data.images import write_image_dataset

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
    path = write_synthetic(
        args.out_dir,
        n_classes=args.classes,
        latent_dim=args.latent_dim,
        dim_x=args.dim_x,
        dims_aux=tuple(args.dims_aux),
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        n_aux=args.n_aux,
        noise_x=args.noise_x,
        noise_aux=args.noise_aux,
        class_sep=args.class_sep,
        aux_pure_noise=args.aux_pure_noise,
        aux_shared_mixing=args.aux_shared_mixing,
        aux_spread=args.aux_spread,
        kind=args.kind,
        seq_len=tuple(args.seq_len),
        rows_per_shard=args.rows_per_shard,
        seed=args.seed,
    )
    print(path)
    return 0
