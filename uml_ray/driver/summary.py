"""A finished run or sweep, summed up: the best trial, failures told apart, the study summary and plots.

The study summary and plots go on the parent run; the params' importances come from Optuna.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from uml_ray.driver.bridge import FATAL_KEY, MEMBERS, TRACEBACK_KEY, USER_ERROR_KEY, member_id
from uml_ray.errors import TrialCrash, UserError
from uml_ray.search.space import SearchSpace
from uml_ray.selection import rankable, selection_key, separation, separation_line
from uml_ray.train.plan import RunPlan
from uml_ray.train.state import DIVERGED_KEY, DIVERGED_LOSS_KEY, DIVERGED_STEP_KEY
from uml_ray.uri import is_remote, join_uri


@dataclass
class Failure:
    """A failed trial: its id, the error, whether it is the user's (bad config/data), its traceback file."""

    trial_id: str
    error: str
    user_error: bool
    traceback_path: str = ""


@dataclass
class RunOutcome:
    """What a finished run or sweep produced."""

    name: str
    path: str
    best_config: dict
    best_metrics: dict
    results: list[dict]
    failures: list[Failure] = field(default_factory=list)
    already_finished: bool = False  # a --resume of a sweep that had ended: nothing ran, nothing recorded
    refit: dict = field(default_factory=dict)  # k-fold selection: the chosen config retrained on the pool

    def raise_for_failures(self) -> None:
        """Exit non-zero when a trial failed: 2 when every failure is the user's, else 1 (a crash)."""
        if not self.failures:
            return
        lines = [
            f"trial {f.trial_id}: {f.error}"
            + (f" (traceback: {f.traceback_path})" if f.traceback_path else "")
            for f in self.failures
        ]
        total = len(self.results) + len(self.failures)
        message = f"{len(self.failures)} of {total} trial(s) of '{self.name}' failed: " + "; ".join(lines)
        if all(f.user_error for f in self.failures):
            raise UserError(message)
        raise TrialCrash(message)


def _failures(results, path: str) -> list[Failure]:
    failures = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or os.path.basename(str(result.path))
        if metrics.get(FATAL_KEY):
            saved = ""
            if not is_remote(path):
                saved = join_uri(path, "errors", f"{trial_id}.txt")
                Path(saved).parent.mkdir(parents=True, exist_ok=True)
                Path(saved).write_text(metrics.get(TRACEBACK_KEY, ""))
            failures.append(Failure(trial_id, metrics[FATAL_KEY], bool(metrics.get(USER_ERROR_KEY)), saved))
        elif result.error:
            error_file = os.path.join(str(result.path), "error.txt")
            failures.append(
                Failure(
                    trial_id,
                    str(result.error).strip().splitlines()[-1][:500],
                    False,
                    error_file if os.path.exists(error_file) else "",
                )
            )
    return failures


def divergence_error(name: str, diverged: list[dict], single_run: bool) -> UserError:
    """No run of ``name`` to score, and these (``diverged``: their rows) diverged: one line naming each
    step and loss, and the fix. A user error (exit 2): what the user changes is the config."""
    where = []
    for row in diverged:
        step, loss = row["metrics"].get(DIVERGED_STEP_KEY), float(row["metrics"].get(DIVERGED_LOSS_KEY))
        where.append(f"at step {step} (loss {loss:.4g})")
    if single_run:
        return UserError(f"run '{name}' diverged {where[0]}; lower train.lr")
    trials = ", ".join(f"trial {row['trial_id']} {at}" for row, at in zip(diverged, where))
    return UserError(
        f"no trial of '{name}' could be scored: {trials} diverged; lower train.lr or its range in the space"
    )


def best_row(scored: list[dict], metric: str) -> dict:
    """The selected trial among rows that reported ``metric``: like `uml-ray best`, completed trials
    only (ASHA-pruned ones never reached their best-val point), ranked by ``selection_key`` (the
    metric, then best val accuracy, then the lower val loss at the best-val point)."""
    finalists = [r for r in scored if r["metrics"].get("completed")] or scored
    return max(finalists, key=lambda r: selection_key(r["metrics"], metric))


