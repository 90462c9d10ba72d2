"""``uml-ray best``: the best trials read back from MLflow, the best config as a runnable YAML, and
(``--ensemble m``) the top m runs' prediction ensemble (``driver/ensemble.py``)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from uml_ray.errors import UserError
from uml_ray.selection import SCORE
from uml_ray.uri import redact_text


def register(subparsers) -> None:
    """Add the best command."""
    best = subparsers.add_parser("best", help="table of the best runs in MLflow; write the best config YAML")
    best.add_argument("--experiment", default="uml-ray", help="MLflow experiment name")
    best.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="MLflow tracking URI (local SQLite store or http(s)://server)",
    )
    best.add_argument("--sweep", default="", help="only this sweep's trials")
    best.add_argument(
        "--metric",
        default=SCORE,
        help="metric to rank by, higher is better (selection_score: val accuracy, ties to lower val loss)",
    )
    best.add_argument("--top", type=int, default=5, help="rows to show")
    best.add_argument(
        "--output", default="best_config.yaml", help="where to write the best run's config YAML"
    )
    best.add_argument(
        "--ensemble",
        type=int,
        default=None,
        metavar="M",
        help="also score the top M runs' prediction ensemble (mean softmax of their recorded best-val "
        "weights) on val and test; written beside --output, logged on the sweep's run",
    )
    best.set_defaults(func=run_best)


def run_best(args) -> int:
    """Print the top runs and write the best one's resolved config (``uml-ray train`` runs it as is)."""
    from uml_ray.driver.ensemble import check_size, evaluate, load_members, report
    from uml_ray.selection import selection_key, separation, separation_line
    from uml_ray.tracking.runs import ranked_runs
    from uml_ray.tracking.store import download_artifact

    check_output(args.output)
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    if args.ensemble is not None:
        check_size(args.ensemble)
    ranked = ranked_runs(args.tracking_uri, args.experiment, args.metric, args.sweep or None)
    ensemble, seconds = None, 0.0
    if (
        args.ensemble is not None
    ):  # every refusal (and a member that does not reproduce) before anything is printed
        started = time.perf_counter()
        where = f"sweep '{args.sweep}'" if args.sweep else f"experiment '{args.experiment}'"
        ensemble = evaluate(load_members(args.tracking_uri, ranked, args.ensemble, where), ranked)
        seconds = time.perf_counter() - started
    rows = ranked[: args.top]
    searched = sorted({k for r in rows for k in _sampled(r)})
    shown = [m for m in ("best_val_acc", "best_val_loss") if m != args.metric]
    header = ["rank", "run", args.metric, *shown, "val_se", "test_acc", *searched]
    table = [header]
    for rank, row in enumerate(rows, 1):
        sampled = _sampled(row)
        metrics = row["metrics"]
        table.append(
            [
                str(rank),
                row["run_name"],
                _number(selection_key(metrics, args.metric)[0], 6 if args.metric == SCORE else 4),
                *[_number(metrics.get(m)) for m in shown],
                _number(_standard_error(metrics)),
                _number(metrics.get("test_acc")),
                *[_short(sampled.get(k, "")) for k in searched],
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))
    print(separation_line(separation(rows[0]["metrics"], [r["metrics"] for r in ranked])))
    with tempfile.TemporaryDirectory() as folder:
        local = download_artifact(args.tracking_uri, rows[0]["run_id"], "config.yaml", folder)
        # runs recorded before configs were redacted may hold a password: never copied on
        text, folds = runnable_config(redact_text(Path(local).read_text()))
        Path(args.output).write_text(text)
    print(f"best config ({rows[0]['run_name']}) written to {args.output}")
    if folds:
        print(refit_line(args, rows[0], folds))
    if ensemble is not None:
        report(args, ranked, ensemble, _sampled, seconds)
    return 0


def runnable_config(text: str) -> tuple[str, int]:
    """The recorded config as ``uml-ray train`` runs it, and the k of a k-fold selection run (0 if none).

    A k-fold run's config trains k fold models side by side, which only a fused sweep trial does; the
    YAML written for ``uml-ray train`` trains the chosen config once on the manifest's train split
    (``train.select_folds: 0``), with the val split for its best step."""
    import yaml

    tree = yaml.safe_load(text)
    folds = int((tree.get("train") or {}).get("select_folds") or 0)
    if folds < 2:
        return text, 0
    tree["train"]["select_folds"] = 0
    header = (
        f"# chosen by {folds}-fold selection; train.select_folds set to 0 so that uml-ray train runs it\n"
        "# once on the manifest's train split (the sweep's refit on train+val is on its parent run)\n"
    )
    return header + yaml.safe_dump(tree, sort_keys=False), folds


def refit_line(args, row: dict, folds: int) -> str:
    """What the k-fold sweep of ``row`` answered: its refit's test accuracy, from the parent run."""
    from uml_ray.tracking.runs import sweep_metrics
    from uml_ray.tracking.tags import SWEEP_TAG

    sweep = row["tags"].get(SWEEP_TAG, "")
    refit = sweep_metrics(args.tracking_uri, args.experiment, sweep) if sweep else {}
    figure = (
        f"its refit on train+val ({int(refit['refit_steps'])} steps) tested at {refit['refit_test_acc']:.4f}"
        if "refit_test_acc" in refit
        else "no refit is recorded on its parent run"
    )
    return f"{folds}-fold selection (sweep '{sweep}'): {figure}; the written config has train.select_folds=0"


def check_output(path: str) -> None:
    """Refuse an output file whose folder is missing or read-only before MLflow is queried."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(
            f"--output {path}: is a folder; give a file name such as {os.path.join(path, 'best_config.yaml')}"
        )
    if not os.path.isdir(folder):
        raise UserError(f"--output {path}: folder {folder} does not exist; create it or choose another path")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--output {path}: folder {folder} is not writable; choose another path")


def _sampled(row: dict) -> dict:
    import json

    from uml_ray.tracking.tags import SAMPLED_TAG

    raw = row["tags"].get(SAMPLED_TAG)
    if raw is None:
        return {}
    return json.loads(raw)


def _standard_error(metrics: dict) -> float | None:
    from uml_ray.selection import VAL_ROWS, standard_error

    if metrics.get("best_val_acc") is None or not metrics.get(VAL_ROWS):
        return None  # recorded before val rows were
    return standard_error(metrics["best_val_acc"], metrics[VAL_ROWS])


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
