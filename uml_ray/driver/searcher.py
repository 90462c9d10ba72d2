"""Which configs the trials get: the space in Tune's terms, the checked Optuna searcher, a grid's points.

Every sampled config is checked before it trains (``CheckedSearcher``): an invalid combination
is told to the searcher as failed and resampled, and no config is trained twice. The one module
of ours that builds an Optuna sampler.
"""

from __future__ import annotations

import itertools
import json
import pickle
import types

import optuna
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from uml_ray.driver.bridge import FATAL_KEY, MEMBERS
from uml_ray.driver.trial import check_sample
from uml_ray.driver.tune_state import snapshot_trials
from uml_ray.driver.warm_start import WarmPlan, apply_warm_plan
from uml_ray.errors import ConfigError
from uml_ray.search.space import SearchSpace
from uml_ray.train.fused_loop import fusion_key
from uml_ray.train.plan import RunPlan
from uml_ray.train.state import DIVERGED_KEY

# how often a searcher may propose an invalid or already-trained config before a trial is spent on it
MAX_RESAMPLES = 50
# TPE's random start: configs sampled at random before TPE models the results
TPE_STARTUP_TRIALS = 10
# the Optuna study's name inside OptunaSearch (its own default)
STUDY = "optuna"


def tune_space(space: SearchSpace) -> dict:
    """The space as Tune's param space: every grid point (× seeds), or one distribution per param."""
    if space.searcher == "grid":
        grid = {p.key: tune.grid_search(p.values) for p in space.params}
        if space.seeds:
            grid["train.seed"] = tune.grid_search(list(space.seeds))
        return grid
    out = {}
    for p in space.params:
        if p.type == "choice":
            out[p.key] = tune.choice(p.values)
        elif p.type == "int":
            out[p.key] = tune.lograndint(p.low, p.high + 1) if p.log else tune.randint(p.low, p.high + 1)
        else:
            out[p.key] = tune.loguniform(p.low, p.high) if p.log else tune.uniform(p.low, p.high)
    return out


def fusion_group(plan: RunPlan, params: dict) -> tuple:
    """What configs must share to train in one fused trial (their structural settings)."""
    return fusion_key(plan.with_params(params).cfg.flat(), plan.dataset)


def grid_members(space: SearchSpace, plan: RunPlan, fuse: int) -> list[list[dict]]:
    """A grid's points (× its seeds), each checked, grouped into fused trials of at most ``fuse`` members."""
    keys = [p.key for p in space.params] + (["train.seed"] if space.seeds else [])
    values = [p.values for p in space.params] + ([list(space.seeds)] if space.seeds else [])
    groups: dict = {}
    for combination in itertools.product(*values):
        point = dict(zip(keys, combination))
        check_sample(plan, "fixed", point)
        groups.setdefault(fusion_group(plan, point), []).append(point)
    return [members[i : i + fuse] for members in groups.values() for i in range(0, len(members), fuse)]


