"""``uml-ray compare`` and ``uml-ray study conversion``: questions answered over seeds, with intervals.

Both check everything (config, space, every sweep's data and name) before the first sweep, run
their val-selected searches (``uml_ray/science/searches.py``), and record one MLflow study run that
holds every sweep's parent run as a child, with the table (CSV, JSON) and a plot as artifacts.
"""

from __future__ import annotations

import json
import tempfile
import time

from uml_ray.errors import ConfigError

SEEDS_HELP = (
    "seeds (train.seed values): a count N for 0..N-1, or a comma-separated list like 3,4,5; "
    "each seed also draws its own target rows when data.target_per_class is set"
)
MANIFEST_HELP = (
    "manifest path with {seed}, one dataset per seed (e.g. a few-shot split drawn with that seed: "
    "uml-ray case fashion-mnist --split-seed S, uml-ray data synth --seed S); "
    "default: data.manifest for every seed"
)


def register(subparsers) -> None:
    """Add the compare and study commands."""
    compare = subparsers.add_parser(
        "compare",
        help="UML (alpha searched) against the unimodal baseline (alpha 0), "
        "each val-selected per seed; paired differences with intervals",
    )
    _common(compare)
    compare.add_argument(
        "--drop-modality",
        action="append",
        default=[],
        metavar="M",
        help="also search with every auxiliary modality but M (repeat for an ablation table)",
    )
    compare.set_defaults(func=run_compare)

    study = subparsers.add_parser("study", help="measurements over grids of sample counts")
    studies = study.add_subparsers(dest="study", metavar="STUDY")
    conversion = studies.add_parser(
        "conversion",
        help="what an auxiliary sample is worth in target samples: the unimodal "
        "curve over --nx, UML at a target budget over --ny",
    )
    _common(conversion)
    conversion.add_argument(
        "--nx", required=True, help="target samples per class of the unimodal curve, e.g. 1,2,4,8"
    )
    conversion.add_argument(
        "--ny", required=True, help="auxiliary samples per class for UML at the budget, e.g. 2,8,32"
    )
    conversion.add_argument(
        "--target-budget",
        type=int,
        help="target samples per class of the UML arm (one of --nx; default the smallest)",
    )
    conversion.set_defaults(func=run_conversion)


def _common(parser) -> None:
    parser.add_argument("config", help="base run config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the base config")
    parser.add_argument(
        "--space",
        required=True,
        help="search space YAML, searched in every arm and cell with the same budget",
    )
    parser.add_argument("--seeds", required=True, help=SEEDS_HELP)
    parser.add_argument(
        "--trials", type=int, default=16, help="configs per search (a grid runs every point once instead)"
    )
    parser.add_argument("--manifest-per-seed", default="", metavar="PATTERN", help=MANIFEST_HELP)
    parser.add_argument("--confidence", type=float, default=0.95, help="level of the intervals")
    parser.add_argument("--name", default="", help="study name; its sweeps are named <name>-<arm>[-<cell>]")
    parser.add_argument(
        "--fuse", type=int, default=0, help="configs per fused trial (0 = 16 for head-only supervised sweeps)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="Tune's status table and Ray Data's progress on the console"
    )


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: a count N (seeds 0..N-1) or a comma-separated list; at least 2 distinct seeds >= 0."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected a count like 3 or a list like 0,1,2") from None
    seeds = list(range(values[0])) if len(values) == 1 else values
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: seeds must be distinct integers >= 0")
    if len(seeds) < 2:
        raise ConfigError(f"--seeds {text!r}: intervals over seeds need at least 2 seeds; use e.g. --seeds 3")
    return seeds


def parse_counts(flag: str, text: str) -> list[int]:
    """A comma-separated list of distinct sample counts >= 1, sorted."""
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers like 1,2,4,8") from None
    if any(c < 1 for c in counts) or len(set(counts)) != len(counts):
        raise ConfigError(f"{flag} {text!r}: counts must be distinct integers >= 1")
    return sorted(counts)


