"""The one training loop every regime runs: restore → step → validate → keep the best → report → test.

``run_loop`` owns what the regimes share, once: resume from a checkpoint, the validation gate
(every ``train.val_every`` steps and at the last), best-val weights and patience, the checkpoint
cadence (every ``train.checkpoint_every`` validations and at the end), the test at the best-val
point, and closing every stream however the loop is left. A regime (``loop.Supervised`` for
head-only and fine-tuning, ``sequence_loop.Sequence``, ``fused_loop.Fused``) supplies what
differs: its model, one step, its val and test evaluations, what its checkpoints hold.

The loop counts *members*, the models a regime trains at once: one-model regimes have one; a
fused trial has K, each validated, stopped, tested and (with ``Halving``) pruned on its own.

A member *diverges* (``train/state.py``: ``diverges``) when its loss goes non-finite or explodes: it
ends there, untested, recorded ``diverged``; a fused trial's other members go on.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from uml_ray.data.streams import BatchStream
from uml_ray.selection import SCORE, VAL_ROWS, selection_score
from uml_ray.train.checkpoints import BEST
from uml_ray.train.plan import RunPlan
from uml_ray.train.state import (
    DIVERGED_KEY,
    DIVERGED_LOSS_KEY,
    DIVERGED_STEP_KEY,
    diverges,
    new_progress,
    rng_state,
    set_rng_state,
)
from uml_ray.uri import redact_values


@dataclass
class Book:
    """Where a run stands: the step, the validations so far, the members still training (by index)
    and, per member, its progress, best-val weights and latest metrics."""

    step: int
    validations: int
    live: list[int]
    progress: list[dict]
    best_weights: list[dict]
    results: list[dict]
    pruned: set[int] = field(default_factory=set)

    @classmethod
    def fresh(cls, weights: list[dict]) -> Book:
        """A run at step 0; every member live, its initial weights its best so far."""
        members = range(len(weights))
        return cls(0, 0, list(members), [new_progress() for _ in members], weights, [{} for _ in members])


class OneModel:
    """How a one-model regime lays out its checkpoints and reports: the model's own progress, best
    weights and metrics, unwrapped."""

    @staticmethod
    def pack(book: Book) -> dict:
        """The book's part of the loop state (the member's progress carries step and validations); its
        best weights are the product's, written once beside it."""
        return {"progress": dict(book.progress[0])}

    @staticmethod
    def unpack(state: dict) -> Book:
        """The book of a loop state ``pack`` wrote (``BEST``: the product beside it)."""
        progress = state["progress"]
        live = [0]  # Tune resumes unfinished trials only: the model is still training
        # a checkpoint written before the product held the only copy kept them in the loop state
        best = state["best_weights"] if "best_weights" in state else state[BEST]["model"]
        return Book(progress["step"], progress["validations"], live, [progress], [best], [{}])

    @staticmethod
    def summary(book: Book) -> dict:
        """The metrics reported: the model's own."""
        return book.results[0]

    @staticmethod
    def products(products: list[dict]) -> dict:
        """The best-val product written beside the loop state."""
        return products[0]


class Members:
    """How a fused trial lays out its checkpoints and reports: every member's book and metrics, and
    which members are live or pruned."""

    @staticmethod
    def pack(book: Book) -> dict:
        """The book as a loop state; the members' best weights are their products', written once beside it."""
        return {
            "live": list(book.live),
            "pruned": sorted(book.pruned),
            "step": book.step,
            "validations": book.validations,
            "progress": copy.deepcopy(book.progress),
            "results": copy.deepcopy(book.results),
        }

    @staticmethod
    def unpack(state: dict) -> Book:
        """The book of a loop state ``pack`` wrote (``BEST``: the products beside it)."""
        if "best_weights" in state:  # written before the products held the only copy
            best = state["best_weights"]
        else:
            products = state[BEST]["members"]
            best = [products[k]["model"] for k in range(len(state["progress"]))]
        return Book(
            state["step"],
            state["validations"],
            state["live"],
            state["progress"],
            best,
            state["results"],
            set(state["pruned"]),
        )

    @staticmethod
    def summary(book: Book) -> dict:
        """The metrics reported: the step, the best val accuracy over members, the live count, and
        every member's latest metrics (a finished or pruned member's are final)."""
        return {
            "step": book.step,
            "best_val_acc": max(p["best_val_acc"] for p in book.progress),
            SCORE: max(r.get(SCORE, r.get("best_val_acc", -1.0)) for r in book.results),
            "live": len(book.live),
            "members": [dict(r) for r in book.results],
        }

    @staticmethod
    def products(products: list[dict]) -> dict:
        """Every member's best-val product, by member index."""
        return {"members": dict(enumerate(products))}