def build_sampler(searcher: str, seed: int) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for ``searcher`` (``tpe`` or ``random``), seeded.

    TPE's options are set here rather than left to Optuna's defaults, which changed between
    majors (Optuna 5 made ``multivariate`` and ``constant_liar`` true): a seeded sweep samples
    what it sampled before an upgrade within the range pyproject.toml pins. TPE's remaining
    options (``consider_prior``, ``prior_weight``, ``consider_magic_clip``, ``consider_endpoints``,
    ``gamma``, ``weights``) are deprecated in Optuna 5, warn when set, and keep their defaults
    until Optuna 6, which the pin excludes.
    """
    if searcher == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed,
        n_startup_trials=TPE_STARTUP_TRIALS,
        n_ei_candidates=24,
        multivariate=True,  # one model of the params' joint density, not one per param
        group=False,  # our spaces are flat: every param is sampled in every trial
        # concurrent trials: a running trial counts as a bad result, so TPE does not propose the
        # same region to every free slot
        constant_liar=True,
    )


def build_searcher(
    space: SearchSpace,
    plan: RunPlan,
    seed_policy: str,
    trials: int,
    fuse: int,
    concurrency: int,
    warm: WarmPlan | None = None,
) -> CheckedSearcher | None:
    """TPE or random sampling through Optuna, checked, de-duplicated and grouped into fused trials;
    None for a grid. ``warm`` (``driver/warm_start.py``): trials the study holds as completed before
    the first suggestion, and configs it hands out first."""
    if space.searcher == "grid":
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = build_sampler(space.searcher, plan.cfg.train.seed)
    storage, told = None, {}
    if warm is not None:
        # the study OptunaSearch loads by name when Tune sets its space: the warm start is in it from
        # the first ask, and pickled with the searcher (a resumed sweep restores it, never tells again)
        storage = optuna.storages.InMemoryStorage()
        study = optuna.create_study(storage=storage, study_name=STUDY, sampler=sampler, direction="maximize")
        apply_warm_plan(study, warm, OptunaSearch.convert_search_space(tune_space(space)))
        told = {_config_key(params): {space.metric: score} for params, score in warm.told}
    inner = OptunaSearch(sampler=sampler, metric=space.metric, mode="max", storage=storage, study_name=STUDY)
    size = space.size()
    limit = min(trials, size - len(told)) if size is not None else trials
    return CheckedSearcher(inner, plan, seed_policy, space.metric, limit, fuse, concurrency, told)


def _config_key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


class CheckedSearcher(Searcher):
    """A Tune ``Searcher`` around ``inner`` that never hands out an invalid or repeated config.

    A config the run plan refuses (``check_sample``: ConfigError) is told to the inner searcher as
    failed, and it is asked again. A repeat of a config already handed out is told the first one's
    result (or failure) and asked again; so is one of the configs ``told`` (a warm start's trials,
    trained by an earlier sweep on the same task). After ``limit`` distinct configs (the sweep's
    budget, or a finite space's size less the told configs), the search is finished.

    With ``fuse`` > 1 a trial gets ``{"members": [config, ...]}``: up to ``fuse`` suggestions that
    share their ``fusion_group``, and the inner searcher is told every member's own result — TPE
    learns from each config, not one per trial.

    It also limits the sweep to ``max_concurrent`` live trials (0: no limit), in place of Tune's
    ``ConcurrencyLimiter``, so that a restored sweep can be reconciled with Tune's snapshot: a
    driver killed mid-sweep can leave searcher state newer than Tune's trial table, holding a trial
    Tune never recorded. A limiter that counts it waits for it for ever; this searcher hands its
    config to the next trial instead (``reconcile``).

    Module-level, its arguments plain data: Tune pickles the searcher with the sweep, and a sweep
    resumed after an upgrade must run today's class, found by name, not the one it started with.
    ``save``/``restore`` keep only the search's state (``STATE``), never the arguments.
    """

    # what a resumed sweep continues from: the inner searcher and what was handed out and learnt
    STATE = ("inner", "handed", "results", "pending", "probes", "counter", "live", "redo")
    # a searcher pickled by a sweep from before warm starts has none told
    told = types.MappingProxyType({})

    def __init__(
        self,
        inner: Searcher,
        plan: RunPlan,
        seed_policy: str,
        metric: str,
        limit: int | None,
        fuse: int = 1,
        max_concurrent: int = 0,
        told: dict[str, dict] | None = None,
    ):
        super().__init__(metric=metric, mode="max")
        self.plan = plan
        self.seed_policy = seed_policy
        self.limit = limit
        self.fuse = fuse
        self.max_concurrent = max_concurrent
        self.inner = inner
        self.handed: dict[str, str] = {}  # config key -> the inner searcher's id of its first suggestion
        self.results: dict[str, dict | None] = {}  # inner id -> final result (None while running or failed)
        self.pending: list = []  # (inner id, config) suggested but not yet in a fused trial
        self.probes: dict[str, str | list[str]] = {}  # trial id -> the inner searcher's id(s) for it
        self.counter = 0
        self.live: dict[str, dict] = {}  # trial id -> the config handed to it, until Tune completes it
        self.redo: list = []  # (inner id(s), config) of trials a restored Tune never held: handed again
        self.told = dict(told or {})  # config key -> the result an earlier sweep recorded (warm start)

    def set_search_properties(self, metric, mode, config, **spec):
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str):
        if self.redo:
            self.probes[trial_id], config = self.redo.pop(0)
        elif self.max_concurrent and len(self.live) >= self.max_concurrent:
            return None
        else:
            config = self._suggest(trial_id)
        if isinstance(config, dict):
            self.live[trial_id] = config
        return config

    def _suggest(self, trial_id: str):
        if self.fuse <= 1:
            return self._next(trial_id)
        while len(self.pending) < self.fuse:
            config = self._next(trial_id)
            if config is None or config == Searcher.FINISHED:
                break
            self.pending.append((self.probes.pop(trial_id), config))
        if not self.pending:
            return config
        groups: dict = {}
        for probe, config in self.pending:
            groups.setdefault(fusion_group(self.plan, config), []).append((probe, config))
        chosen = max(groups.values(), key=len)[: self.fuse]
        self.pending = [item for item in self.pending if item not in chosen]
        self.probes[trial_id] = [probe for probe, _ in chosen]
        return {MEMBERS: [config for _, config in chosen]}

    def _next(self, trial_id: str):
        if self.limit is not None and len(self.handed) >= self.limit:
            return Searcher.FINISHED
        for _ in range(MAX_RESAMPLES):
            self.counter += 1
            probe = f"{trial_id}-probe{self.counter}"
            config = self.inner.suggest(probe)
            if config is None or config == Searcher.FINISHED:
                return config
            key = _config_key(config)
            try:
                check_sample(self.plan, self.seed_policy, config)
            except ConfigError:
                self.inner.on_trial_complete(probe, error=True)
                continue
            if key in self.handed or key in self.told:
                earlier = self.told.get(key) or self.results.get(self.handed[key])
                if earlier is not None and earlier.get(self.metric) == earlier.get(self.metric):  # not NaN
                    self.inner.on_trial_complete(probe, result=earlier)
                else:
                    self.inner.on_trial_complete(probe, error=True)
                continue
            self.handed[key] = probe
            self.results[probe] = None
            self.probes[trial_id] = probe
            return config
        return None

    def on_trial_result(self, trial_id: str, result: dict):
        probe = self.probes.get(trial_id)
        if isinstance(probe, str):
            self.inner.on_trial_result(probe, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        self.live.pop(trial_id, None)
        probe = self.probes.get(trial_id)
        if probe is None:
            return
        if isinstance(probe, list):  # a fused trial: each member is its own result
            failed = error or bool((result or {}).get(FATAL_KEY))
            members = (result or {}).get(MEMBERS) or [None] * len(probe)
            for member_probe, member_result in zip(probe, members):
                self._complete(member_probe, member_result, failed)
            return
        self._complete(probe, result, error)

    def _complete(self, probe: str, result: dict | None, error: bool) -> None:
        """Tell the inner searcher one config's end: a crash, a diverged run (``DIVERGED_KEY``) or a NaN
        metric is a failure (Optuna's trial state FAIL), never a value to learn from."""
        metric = self.metric
        failed = (
            error
            or result is None
            or result.get(FATAL_KEY)
            or result.get(DIVERGED_KEY)
            or result.get(metric) != result.get(metric)
        )
        self.results[probe] = None if failed else result
        self.inner.on_trial_complete(probe, result=None if failed else result, error=bool(failed))

    def save(self, checkpoint_path: str):
        with open(checkpoint_path, "wb") as handle:
            pickle.dump({key: getattr(self, key) for key in self.STATE}, handle)

    def restore(self, checkpoint_path: str):
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))

    def restore_from_dir(self, checkpoint_dir: str):
        super().restore_from_dir(checkpoint_dir)
        held = snapshot_trials(checkpoint_dir)
        if held is not None:
            self.reconcile(held)

    def reconcile(self, held: dict[str, tuple[str, dict]]) -> None:
        """Match the live trials to Tune's restored trial table ``held`` (trial id -> (status,
        last result)): a trial Tune does not hold gives its config to the next suggestion (the
        inner searcher's trial for it stays open, and the tracker adopts its MLflow run); one
        Tune holds as ended is completed with its last result."""
        for trial_id in list(self.live):
            if trial_id not in held:
                self.redo.append((self.probes.pop(trial_id), self.live.pop(trial_id)))
            elif held[trial_id][0] == "TERMINATED":
                self.on_trial_complete(trial_id, result=held[trial_id][1])
