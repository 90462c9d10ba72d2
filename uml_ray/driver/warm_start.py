"""Warm start from MLflow history: earlier sweeps' finished trials told to Optuna, or tried first.

``uml-ray tune CONFIG --space S --warm-start EXPERIMENT[:SWEEP] [--warm-start-top K]`` (repeatable)
reads each source's finished trial runs (tag ``uml_ray.kind=trial``, status FINISHED, holding the
space's metric) from the sweep's ``tracking.uri`` and decides, per source:

- **same task**: every trial trained on the same data (tag ``uml_ray.data``, the dataset's
  fingerprint, ``data/identity.py``; a run from before the tag: the same ``data.manifest``) with the
  same config outside the new space (``train.seed`` included under ``seed_policy: fixed``; the
  ``tracking.*`` and ``resources.*`` fields but ``resources.num_workers``, and
  ``train.checkpoint_every``, change no result). Its trials whose values fit the new space (every
  searched key, each value within the range or among the choices) are told to Optuna as COMPLETE
  trials with their metric, and the sweep never trains them again;
- **transfer**: anything else (another split seed, shot count, manifest or seed). Its top
  ``--warm-start-top`` configs by ``selection_key`` are the sweep's first configs, clipped into the
  new ranges (ints rounded; a choice the space lacks is left to the searcher).

The ``random`` searcher learns nothing from told trials, so under it every source is transferred. A
grid runs every point once whatever came before: warm start refuses it. A source that is not there,
holds no finished trial, searched none of the space's keys, or has no trial that fits is refused
(``UserError``, exit 2) before any Ray work.

The pure API (no MLflow, no Ray), for a benchmark::

    records = [WarmRecord({"train.lr": 0.01, "train.alpha.text": 0.5}, score=0.81, source="run-a"), ...]
    plan = plan_warm_start(records, space, same_task=True, top_k=8)  # ConfigError when nothing fits
    study = optuna.create_study(direction="maximize", sampler=sampler)
    apply_warm_plan(study, plan, space_distributions(space))  # told: add_trial; enqueued: enqueue_trial

- ``WarmRecord(params, score, source, metrics={})``: one earlier config, its score on the space's
  metric, where it came from; ``metrics`` (``best_val_acc``, ``best_val_loss``) break score ties as
  ``selection_key`` does.
- ``WarmPlan(told, enqueued, skipped)``: ``told`` (params, score) pairs to add as completed trials,
  ``enqueued`` params to try first, ``skipped`` how many records did not fit (or repeated a better one).
- ``plan_warm_start(records, space, same_task, top_k) -> WarmPlan``; ``merge_plans(plans) -> WarmPlan``.
- ``space_distributions(space) -> dict``: the Optuna distributions Ray's OptunaSearch builds for it.
- ``apply_warm_plan(study, plan, distributions) -> None``.

The CLI's path is ``prepare_warm_start(plan, space, specs, top_k) -> WarmStart`` (``.plan``, the
``.sources`` recorded on the sweep's parent run, ``.line()`` for the console).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import optuna

from uml_ray.config import field_type
from uml_ray.errors import ConfigError, UserError
from uml_ray.search.space import Param, SearchSpace
from uml_ray.selection import selection_key
from uml_ray.train.plan import RunPlan

# configs a transfer source puts first when --warm-start-top is not given: half a fused trial
DEFAULT_TOP = 8
# config fields that change no trial's result: a source differing only here is the same task
NEUTRAL = ("tracking.", "resources.", "train.checkpoint_every")
NEUTRAL_KEPT = ("resources.num_workers",)  # the global batch is batch_size x workers
_MISSING = object()
# the user attribute marking a study's told trials (a resampled repeat of one is a trial of its own)
TOLD_ATTR = "uml_ray.warm_start"


@dataclass(frozen=True)
class WarmRecord:
    """One earlier config: its params, its score on the space's metric and where it came from."""

    params: dict
    score: float
    source: str
    metrics: dict = field(default_factory=dict)

    def rank(self) -> tuple:
        """Sort key, higher is better: the score, then best val accuracy, then the lower val loss."""
        return selection_key({**self.metrics, "score": self.score}, "score")


@dataclass
class WarmPlan:
    """What a warm start does to a study: trials told as completed, configs to try first."""

    told: list[tuple[dict, float]] = field(default_factory=list)
    enqueued: list[dict] = field(default_factory=list)
    skipped: int = 0


def config_key(params: dict) -> str:
    """A config's identity (the searcher's: sorted JSON)."""
    return json.dumps(params, sort_keys=True, default=str)


def fit_value(param: Param, value, clip: bool):
    """``value`` as ``param`` holds it, or None when it does not fit; ``clip``: a number is clipped
    into the range (an int rounded) instead."""
    if param.type == "choice":
        same = [c for c in param.values if isinstance(c, bool) == isinstance(value, bool) and c == value]
        return same[0] if same else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if param.type == "int":
        if not clip and not float(value).is_integer():
            return None
        value = int(round(value))
    else:
        value = float(value)
    if clip:
        return min(max(value, param.low), param.high)
    return value if param.low <= value <= param.high else None


