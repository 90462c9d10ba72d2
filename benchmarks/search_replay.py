"""Searchers replayed on a table: the real samplers and schedulers choose, the table answers.

A table (``search_table.py``) holds every config of a discrete grid trained once for real. Each
searcher here runs its own code — uml-ray's ``CheckedSearcher`` around Ray's ``OptunaSearch`` with
the sampler ``build_sampler`` makes, fused trials halved by the training loop's ``Halving`` at
``fused_rungs``, Ray Tune's ``ASHAScheduler``, its random variant generator, Optuna's
``HyperbandPruner`` — and where a searcher would train a config, the config's recorded validation
curve is replayed instead: the scores it reports, the steps it pays (a pruned config pays up to its
rung), and at the end the test accuracy of its best-val point. Trials run one at a time (as a
sweep with ``concurrency=1``), so a replay is deterministic and equals the real sweep it stands for
(``search_efficiency.py --check``).

The ledger charges steps, and wall seconds = steps × the table's measured seconds per config-step +
its per-trial overhead for each Tune trial (none for the one-process Optuna loop). After each trial
it records what the search would return now: the completed config ranked first by
``selection_key`` (val selection score, then val accuracy, then lower val loss) and its test accuracy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from uml_ray.selection import SCORE, selection_key

# how often a uml-ray searcher may answer "nothing now" (every proposal a repeat) before the replay
# calls its space exhausted; a real sweep would keep asking
MAX_IDLE_SUGGESTIONS = 20


def config_key(params: dict) -> str:
    """A config's identity in the table: its params as sorted JSON, numbers as floats (MLflow's
    record of ``0`` and the space's ``0.0`` are one config)."""
    return json.dumps(
        {
            k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            for k, v in params.items()
        },
        sort_keys=True,
        default=str,
    )


@dataclass
class Table:
    """A case's grid, trained: one row per config (``search_table.py`` writes them)."""

    rows: list[dict]
    seconds_per_step: float
    trial_overhead_s: float
    by_key: dict = field(init=False)

    def __post_init__(self):
        self.by_key = {config_key(row["params"]): row for row in self.rows}

    @classmethod
    def from_json(cls, table: dict) -> Table:
        """The table as ``search_table.load_table`` returns it."""
        costs = table["costs"]
        return cls(table["rows"], costs["seconds_per_step"], costs["trial_overhead_s"])

    def row(self, params: dict) -> dict:
        """The trained row of a config (a config outside the grid is a bug of the replay)."""
        return self.by_key[config_key(params)]

    @property
    def validations(self) -> int:
        return max(len(row["val_steps"]) for row in self.rows)

    @property
    def grid_steps(self) -> int:
        """The exhaustive grid's compute: every config to its end."""
        return sum(row["steps"] for row in self.rows)

    @property
    def oracle(self) -> float:
        """The best test accuracy over the grid (no searcher can know it)."""
        return max(row["test_acc"] for row in self.rows)

    def selected(self, rows: list[dict] | None = None) -> dict:
        """The row the val split selects among ``rows`` (default: the whole grid)."""
        return max(rows if rows is not None else self.rows, key=lambda row: selection_key(final(row), SCORE))


def at(row: dict, validation: int) -> dict:
    """What a config reports at its ``validation``-th validation (1-based): best-so-far val accuracy,
    val loss and selection score, the step, and Tune's iteration count."""
    i = validation - 1
    return {
        SCORE: row[SCORE][i],
        "best_val_acc": row["best_val_acc"][i],
        "best_val_loss": row["best_val_loss"][i],
        "step": row["val_steps"][i],
        "training_iteration": validation,
    }


def final(row: dict) -> dict:
    """A completed config's last report."""
    return {**at(row, len(row["val_steps"])), "completed": 1, "test_acc": row["test_acc"]}


@dataclass
class Ledger:
    """Compute spent and what the search would return after each trial."""

    table: Table
    steps: int = 0
    wall_s: float = 0.0
    trials: int = 0
    completed: list = field(default_factory=list)
    events: list = field(default_factory=list)  # (steps, wall seconds, returned test acc, returned params)

    def trial(self, steps: int, completed: list[dict], tune_trial: bool = True) -> None:
        """Charge one trial's ``steps`` (+ the per-trial overhead for a Tune trial) and count its
        ``completed`` rows among the candidates."""
        self.trials += 1
        self.steps += steps
        self.wall_s += steps * self.table.seconds_per_step + (
            self.table.trial_overhead_s if tune_trial else 0.0
        )
        self.completed.extend(completed)
        if self.completed:
            best = self.table.selected(self.completed)
            self.events.append((self.steps, self.wall_s, best["test_acc"], best["params"]))

    def spent(self, budget: int) -> bool:
        return self.steps >= budget


def replay_asha(row: dict, scheduler, trial_id: str, searcher=None) -> tuple[int, dict]:
    """Replay one config under a Tune scheduler (Ray's ASHA), as Tune feeds it a trial's reports;
    returns (steps paid, last result, with ``completed`` when it ran to its end)."""
    from ray.tune.schedulers import TrialScheduler

    trial = _TuneTrial(trial_id)
    scheduler.on_trial_add(None, trial)
    validations = len(row["val_steps"])
    for v in range(1, validations + 1):
        result = at(row, v)
        if searcher is not None:
            searcher.on_trial_result(trial_id, result)
        if v == validations:
            result = final(row)
            scheduler.on_trial_complete(None, trial, result)
            return result["step"], result
        if scheduler.on_trial_result(None, trial, result) == TrialScheduler.STOP:
            scheduler.on_trial_complete(None, trial, result)
            return result["step"], {**result, "pruned": 1}
    raise AssertionError("unreachable")


@dataclass
class _TuneTrial:
    """What Tune's schedulers read of a trial: its id."""

    trial_id: str


def replay_fused(rows: list[dict], halving) -> tuple[int, list[dict]]:
    """Replay a fused trial: members validate in lockstep, and at ``halving``'s rungs the worst
    members stop (the training loop's own ``Halving.survivors``). Returns (member-steps paid, each
    member's last result)."""
    validations = max(len(row["val_steps"]) for row in rows)
    live = list(range(len(rows)))
    results: list[dict] = [{} for _ in rows]
    steps = 0
    for v in range(1, validations + 1):
        progress = [at(row, min(v, len(row["val_steps"]))) for row in rows]
        for k in live:
            results[k] = progress[k]
        done = [k for k in live if v >= len(rows[k]["val_steps"])]
        for k in done:
            results[k] = final(rows[k])
            steps += rows[k]["steps"]
        live = [k for k in live if k not in done]
        if halving is not None and live and v in halving.rungs:
            kept = halving.survivors(live, progress)
            for k in live:
                if k not in kept:
                    results[k] = {**progress[k], "pruned": 1}
                    steps += progress[k]["step"]
            live = kept
    return steps, results
