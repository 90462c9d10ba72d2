"""``uml-ray train`` and ``uml-ray validate``."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    """Add the train and validate commands."""
    train = subparsers.add_parser("train", help="train one UML run (Ray Train workers, tracked in MLflow)")
    train.add_argument("config", help="run config YAML")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 train.alpha.text=0.5")
    train.add_argument("--name", default="", help="run name (default: tracking.run_name or a timestamp)")
    train.add_argument("--resume", action="store_true", help="continue the run --name from its latest checkpoint")
    train.set_defaults(func=run_train)
    validate = subparsers.add_parser("validate", help="check config, data and tracking; train nothing")
    validate.add_argument("config", help="run config YAML")
    validate.add_argument("overrides", nargs="*", help="dotted overrides")
    validate.add_argument("--space", help="also check this search space against the config")
    validate.set_defaults(func=run_validate)


def run_train(args) -> int:
    """Train once through the same driver as a sweep (a single Tune trial)."""
    from uml_ray.config import load_config
    from uml_ray.search import tune

    cfg = load_config(args.config, args.overrides)
    prepared = tune.prepare(cfg)
    outcome = tune.run(prepared, resume=args.resume, name=args.name)
    metrics = outcome.best_metrics
    shown = {k: metrics.get(k) for k in ("best_val_acc", "test_acc", "best_step", "step", "stopped_early")}
    print(json.dumps({"run": outcome.name, "path": outcome.path, **shown}))
    return 0


def run_validate(args) -> int:
    """Build and check every component a run needs (config, data, search space, tracking), no training."""
    from uml_ray.config import load_config
    from uml_ray.search import tune
    from uml_ray.search.space import load_space

    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space) if args.space else None
    prepared = tune.prepare(cfg, space)
    rows = {name: spec["rows"] for name, spec in prepared.plan.items()}
    print(json.dumps({"ok": True, "target": prepared.dataset_info["target"], "auxiliary": prepared.dataset_info["auxiliary"],
                      "rows": rows, "tracking": prepared.cfg.tracking.uri}))
    return 0