class Regime(Protocol):
    """What a regime gives ``run_loop``. Positions index the live members, in the book's order."""

    configs: list  # one Config per member: its patience, and the config stored with its weights
    streams: dict[str, BatchStream]  # the train streams, whose positions checkpoints carry
    layout: type[OneModel] | type[Members]

    def initialise(self) -> None:
        """Initialisation only a fresh run does (a resumed one restores its outcome)."""

    def step(self, step: int) -> None:
        """Optimizer step number ``step`` (from 0), its train losses kept for ``train_metrics``."""

    def validate(self) -> tuple[list[float], list[float]]:
        """Val accuracy and val loss of every live member."""

    def train_metrics(self, step: int) -> list[dict]:
        """Per live member: lr and mean train losses since the last validation (then forgotten),
        with the regime's own extras."""

    def weights(self, position: int) -> dict:
        """A copy of one live member's weights."""

    def test(self, positions: list[int], weights: list[dict]) -> list[dict]:
        """Test metrics of the members at ``positions`` with ``weights`` (their best-val point)."""

    def select(self, positions: list[int]) -> None:
        """Train only the members at ``positions`` from now on."""

    def state_dict(self) -> dict:
        """Model and optimizer state (and what else a resume checks) for the loop state."""

    def load_state_dict(self, state: dict) -> None:
        """Put back what ``state_dict`` saved."""


@dataclass(frozen=True)
class Halving:
    """Successive halving inside a fused trial: after the validations numbered in ``rungs``, the
    best ``ceil(len(remaining) / reduction_factor)`` members stay."""

    rungs: list[int]
    reduction_factor: int = 2

    def survivors(self, remaining: list[int], progress: list[dict]) -> list[int]:
        """The members kept, in their current order: best val accuracy first, ties to lower best val
        loss, then lower member index."""
        keep = math.ceil(len(remaining) / self.reduction_factor)
        ranked = sorted(
            remaining, key=lambda k: (-progress[k]["best_val_acc"], progress[k]["best_val_loss"], k)
        )
        kept = set(ranked[:keep])
        return [k for k in remaining if k in kept]


def record_validation(
    progress: dict, acc: float, loss: float, weights: Callable[[], dict], best: dict, patience: int
) -> tuple[dict, bool]:
    """Count one validation; a better one (higher accuracy, ties to lower loss) makes ``weights()``
    the best. Returns (best weights, stop: ``patience`` validations in a row without gain)."""
    progress["validations"] += 1
    if acc > progress["best_val_acc"] or (
        acc == progress["best_val_acc"] and loss < progress["best_val_loss"]
    ):
        progress.update(best_val_acc=acc, best_val_loss=loss, best_step=progress["step"], bad_validations=0)
        best = weights()
    else:
        progress["bad_validations"] += 1
    return best, patience > 0 and progress["bad_validations"] >= patience


