"""``uml-ray train``, ``uml-ray tune`` and ``uml-ray validate``: the run plan, then the driver."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    """Add the train, tune and validate commands."""
    train = subparsers.add_parser("train", help="train one UML run (Ray Train workers, tracked in MLflow)")
    train.add_argument("config", help="run config YAML")
    train.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 train.alpha.text=0.5"
    )
    train.add_argument("--name", default="", help="run name (default: tracking.run_name or a timestamp)")
    train.add_argument(
        "--resume", action="store_true", help="continue the run --name from its latest checkpoint"
    )
    train.add_argument(
        "--verbose", action="store_true", help="Tune's status table and Ray Data's progress on the console"
    )
    train.set_defaults(func=run_train)

    tune = subparsers.add_parser(
        "tune", help="search hyperparameters with Ray Tune + Optuna (TPE / random / grid) + ASHA"
    )
    tune.add_argument("config", help="base run config YAML")
    tune.add_argument("overrides", nargs="*", help="dotted overrides of the base config")
    tune.add_argument("--space", required=True, help="search-space YAML (see search_spaces/)")
    tune.add_argument(
        "--trials", type=int, default=10, help="number of trials (a grid runs every point once instead)"
    )
    tune.add_argument("--concurrency", type=int, default=0, help="max concurrent trials (default: what fits)")
    tune.add_argument("--name", default="", help="sweep name (default: tracking.run_name or a timestamp)")
    tune.add_argument(
        "--resume", action="store_true", help="continue the sweep --name after the driver stopped"
    )
    tune.add_argument(
        "--fuse",
        type=int,
        default=0,
        help="configs trained together per fused trial (one batched model); 0 = 16 for head-only "
        "supervised sweeps, 1 = one config per trial",
    )
    tune.add_argument(
        "--warm-start",
        action="append",
        default=[],
        metavar="EXPERIMENT[:SWEEP]",
        help="learn from the finished trials of an MLflow experiment (or one sweep of it) in tracking.uri "
        "(repeatable): on the same task (same data, same config outside the space) they are told to TPE "
        "as completed and never trained again; on another task (seed, shots, manifest) its top "
        "--warm-start-top configs are tried first. Not with a grid",
    )
    tune.add_argument(
        "--warm-start-top",
        type=int,
        default=8,
        metavar="K",
        help="configs a transferred --warm-start source puts first (its best K; default 8)",
    )
    tune.add_argument(
        "--verbose", action="store_true", help="Tune's status table and Ray Data's progress on the console"
    )
    tune.set_defaults(func=run_tune)

    validate = subparsers.add_parser("validate", help="check config, data and tracking; train nothing")
    validate.add_argument("config", help="run config YAML")
    validate.add_argument("overrides", nargs="*", help="dotted overrides")
    validate.add_argument("--space", help="also check this search space against the config")
    validate.set_defaults(func=run_validate)


def _check_resume(args) -> None:
    from uml_ray.errors import ConfigError
    from uml_ray.tracking.runs import check_run_name

    if args.name:  # before anything touches the tracking store
        check_run_name(args.name)
    if args.resume and not args.name:
        raise ConfigError(
            "--resume needs --name: the name of the run or sweep to continue (see tracking.storage_path)"
        )


def run_train(args) -> int:
    """Train once through the same driver as a sweep (a single Tune trial)."""
    from uml_ray.config import load_config
    from uml_ray.driver import sweep
    from uml_ray.driver.plan import build_plan

    _check_resume(args)
    plan = build_plan(load_config(args.config, args.overrides))
    outcome = sweep.run(plan, resume=args.resume, name=args.name, verbose=args.verbose)
    outcome.raise_for_failures()
    metrics = outcome.best_metrics
    shown = {k: metrics.get(k) for k in ("best_val_acc", "test_acc", "best_step", "step", "stopped_early")}
    print(json.dumps({"run": outcome.name, "path": outcome.path, **shown}))
    return 0


def run_tune(args) -> int:
    """Check everything, then run the sweep; prints the best trial (and fails if any trial failed)."""
    from uml_ray.config import load_config
    from uml_ray.driver import sweep
    from uml_ray.driver.plan import build_plan
    from uml_ray.errors import ConfigError
    from uml_ray.search.space import load_space

    if args.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {args.trials}")
    if args.fuse < 0:
        raise ConfigError(f"--fuse must be >= 0 (0 = automatic, 1 = no fusion), got {args.fuse}")
    if args.concurrency < 0:
        raise ConfigError(
            f"--concurrency must be >= 0 (0 = as many trials as the cluster fits), got {args.concurrency}"
        )
    _check_resume(args)
    space = load_space(args.space)
    plan = build_plan(load_config(args.config, args.overrides), space)
    warm = None
    if args.warm_start and args.resume:
        print("[uml-ray] --warm-start: a resumed sweep keeps the warm start it began with", flush=True)
    elif args.warm_start:
        from uml_ray.driver.warm_start import prepare_warm_start

        warm = prepare_warm_start(plan, space, args.warm_start, args.warm_start_top)
        print(warm.line(), flush=True)
    outcome = sweep.run(
        plan,
        space,
        trials=args.trials,
        concurrency=args.concurrency,
        resume=args.resume,
        name=args.name,
        verbose=args.verbose,
        fuse=args.fuse,
        warm=warm,
    )
    if outcome.already_finished:  # said in one line by the driver
        return 0
    metric = space.metric
    print(
        json.dumps(
            {
                "sweep": outcome.name,
                "path": outcome.path,
                "trials": len(outcome.results) + len(outcome.failures),
                "best_config": outcome.best_config,
                metric: outcome.best_metrics.get(metric),
                "best_val_acc": outcome.best_metrics.get("best_val_acc"),
                "test_acc": outcome.best_metrics.get("test_acc"),
            },
            default=str,
        )
    )
    outcome.raise_for_failures()
    return 0


def run_validate(args) -> int:
    """Build and check every component a run needs (config, data, search space, tracking), no training."""
    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan
    from uml_ray.search.space import load_space
    from uml_ray.uri import redact

    space = load_space(args.space) if args.space else None
    plan = build_plan(load_config(args.config, args.overrides), space)
    rows = {name: spec.rows for name, spec in plan.streams.items()}
    print(
        json.dumps(
            {
                "ok": True,
                "target": plan.dataset.target,
                "auxiliary": list(plan.dataset.auxiliary),
                "rows": rows,
                "tracking": redact(plan.cfg.tracking.uri),
            }
        )
    )
    return 0