def plan_warm_start(
    records: list[WarmRecord], space: SearchSpace, same_task: bool, top_k: int = DEFAULT_TOP
) -> WarmPlan:
    """Same task: every record that fits the space is told (best first). Otherwise the best ``top_k``
    distinct records, clipped into the space, are enqueued. ConfigError naming the sources when no
    record holds a key of the space, or none fits."""
    keys = set(space.keys())
    sources = ", ".join(sorted({r.source for r in records})) or "(no records)"
    if not any(keys & set(r.params) for r in records):
        held = sorted({k for r in records for k in r.params})
        raise ConfigError(
            f"--warm-start {sources}: its configs set none of the searched keys {sorted(keys)} "
            f"(they set {held}); nothing to learn from it"
        )
    plan, seen = WarmPlan(), set()
    for record in sorted(records, key=WarmRecord.rank, reverse=True):
        if not same_task and len(plan.enqueued) >= top_k:
            break
        fitted = {
            p.key: fit_value(p, value, clip=not same_task)
            for p in space.params
            if (value := record.params.get(p.key, _MISSING)) is not _MISSING
        }
        fitted = {key: value for key, value in fitted.items() if value is not None}
        key = config_key(fitted)
        if (len(fitted) < len(keys) if same_task else not fitted) or key in seen:
            plan.skipped += 1
            continue
        seen.add(key)
        if same_task:
            plan.told.append((fitted, float(record.score)))
        else:
            plan.enqueued.append(fitted)
    if not plan.told and not plan.enqueued:
        raise ConfigError(
            f"--warm-start {sources}: none of its {len(records)} configs fits the space {space.source} "
            "(a searched key missing, or a value outside the range or choices)"
        )
    return plan


def merge_plans(plans: list[WarmPlan]) -> WarmPlan:
    """Several sources' plans as one: a config told or enqueued once, told winning over enqueued."""
    merged = WarmPlan(skipped=sum(p.skipped for p in plans))
    told = {}
    for params, score in (pair for p in plans for pair in p.told):
        told.setdefault(config_key(params), (params, score))
    merged.told = list(told.values())
    queued = {}
    for params in (q for p in plans for q in p.enqueued):
        if config_key(params) not in told:
            queued.setdefault(config_key(params), params)
    merged.enqueued = list(queued.values())
    merged.skipped += sum(len(p.told) + len(p.enqueued) for p in plans) - len(told) - len(queued)
    return merged


def space_distributions(space: SearchSpace) -> dict:
    """The Optuna distribution of each searched key: those Ray's OptunaSearch builds from the space."""
    distributions = {}
    for p in space.params:
        if p.type == "choice":
            distributions[p.key] = optuna.distributions.CategoricalDistribution(p.values)
        elif p.type == "int":
            distributions[p.key] = optuna.distributions.IntDistribution(p.low, p.high, log=p.log)
        else:
            distributions[p.key] = optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
    return distributions


def apply_warm_plan(study: optuna.Study, plan: WarmPlan, distributions: dict) -> None:
    """Add ``plan.told`` to ``study`` as COMPLETE trials (user attribute ``TOLD_ATTR``) and enqueue
    ``plan.enqueued`` (asked first, in order)."""
    for params, score in plan.told:
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: distributions[k] for k in params},
                value=score,
                user_attrs={TOLD_ATTR: True},
            )
        )
    for params in plan.enqueued:
        study.enqueue_trial(params)


@dataclass
class WarmStart:
    """The sweep's warm start: the merged plan, and per source what was done (recorded on its run)."""

    plan: WarmPlan
    sources: list[dict]

    def params(self) -> dict:
        """The sweep's parent-run params: each source, and the totals."""
        return {
            "warm_start": self.sources,
            "warm_start.told": len(self.plan.told),
            "warm_start.enqueued": len(self.plan.enqueued),
            "warm_start.skipped": self.plan.skipped,
        }

    def line(self) -> str:
        """One console line saying what each source gave."""
        parts = []
        for s in self.sources:
            done = f"told {s['told']}" if s["mode"] == "same-task" else f"enqueued {s['enqueued']}"
            why = f" ({s['why']})" if s["why"] else ""
            counts = f"{done} of {s['trials']} finished trials, skipped {s['skipped']}"
            parts.append(f"{s['source']} {s['mode']}{why}: {counts}")
        return "[uml-ray] warm start: " + "; ".join(parts)