def run_loop(
    plan: RunPlan,
    ctx,
    start: Callable[[contextlib.ExitStack], Regime],
    halving: Halving | None = None,
) -> dict:
    """Train the regime ``start(closing)`` builds for ``train.max_steps`` steps, or until no member
    is left; returns the last metrics reported. Streams registered on ``closing`` are closed when
    the loop is left, also on an error or an interrupt: an open Ray Data read-ahead outlives its
    run otherwise."""
    train = plan.cfg.train
    val_rows = plan.streams[f"{plan.dataset.target}.val"].rows
    metrics: dict = {}
    with contextlib.ExitStack() as closing:
        state = ctx.restore()
        regime = start(closing)
        # the rows a val accuracy is over: k-fold selection pools its held-out folds
        val_rows = getattr(regime, "val_rows", val_rows)
        if state is None:
            regime.initialise()
            book = Book.fresh([regime.weights(k) for k in range(len(regime.configs))])
        else:
            regime.load_state_dict(state)
            for name, position in state["streams"].items():
                regime.streams[name].load_state_dict(position)
            set_rng_state(state["rng"])
            book = regime.layout.unpack(state)

        while book.step < train.max_steps and book.live:
            regime.step(book.step)
            book.step += 1
            last = book.step == train.max_steps
            if book.step % train.val_every and not last:
                continue

            book.validations += 1
            # the train losses first: a diverged model's validation may fail outright (the sequence
            # probe's solver refuses non-finite features), so it is skipped when nothing else is live
            trained = regime.train_metrics(book.step)
            # every worker decides alike (a worker leaving the loop alone would hang the others'
            # collectives): on the mean of the workers' train losses, each a mean over as many steps
            losses = [
                sum(each) / len(each) for each in zip(*ctx.all_gather([m["train_loss"] for m in trained]))
            ]
            diverged: dict[int, float] = {}  # member -> the loss that diverged
            for position, k in enumerate(book.live):
                loss, progress = losses[position], book.progress[k]
                if progress.get("first_train_loss") is None and math.isfinite(loss):
                    progress["first_train_loss"] = loss
                if diverges(loss, progress.get("first_train_loss")):
                    diverged[k] = loss
            if len(diverged) < len(book.live):
                val_acc, val_loss = regime.validate()
            else:
                val_acc = val_loss = [math.nan] * len(book.live)
            for position, k in enumerate(book.live):
                if k not in diverged and not math.isfinite(val_loss[position]):
                    diverged[k] = val_loss[position]
            finished, stopped = [], set()
            for position, k in enumerate(book.live):
                progress = book.progress[k]
                progress["step"] = book.step
                stop = False
                if k not in diverged:  # a diverged validation is never the best
                    book.best_weights[k], stop = record_validation(
                        progress,
                        val_acc[position],
                        val_loss[position],
                        lambda position=position: regime.weights(position),
                        book.best_weights[k],
                        regime.configs[k].train.patience,
                    )
                book.results[k] = {
                    "step": book.step,
                    **trained[position],
                    "val_acc": val_acc[position],
                    "val_loss": val_loss[position],
                    "best_val_acc": progress["best_val_acc"],
                    "best_val_loss": progress["best_val_loss"],
                    "best_step": progress["best_step"],
                    SCORE: selection_score(progress["best_val_acc"], progress["best_val_loss"], val_rows),
                    VAL_ROWS: val_rows,
                }
                if k in diverged:  # ended here, untested: its weights are past saving
                    book.results[k].update(
                        {DIVERGED_KEY: 1, DIVERGED_STEP_KEY: book.step, DIVERGED_LOSS_KEY: diverged[k]}
                    )
                elif stop or last:
                    finished.append(k)
                    if stop:
                        stopped.add(k)
            if finished:
                # the score is each member's best-val point, not its last step (a reference defect)
                tests = regime.test(
                    [book.live.index(k) for k in finished], [book.best_weights[k] for k in finished]
                )
                for k, test in zip(finished, tests):
                    book.results[k].update(test, stopped_early=int(k in stopped), completed=1)

            remaining = [k for k in book.live if k not in finished and k not in diverged]
            if halving is not None and remaining and book.validations in halving.rungs:
                survivors = halving.survivors(remaining, book.progress)
                for k in remaining:
                    if k not in survivors:
                        book.results[k]["pruned"] = 1
                        book.pruned.add(k)
                remaining = survivors
            if remaining != book.live:  # a finished, diverged or pruned member's compute is freed
                regime.select([book.live.index(k) for k in remaining])
                book.live = remaining

            metrics = regime.layout.summary(book)
            # a checkpoint every train.checkpoint_every validations, and at the end (nothing live)
            if book.live and book.validations % train.checkpoint_every:
                ctx.report(metrics)
                continue
            loop_state = {
                **regime.state_dict(),
                "streams": {name: s.state_dict() for name, s in regime.streams.items()},
                **regime.layout.pack(book),
                "rng": rng_state(),
                "config": redact_values(plan.cfg.to_dict()),  # a snapshot, never read back: no secrets
            }
            dataset = plan.dataset.summary()
            products = [
                {
                    "model": book.best_weights[k],
                    "config": redact_values(cfg.to_dict()),
                    "dataset": dataset,
                    "val_acc": book.progress[k]["best_val_acc"],
                    "step": book.progress[k]["best_step"],
                }
                for k, cfg in enumerate(regime.configs)
            ]
            ctx.report(metrics, loop_state, regime.layout.products(products))
    return metrics