def _check_common(args) -> tuple[list[int], dict[int, str] | None]:
    from uml_ray.tracking.runs import check_run_name
    from uml_ray.uri import absolute

    if args.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {args.trials}")
    if args.fuse < 0:
        raise ConfigError(f"--fuse must be >= 0 (0 = automatic, 1 = no fusion), got {args.fuse}")
    if not 0.5 <= args.confidence < 1:
        raise ConfigError(f"--confidence must be in [0.5, 1), got {args.confidence}")
    if args.name:
        check_run_name(args.name)
    seeds = parse_seeds(args.seeds)
    if not args.manifest_per_seed:
        return seeds, None
    pattern = args.manifest_per_seed
    if "{seed}" not in pattern:
        raise ConfigError(
            f"--manifest-per-seed {pattern!r} has no {{seed}}; e.g. work/split-{{seed}}/manifest.yaml"
        )
    try:
        return seeds, {seed: absolute(pattern.format(seed=seed)) for seed in seeds}
    except (KeyError, IndexError, ValueError):
        raise ConfigError(f"--manifest-per-seed {pattern!r}: only {{seed}} may appear in braces") from None


def _base(args, manifests):
    """The base config (the first seed's manifest), the space, and the checked base plan."""
    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan
    from uml_ray.search.space import load_space

    space = load_space(args.space)
    overrides = list(args.overrides)
    if manifests:
        overrides.append(f"data.manifest={next(iter(manifests.values()))}")
    return space, build_plan(load_config(args.config, overrides), space)


def _run_study(kind: str, name: str, plan, jobs, args, params: dict, report_of, module) -> dict:
    """Run the jobs under one MLflow study run (each sweep adopted as a child); returns the report."""
    from uml_ray.driver import progress
    from uml_ray.science.searches import check_fuse, check_names_free, run_jobs
    from uml_ray.tracking.study import StudyTracker
    from uml_ray.tracking.tags import SWEEPS_TAG

    check_names_free(jobs)
    check_fuse(jobs, args.fuse)
    started = time.monotonic()
    tracking = plan.cfg.tracking
    tracker = StudyTracker(tracking.uri, tracking.experiment, tracking.artifact_location, name)
    tracker.start_study(kind, params)
    status = "FAILED"
    try:
        selected = []
        for k, job in enumerate(jobs, 1):
            with progress.study_sweep(k, len(jobs)):
                selected += run_jobs([job], args.trials, args.fuse, args.verbose)
            tracker.adopt(job.name)
        report = report_of(selected)
        report.update(
            {"name": name, "wall_seconds": round(time.monotonic() - started, 1), "trials": args.trials}
        )
        with tempfile.TemporaryDirectory() as folder:
            artifacts = module.write_artifacts(report, folder)
            status = "FINISHED"
            tracker.end_study(
                _metrics(kind, report), {SWEEPS_TAG: json.dumps(report["sweeps"])}, artifacts, status
            )
        report["study_run_id"] = tracker.parent_id
        return report
    finally:
        if status == "FAILED":
            tracker.end_study({}, {}, [], status)


def _metrics(kind: str, report: dict) -> dict:
    """The study run's metrics: what a reader filters and sorts studies by."""
    metrics = {"wall_seconds": report["wall_seconds"]}
    if kind == "compare":
        for label, c in report["comparisons"].items():
            key = label.replace(" - ", "_minus_").replace("-", "_")
            metrics.update(
                {
                    f"{key}.mean": c["mean"],
                    f"{key}.t_low": c["t_low"],
                    f"{key}.t_high": c["t_high"],
                    f"{key}.boot_low": c["boot_low"],
                    f"{key}.boot_high": c["boot_high"],
                    f"{key}.sign_p": c["sign_p"],
                    f"{key}.wilcoxon_p": c["wilcoxon_p"],
                }
            )
        metrics.update(
            {f"{arm.replace('-', '_')}.mean_test_acc": v for arm, v in report["mean_test_acc"].items()}
        )
        return metrics
    metrics.update(
        {
            "ratio": report["ratio"],
            "ratio_low": report["ratio_interval"][0],
            "ratio_high": report["ratio_interval"][1],
        }
    )
    for n, worth, gain in zip(report["aux_counts"], report["worth"], report["gains"]):
        metrics.update({f"worth.ny{n}": worth, f"gain.ny{n}": gain})
    return metrics