def parse_source(spec: str) -> tuple[str, str | None]:
    """``EXPERIMENT[:SWEEP]`` as (experiment, sweep or None); split at the last ``:``."""
    experiment, colon, sweep = spec.rpartition(":")
    if not colon:
        return spec, None
    if not experiment or not sweep:
        raise UserError(f"--warm-start {spec!r}: give EXPERIMENT or EXPERIMENT:SWEEP")
    return experiment, sweep


def typed_param(key: str, text: str):
    """A recorded (string) param value as its config field's type, or ``_MISSING``."""
    try:
        kind = field_type(key)
        if kind is bool:
            return {"True": True, "False": False}[text]
        return kind(text) if kind in (int, float, str) else _MISSING
    except (ConfigError, KeyError, ValueError):
        return _MISSING


def task_difference(run: dict, base: dict, fingerprint: str, space: SearchSpace) -> str:
    """'' when ``run`` trained the task the sweep trains (same data, same config outside the space),
    else what differs first."""
    from uml_ray.tracking.store import param_value
    from uml_ray.tracking.tags import DATA_TAG

    params, recorded = run["params"], run["tags"].get(DATA_TAG)
    if recorded and recorded != fingerprint:
        return f"data fingerprint {recorded} → {fingerprint}"
    if not recorded and params.get("data.manifest") != param_value(base["data.manifest"]):
        return f"data.manifest {params.get('data.manifest')} → {base['data.manifest']}"
    for key, value in base.items():
        neutral = key.startswith(NEUTRAL) and key not in NEUTRAL_KEPT
        if key in space.keys() or neutral or key == "data.manifest":
            continue
        if key == "train.seed" and space.seed_policy == "per_trial":
            continue
        if key in params and params[key] != param_value(value):
            return f"{key} {params[key]} → {param_value(value)}"
    return ""


def read_source(plan: RunPlan, space: SearchSpace, spec: str, fingerprint: str, top_k: int):
    """One source's (WarmPlan, record of what was done); UserError naming it when it cannot serve."""
    from uml_ray.tracking.runs import ranked_runs
    from uml_ray.tracking.tags import SAMPLED_TAG

    experiment, sweep = parse_source(spec)
    try:
        runs = ranked_runs(plan.cfg.tracking.uri, experiment, space.metric, sweep, trials_only=True)
    except UserError as exc:
        raise UserError(f"--warm-start {spec}: {exc}") from None
    searched, records = set(), []
    for run in runs:
        try:
            sampled = json.loads(run["tags"].get(SAMPLED_TAG) or "{}")
        except json.JSONDecodeError:
            sampled = {}
        searched |= set(sampled)
        filled = {k: typed_param(k, run["params"][k]) for k in space.keys() if k in run["params"]}
        params = {**{k: v for k, v in filled.items() if v is not _MISSING}, **sampled}
        metrics = {k: v for k, v in run["metrics"].items() if k in ("best_val_acc", "best_val_loss")}
        score = selection_key(run["metrics"], space.metric)[0]
        records.append(WarmRecord(params, score, spec, metrics))
    if not searched & set(space.keys()):
        raise UserError(
            f"--warm-start {spec}: its trials searched {sorted(searched)}, none of the space's keys "
            f"{space.keys()}; nothing to learn from it"
        )
    base = plan.cfg.flat()
    differences = [d for d in (task_difference(run, base, fingerprint, space) for run in runs) if d]
    why = differences[0] if differences else ""
    if space.searcher == "random":
        why = "searcher random learns nothing from told trials"
    same_task = not why
    part = plan_warm_start(records, space, same_task, top_k)  # its ConfigError names the source
    record = {
        "source": spec,
        "mode": "same-task" if same_task else "transfer",
        "why": why,
        "trials": len(runs),
        "told": len(part.told),
        "enqueued": len(part.enqueued),
        "skipped": part.skipped,
    }
    return part, record


def prepare_warm_start(plan: RunPlan, space: SearchSpace, specs: list[str], top_k: int = DEFAULT_TOP):
    """Read every source and plan the sweep's warm start, before any Ray work; UserError (exit 2)
    naming the source and why when one cannot serve."""
    from uml_ray.data.identity import dataset_fingerprint

    if space.searcher == "grid":
        raise UserError(
            f"--warm-start: {space.source} is a grid, which trains every point once whatever earlier "
            "sweeps found; use searcher: tpe (or random) to warm-start"
        )
    if top_k < 1:
        raise UserError(f"--warm-start-top must be >= 1, got {top_k}")
    fingerprint = dataset_fingerprint(plan.dataset.manifest)
    parts, sources = [], []
    for spec in dict.fromkeys(specs):  # a source named twice counts once
        part, record = read_source(plan, space, spec, fingerprint, top_k)
        parts.append(part)
        sources.append(record)
    merged = merge_plans(parts)
    size = space.size()
    if size is not None and len(merged.told) >= size:
        raise UserError(
            f"--warm-start: the sources already trained all {size} configs of {space.source}; "
            "nothing is left to search (widen the space)"
        )
    return WarmStart(merged, sources)