def summarize(results, plan: RunPlan, name: str, path: str, space: SearchSpace | None) -> RunOutcome:
    """Best result, study summary and plots onto the parent run; the outcome for the CLI."""
    from uml_ray.search.report import sweep_plots
    from uml_ray.tracking.loggers import SweepTracker

    cfg = plan.cfg
    failures = _failures(results, path)
    rows = []
    for result in results:
        if result.metrics is None or result.metrics.get(FATAL_KEY):
            continue
        if MEMBERS in result.config:  # a fused trial: one row per member, as if each had been its own trial
            for k, member in enumerate(result.metrics.get(MEMBERS) or []):
                rows.append(
                    {
                        "trial_id": member_id(result.metrics.get("trial_id"), k),
                        "config": result.config[MEMBERS][k],
                        "metrics": dict(member),
                        "error": "",
                    }
                )
            continue
        rows.append(
            {
                "trial_id": result.metrics.get("trial_id"),
                "config": result.config,
                "metrics": dict(result.metrics),
                "error": str(result.error) if result.error else "",
            }
        )
    metric = space.metric if space else "best_val_acc"
    # a diverged run is a trial outcome, not a failure of the sweep, but never a candidate for the best
    diverged = [r for r in rows if r["metrics"].get(DIVERGED_KEY)]
    scored = [r for r in rows if rankable(r["metrics"], metric) and not r["metrics"].get(DIVERGED_KEY)]
    if not scored:
        # trials that failed before their first report have no metrics: their errors are the story
        outcome = RunOutcome(name, path, {}, {}, rows, failures)
        outcome.raise_for_failures()
        if diverged:
            raise divergence_error(name, diverged, space is None)
        raise UserError(f"no trial of '{name}' reported {metric}")
    best = best_row(scored, metric)
    facts = separation(best["metrics"], [r["metrics"] for r in rows if r["metrics"].get("completed")])
    if space is not None:
        print(f"[uml-ray] {separation_line(facts)}", flush=True)
        tracker = SweepTracker(
            cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_location, name
        )
        tracker.start_sweep({})
        completed = sum(1 for r in rows if r["metrics"].get("completed"))
        counts = recorded_outcomes(tracker) or {
            "completed_trials": completed,
            "pruned_trials": len(rows) - completed - len(diverged),
            "diverged_trials": len(diverged),
            "failed_trials": len(failures),
            "lost_trials": 0,  # only the record knows of a killed driver's lost trials
        }
        summary = {
            "best_" + metric: selection_key(best["metrics"], metric)[0],
            "best_test_acc": best["metrics"].get("test_acc", float("nan")),
            "best_best_val_acc": best["metrics"].get("best_val_acc", float("nan")),
            "trials": sum(counts.values()),
            **counts,
        }
        if facts is not None:  # what the val split can tell apart (uml_ray.selection)
            summary.update(
                best_val_se=facts["val_se"],
                within_1se_configs=facts["within_1se"],
                tied_top_configs=facts["tied_top"],
            )
        refit = refit_best(plan, best) if cfg.train.select_folds > 1 else {}
        summary.update({f"refit_{key}": value for key, value in refit.items()})
        with tempfile.TemporaryDirectory() as folder:
            study = os.path.join(folder, "study_summary.json")
            # a sweep resumed across the upgrade may hold rows from before the selection score
            plotted = [r for r in scored if r["metrics"].get(metric) is not None]
            importances = param_importances(plotted, space, metric)
            Path(study).write_text(
                json.dumps(
                    {
                        "best_trial": best["trial_id"],
                        "best_config": best["config"],
                        "summary": summary,
                        "importances": importances,
                        "trials": rows,
                        "failures": [vars(f) for f in failures],
                    },
                    indent=2,
                    default=str,
                )
            )
            plots = sweep_plots(plotted, space, metric, importances, folder)
            tracker.end_sweep(
                summary,
                {
                    **best["config"],
                    "trial_id": best["trial_id"],
                    **({"refit_trial": best["trial_id"]} if refit else {}),
                },
                [study, *plots],
                status="FAILED" if failures else "FINISHED",
            )
        return RunOutcome(name, path, best["config"], best["metrics"], rows, failures, refit=refit)
    return RunOutcome(name, path, best["config"], best["metrics"], rows, failures)


