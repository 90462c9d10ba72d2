"""``uml-ray tune``: a Ray Tune + Optuna (TPE) + ASHA sweep, every trial in MLflow."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    """Add the tune command."""
    tune = subparsers.add_parser("tune", help="search hyperparameters with Ray Tune + Optuna TPE + ASHA")
    tune.add_argument("config", help="base run config YAML")
    tune.add_argument("overrides", nargs="*", help="dotted overrides of the base config")
    tune.add_argument("--space", required=True, help="search-space YAML (see search_spaces/)")
    tune.add_argument("--trials", type=int, default=10, help="number of trials")
    tune.add_argument("--concurrency", type=int, default=0, help="max concurrent trials (default: what fits beside Ray Data)")
    tune.add_argument("--name", default="", help="sweep name (default: tracking.run_name or a timestamp)")
    tune.add_argument("--resume", action="store_true", help="continue the sweep --name after the driver stopped")
    tune.set_defaults(func=run_tune)


def run_tune(args) -> int:
    """Check everything, then run the sweep; prints the best trial."""
    from uml_ray.config import load_config
    from uml_ray.errors import ConfigError
    from uml_ray.search import tune
    from uml_ray.search.space import load_space

    if args.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {args.trials}")
    if args.resume and not args.name:
        raise ConfigError("--resume needs --name of the sweep to continue")
    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space)
    prepared = tune.prepare(cfg, space)
    outcome = tune.run(prepared, space, trials=args.trials, concurrency=args.concurrency, resume=args.resume, name=args.name)
    metric = space.metric
    print(json.dumps({"sweep": outcome.name, "path": outcome.path, "trials": len(outcome.results),
                      "best_config": outcome.best_config, metric: outcome.best_metrics.get(metric),
                      "test_acc": outcome.best_metrics.get("test_acc")}, default=str))
    return 0
