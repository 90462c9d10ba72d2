"""``uml-ray data validate`` and ``uml-ray data synth``."""

from __future__ import annotations

import inspect

from uml_ray.data.synth import write_synthetic

# the CLI's defaults are the generator's own, so the two never drift apart
SYNTH_DEFAULTS = {name: p.default for name, p in inspect.signature(write_synthetic).parameters.items()}


def register(subparsers) -> None:
    """Add the ``data`` command group."""
    data = subparsers.add_parser("data", help="check and generate datasets (Parquet shards + manifest)")
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    validate = commands.add_parser("validate", help="check a manifest and every shard; list every problem")
    validate.add_argument("manifest", help="manifest file (YAML or JSON), local or s3:// / gs://")
    validate.set_defaults(func=run_validate)

    synth = commands.add_parser("synth", help="write the synthetic linear-generative-model dataset (docs/method.md §4)")
    synth.add_argument("out_dir", help="output folder (local or s3:// / gs://)")
    synth.add_argument("--classes", type=int, default=SYNTH_DEFAULTS["n_classes"], help="number of classes")
    synth.add_argument("--latent-dim", type=int, default=SYNTH_DEFAULTS["latent_dim"], help="dim of the shared latent z")
    synth.add_argument("--dim-x", type=int, default=SYNTH_DEFAULTS["dim_x"], help="dim of the target modality 'image'")
    synth.add_argument("--dims-aux", type=int, nargs="+", default=list(SYNTH_DEFAULTS["dims_aux"]), help="dims of the auxiliary modalities (text, aux2, ...)")
    synth.add_argument("--n-train", type=int, default=SYNTH_DEFAULTS["n_train"], help="target train rows")
    synth.add_argument("--n-val", type=int, default=SYNTH_DEFAULTS["n_val"], help="target val rows")
    synth.add_argument("--n-test", type=int, default=SYNTH_DEFAULTS["n_test"], help="target test rows")
    synth.add_argument("--n-aux", type=int, default=SYNTH_DEFAULTS["n_aux"], help="train rows of each auxiliary modality")
    synth.add_argument("--noise-x", type=float, default=SYNTH_DEFAULTS["noise_x"], help="observation noise of the target")
    synth.add_argument("--noise-aux", type=float, default=SYNTH_DEFAULTS["noise_aux"], help="observation noise of the auxiliary modalities")
    synth.add_argument("--class-sep", type=float, default=SYNTH_DEFAULTS["class_sep"], help="scale of the class means in latent space")
    synth.add_argument("--aux-pure-noise", action="store_true", help="auxiliary modalities are pure noise (control case)")
    synth.add_argument("--kind", choices=["vector", "sequence"], default=SYNTH_DEFAULTS["kind"], help="row kind")
    synth.add_argument("--seq-len", type=int, nargs=2, default=list(SYNTH_DEFAULTS["seq_len"]), metavar=("MIN", "MAX"), help="sequence length range")
    synth.add_argument("--rows-per-shard", type=int, default=SYNTH_DEFAULTS["rows_per_shard"], help="rows per Parquet shard")
    synth.add_argument("--seed", type=int, default=SYNTH_DEFAULTS["seed"], help="seed; the same seed writes byte-identical shards")
    synth.set_defaults(func=run_synth)


def format_summary(summary: dict) -> str:
    """A readable table of shards, rows and per-class counts per modality and split."""
    classes = summary["classes"]
    lines = [f"dataset {summary['name']}: {len(classes)} classes, target {summary['target']}"]
    lines.append(f"{'modality':<12}{'split':<7}{'kind':<10}{'dim':>6}{'shards':>8}{'rows':>9}{'unlabeled':>11}  per class")
    for modality, spec in summary["modalities"].items():
        for split, counts in spec["splits"].items():
            per_class = " ".join(str(counts["per_class"][name]) for name in classes)
            lines.append(
                f"{modality:<12}{split:<7}{spec['kind']:<10}{spec['dim']:>6}{counts['shards']:>8}{counts['rows']:>9}"
                f"{counts['unlabeled']:>11}  {per_class}"
            )
    return "\n".join(lines)


def run_validate(args) -> int:
    """Print the dataset summary and OK, or raise DataError listing every problem (exit 2)."""
    from uml_ray.data.validate import require_valid_manifest, summarize_manifest

    manifest = require_valid_manifest(args.manifest)
    print(format_summary(summarize_manifest(manifest)))
    print("OK")
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
        kind=args.kind,
        seq_len=tuple(args.seq_len),
        rows_per_shard=args.rows_per_shard,
        seed=args.seed,
    )
    print(path)
    return 0