def refit_best(plan: RunPlan, best: dict) -> dict:
    """k-fold selection: the chosen config retrained on the whole train+val pool for its best step
    count (``train/refit.py``), tested; one console line."""
    from uml_ray.driver.trial import resolve_trial
    from uml_ray.train.refit import refit

    steps = int(best["metrics"].get("best_step") or 0)
    result = refit(resolve_trial(plan, "fixed", best["trial_id"], best["config"]), steps)
    print(
        f"[uml-ray] refit: trial {best['trial_id']}'s config retrained on all {result['rows']} "
        f"train+val rows for {steps} steps: test accuracy {result['test_acc']:.4f} (its folds' mean "
        f"{best['metrics'].get('test_acc', float('nan')):.4f})",
        flush=True,
    )
    return result


def recorded_outcomes(tracker) -> dict[str, int] | None:
    """The sweep's trial counts from its child runs' recorded outcomes (the record is the truth: a
    resumed sweep's Tune results may hold a stale copy of a trial that ended before the driver was
    killed); None while MLflow's writes are held or it cannot be read (Tune's counts serve then)."""
    from uml_ray.tracking.runs import quote_value
    from uml_ray.tracking.tags import KIND_TAG, OUTCOME_TAG, SWEEP_TAG

    if tracker.outbox.holding:
        return None
    try:
        runs = tracker.client.search_runs(
            [tracker.experiment_id],
            f"tags.`{SWEEP_TAG}` = {quote_value(tracker.sweep)} and tags.`{KIND_TAG}` = 'trial'",
            max_results=10000,
        )
    except Exception:  # noqa: BLE001 - whatever MLflow raised, Tune's counts serve
        return None
    outcomes = [run.data.tags.get(OUTCOME_TAG) for run in runs]
    if not outcomes or None in outcomes:  # a run not closed yet: the record is not complete
        return None
    return {
        "completed_trials": sum(o in ("finished", "stopped_early") for o in outcomes),
        "pruned_trials": outcomes.count("pruned"),
        "diverged_trials": outcomes.count("diverged"),
        "failed_trials": outcomes.count("failed"),
        # runs of a killed driver's trials that no resume took up (tracking.loggers close_lost_trials)
        "lost_trials": outcomes.count("lost"),
    }


def param_importances(rows: list[dict], space: SearchSpace, metric: str) -> dict[str, float]:
    """fANOVA-style importances of the searched params, from Optuna, over the scored trials."""
    import optuna

    if len(rows) < 3:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {}
    for p in space.params:
        if p.type == "choice":
            distributions[p.key] = optuna.distributions.CategoricalDistribution(
                [json.dumps(v) for v in p.values]
            )
        elif p.type == "int":
            distributions[p.key] = optuna.distributions.IntDistribution(p.low, p.high, log=p.log)
        else:
            distributions[p.key] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
    study = optuna.create_study(direction="maximize")
    for row in rows:
        params = {
            k: (
                json.dumps(row["config"][k])
                if isinstance(distributions[k], optuna.distributions.CategoricalDistribution)
                else row["config"][k]
            )
            for k in distributions
            if k in row["config"]
        }
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: distributions[k] for k in params},
                value=float(row["metrics"][metric]),
            )
        )
    try:
        return {
            k: float(v)
            for k, v in optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
            ).items()
        }
    except (RuntimeError, ValueError):
        return {}
