"""``uml-ray best --ensemble m``: the top-m runs by the selection ranking, their predictions averaged.

A few-shot val split (40 rows) cannot tell many configs apart; averaging the predictions of the
top few is the standard remedy. Nothing is trained: every member is its run's recorded best-val
weights (``checkpoint/best.pt``), rebuilt and scored on the target's val and test rows
(``train/predict.py``). Each member must reproduce its recorded ``best_val_acc`` and ``test_acc``
exactly, else the data under the manifest is not what the run was scored on and the command stops.

The result is printed beside each member's and the single best's, written to a YAML file beside
``--output``, and logged on the sweep's parent run (``ensemble{m}_val_acc``, ``ensemble{m}_test_acc``).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from uml_ray.errors import UserError

# accuracies are counts over rows computed the same way twice: equal but for float formatting
SAME = 1e-9


def check_size(m: int) -> None:
    """Refuse an ensemble of fewer than two members before anything is read."""
    if m < 2:
        raise UserError(f"--ensemble {m}: an ensemble needs at least 2 members; give --ensemble 2 or more")


def ensemble_path(output: str) -> str:
    """Where the ensemble's YAML goes: beside ``--output`` (which stays a runnable config)."""
    stem, ext = os.path.splitext(output)
    return f"{stem}.ensemble{ext or '.yaml'}"


def load_members(uri: str, ranked: list[dict], m: int, where: str) -> list:
    """The top ``m`` ranked runs' models rebuilt from their products; refused (UserError) when fewer
    than ``m`` runs finished, or a member cannot be rebuilt, or members differ in dataset."""
    import torch

    from uml_ray.tracking.runs import download_product
    from uml_ray.train.predict import Member

    if len(ranked) < m:
        fewer = f"give --ensemble {len(ranked)} or fewer, or " if len(ranked) >= 2 else ""
        raise UserError(
            f"--ensemble {m}: only {len(ranked)} finished run(s) in {where}; {fewer}run more trials"
        )
    members = []
    with tempfile.TemporaryDirectory() as folder:
        for k, run in enumerate(ranked[:m]):
            path = download_product(uri, run, os.path.join(folder, str(k)))
            try:
                product = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc:  # noqa: BLE001 - a damaged file raises many types
                raise UserError(
                    f"run {run['run_name']} ({run['run_id']}): its best-val weights are unreadable "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
                ) from None
            members.append(Member.from_product(run["run_name"], product))
    first = members[0]
    for member in members[1:]:
        if member.manifest.path != first.manifest.path or member.manifest.target != first.manifest.target:
            raise UserError(
                f"--ensemble {m}: run {member.name} was trained on {member.manifest.path}, run {first.name} "
                f"on {first.manifest.path}; an ensemble's members share one dataset: pass --sweep"
            )
    return members


def evaluate(members: list, ranked: list[dict]) -> dict:
    """Every member's and the ensemble's val and test accuracy (members: the top of ``ranked``, in
    order); each member's must equal its run's recorded ``best_val_acc`` / ``test_acc``. Returns
    {"members": [...], "val_acc", "test_acc", "probabilities": {split: ensemble probabilities},
    "labels": {split: labels}}."""
    from uml_ray.train.predict import SPLITS, accuracy, mean_probabilities, softmax

    recorded_as = {"val": "best_val_acc", "test": "test_acc"}
    runs = ranked[: len(members)]
    rows = [{"run_id": run["run_id"], "run_name": run["run_name"]} for run in runs]
    probabilities, labels, ids = {}, {}, {}
    for split in SPLITS:
        per_member = []
        for member, run, row in zip(members, runs, rows):
            split_ids, split_labels, logits = member.logits(split)
            if split not in ids:
                ids[split], labels[split] = split_ids, split_labels
            elif not np.array_equal(ids[split], split_ids):
                raise UserError(f"run {member.name}: its {split} rows are not those of run {members[0].name}")
            row[f"{split}_acc"] = acc = accuracy(logits, split_labels)
            recorded = run["metrics"].get(recorded_as[split])
            if recorded is None or abs(acc - recorded) > SAME:
                raise UserError(
                    f"run {member.name}: its recorded weights score {split} accuracy {acc:.4f} on "
                    f"{member.manifest.path}, but the run recorded {recorded_as[split]}={recorded}; the data "
                    "there is not what it was scored on (rebuilt or changed): the ensemble would mislead"
                )
            per_member.append(softmax(logits))
        probabilities[split] = mean_probabilities(per_member)
    return {
        "members": rows,
        "val_acc": accuracy(probabilities["val"], labels["val"]),
        "test_acc": accuracy(probabilities["test"], labels["test"]),
        "probabilities": probabilities,
        "labels": labels,
    }