def _params(plan, space, args, seeds, manifests, arms) -> dict:
    params = {"base." + k: v for k, v in plan.cfg.flat().items()}
    params.update(
        {
            "space": args.space,
            "space.searcher": space.searcher,
            "space.params": space.keys(),
            "seeds": seeds,
            "trials": args.trials,
            "confidence": args.confidence,
            "manifest_per_seed": args.manifest_per_seed or "",
            "arms": [arm.name for arm in arms],
        }
    )
    params.update({f"arm.{arm.name}.overrides": arm.overrides for arm in arms})
    params.update({f"arm.{arm.name}.space": arm.space.keys() if arm.space else [] for arm in arms})
    return params


def run_compare(args) -> int:
    """UML vs the unimodal baseline (and ablations), each val-selected per seed.

    Prints the table and a JSON line.
    """
    from uml_ray.science import compare
    from uml_ray.science.searches import check_axes_free, plan_jobs

    seeds, manifests = _check_common(args)
    space, plan = _base(args, manifests)
    check_axes_free(space, ["train.seed"])
    arms = compare.compare_arms(plan, space, args.drop_modality)
    name = args.name or plan.cfg.tracking.run_name or f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    jobs = [job for arm in arms for job in plan_jobs(plan.cfg, arm, {"train.seed": seeds}, name, manifests)]
    report = _run_study(
        "compare",
        name,
        plan,
        jobs,
        args,
        _params(plan, space, args, seeds, manifests, arms),
        lambda selected: compare.compare_report(selected, arms, seeds, args.confidence),
        compare,
    )
    for line in compare.format_report(report):
        print(line)
    main = report["comparisons"]["uml - unimodal"]
    print(
        json.dumps(
            {
                "study": name,
                "run_id": report["study_run_id"],
                "wall_seconds": report["wall_seconds"],
                "mean_test_acc": report["mean_test_acc"],
                "delta": main["mean"],
                "t_ci": [main["t_low"], main["t_high"]],
                "bootstrap_ci": [main["boot_low"], main["boot_high"]],
                "sign_p": main["sign_p"],
                "wilcoxon_p": main["wilcoxon_p"],
                "comparisons": report["comparisons"],
            }
        )
    )
    return 0


def run_conversion(args) -> int:
    """The conversion study; prints the curve, UML per auxiliary count, the ratio and a JSON line."""
    from uml_ray.science import conversion
    from uml_ray.science.searches import check_axes_free, plan_jobs

    seeds, manifests = _check_common(args)
    target_counts, aux_counts = parse_counts("--nx", args.nx), parse_counts("--ny", args.ny)
    budget = args.target_budget if args.target_budget is not None else target_counts[0]
    space, plan = _base(args, manifests)
    conversion.check_grids(plan, target_counts, budget)
    check_axes_free(space, ["train.seed", conversion.TARGET_AXIS, conversion.AUX_AXIS])
    uml, unimodal = conversion.conversion_arms(plan, space, budget)
    name = args.name or plan.cfg.tracking.run_name or f"conversion-{time.strftime('%Y%m%d-%H%M%S')}"
    conversion.check_aux_counts(plan, aux_counts, manifests)
    uml_jobs = plan_jobs(
        plan.cfg, uml, {"train.seed": seeds, conversion.AUX_AXIS: aux_counts}, name, manifests
    )
    jobs = (
        plan_jobs(
            plan.cfg, unimodal, {"train.seed": seeds, conversion.TARGET_AXIS: target_counts}, name, manifests
        )
        + uml_jobs
    )
    params = _params(plan, space, args, seeds, manifests, [uml, unimodal])
    params.update({"nx": target_counts, "ny": aux_counts, "target_budget": budget})
    report = _run_study(
        "conversion",
        name,
        plan,
        jobs,
        args,
        params,
        lambda selected: conversion.conversion_report(
            selected, seeds, target_counts, aux_counts, budget, args.confidence
        ),
        conversion,
    )
    for line in conversion.format_report(report):
        print(line)
    print(
        json.dumps(
            {
                "study": name,
                "run_id": report["study_run_id"],
                "wall_seconds": report["wall_seconds"],
                "ratio": report["ratio"],
                "ratio_interval": report["ratio_interval"],
                "worth": report["worth"],
                "gains": report["gains"],
                "curve": report["curve"],
                "uml_mean": report["uml_mean"],
            }
        )
    )
    return 0