def print_result(result: dict, m: int, seconds: float) -> None:
    """The members' accuracies (the first is the single best) and the ensemble's, one line each."""
    members = result["members"]
    width = max(len("ensemble"), *(len(r["run_name"]) for r in members))
    print(
        f"ensemble of the top {m} (mean of their softmax probabilities, recorded best-val weights; "
        f"{seconds:.1f} s):"
    )
    print(f"  {'run'.ljust(width)}  val_acc  test_acc")
    for k, row in enumerate(members):
        note = "  (the single best)" if k == 0 else ""
        print(f"  {row['run_name'].ljust(width)}  {row['val_acc']:.4f}   {row['test_acc']:.4f}{note}")
    single = members[0]
    print(
        f"  {'ensemble'.ljust(width)}  {result['val_acc']:.4f}   {result['test_acc']:.4f}"
        f"  (test {100 * (result['test_acc'] - single['test_acc']):+.1f} points vs the single best)"
    )


def section(result: dict, runs: list[dict], metric: str, sampled) -> dict:
    """The ``ensemble:`` YAML section: size, accuracies, the single best's, and every member's run
    id, name, sampled params and reproduced accuracies."""
    members = [
        {**row, "sweep": run["sweep"], "params": sampled(run)} for row, run in zip(result["members"], runs)
    ]
    return {
        "ensemble": {
            "size": len(members),
            "ranked_by": metric,
            "combination": "mean of the members' softmax probabilities",
            "val_acc": result["val_acc"],
            "test_acc": result["test_acc"],
            "single_best": {k: members[0][k] for k in ("run_id", "run_name", "val_acc", "test_acc")},
            "members": members,
        }
    }


def report(args, ranked: list[dict], result: dict, sampled, seconds: float) -> None:
    """Print an ``evaluate`` result (``seconds``: what loading and scoring took), write the YAML
    beside ``--output`` and log the accuracies on the sweep's parent run."""
    import yaml

    from uml_ray.tracking.runs import log_sweep_results

    m = args.ensemble
    runs = ranked[:m]
    print_result(result, m, seconds)
    path = ensemble_path(args.output)
    with open(path, "w") as handle:
        yaml.safe_dump(section(result, runs, args.metric, sampled), handle, sort_keys=False)
    print(f"ensemble members and accuracies written to {path}")
    sweeps = {run["sweep"] for run in runs}
    sweep = args.sweep or (sweeps.pop() if len(sweeps) == 1 else "")
    if not sweep:
        print("members come from several sweeps: the ensemble's accuracies are logged on no sweep run")
        return
    metrics = {f"ensemble{m}_val_acc": result["val_acc"], f"ensemble{m}_test_acc": result["test_acc"]}
    tags = {f"uml_ray.ensemble{m}_members": ",".join(run["run_id"] for run in runs)}
    parent = log_sweep_results(args.tracking_uri, args.experiment, sweep, metrics, tags)
    if parent is None:
        print(f"sweep {sweep} has no parent run: the ensemble's accuracies are logged on no run")
    else:
        print(f"logged {', '.join(metrics)} on sweep {sweep}'s run {parent}")
