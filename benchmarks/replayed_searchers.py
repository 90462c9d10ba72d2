"""The benchmark's searchers, each its real code driven against a table (``search_replay.py``).

- uml-ray (``tpe``, ``random``): ``CheckedSearcher`` around Ray's ``OptunaSearch`` with the sampler
  ``build_sampler`` makes; fused trials of ``DEFAULT_FUSE`` configs halved at ``fused_rungs`` where
  the case fuses, else one config per trial under the ``ASHAScheduler`` the sweep builds;
- uml-ray ``grid``: every point in the order the sweep runs it (``grid_members`` / Tune's grid);
- uml-ray warm-started: the default, its Optuna study seeded from another sweep's configs first;
- plain Optuna: ``TPESampler(seed)`` and ``HyperbandPruner()`` (their defaults) in one process;
- Ray Tune: random search (the variant generator behind ``BasicVariantGenerator``) with
  ``ASHAScheduler`` (its defaults but ``max_t``: the case's validations).

Each returns the ``Ledger`` of its run, stopped once it spent ``budget`` config-steps (or its space).
"""

from __future__ import annotations

from search_replay import MAX_IDLE_SUGGESTIONS, Ledger, Table, at, final, replay_asha, replay_fused

from uml_ray.selection import SCORE


def _fusion(plan, space):
    """The sweep's trial shape for this plan and space: (configs per trial, halving inside a fused
    trial or None, ASHA across one-config trials or None)."""
    from ray.tune.schedulers import ASHAScheduler

    from uml_ray.driver.sweep import DEFAULT_FUSE, can_fuse, fused_rungs
    from uml_ray.driver.trial import REDUCTION_FACTOR
    from uml_ray.train.skeleton import Halving

    if can_fuse(plan, space):
        return DEFAULT_FUSE, Halving(fused_rungs(plan), REDUCTION_FACTOR), None
    validations = -(-plan.cfg.train.max_steps // plan.cfg.train.val_every)
    asha = ASHAScheduler(
        time_attr="training_iteration",
        metric=space.metric,
        mode="max",
        max_t=validations,
        grace_period=max(1, validations // 4),
        reduction_factor=REDUCTION_FACTOR,
    )
    return 1, None, asha


def run_umlray(table: Table, plan, space, sampler: str, seed: int, budget: int, warm=None) -> Ledger:
    """uml-ray's searched sweep (``sampler``: tpe or random) at concurrency 1; ``warm(study, space)``
    seeds the Optuna study before the first suggestion."""
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    from uml_ray.driver.bridge import MEMBERS
    from uml_ray.driver.searcher import CheckedSearcher, build_sampler, tune_space

    fuse, halving, asha = _fusion(plan, space)
    inner = OptunaSearch(sampler=build_sampler(sampler, seed), metric=space.metric, mode="max")
    searcher = CheckedSearcher(inner, plan, space.seed_policy, space.metric, space.size(), fuse, 1)
    searcher.set_search_properties(space.metric, "max", tune_space(space))
    if warm is not None:
        warm(
            inner._ot_study, space
        )  # Ray's OptunaSearch holds its study there; the sweep's warm start seeds it
    ledger, idle, count = Ledger(table), 0, 0
    while not ledger.spent(budget):
        count += 1
        trial_id = f"replay_{count:05d}"
        config = searcher.suggest(trial_id)
        if config == Searcher.FINISHED:
            break
        if config is None:  # every proposal a repeat: Tune would ask again later
            idle += 1
            if idle > MAX_IDLE_SUGGESTIONS:
                break
            continue
        if MEMBERS in config:
            rows = [table.row(member) for member in config[MEMBERS]]
            steps, results = replay_fused(rows, halving)
            searcher.on_trial_complete(trial_id, {MEMBERS: results})
            ledger.trial(steps, [row for row, result in zip(rows, results) if result.get("completed")])
        else:
            row = table.row(config)
            steps, result = replay_asha(row, asha, trial_id, searcher)
            searcher.on_trial_complete(trial_id, result)
            ledger.trial(steps, [row] if result.get("completed") else [])
    return ledger


def run_grid(table: Table, plan, space, budget: int) -> Ledger:
    """uml-ray's grid: every point to its end, in the sweep's order (fused trials where it fuses)."""
    from ray.tune.search.variant_generator import generate_variants

    from uml_ray.driver.searcher import grid_members, tune_space

    fuse, _, _ = _fusion(plan, space)
    grid_space = type(space)(
        space.params, space.recipe, space.metric, space.seed_policy, space.source, "grid"
    )
    if fuse > 1:
        trials = grid_members(grid_space, plan, fuse)
    else:
        trials = [[spec["config"]] for _, spec in generate_variants({"config": tune_space(grid_space)})]
    ledger = Ledger(table)
    for members in trials:
        if ledger.spent(budget):
            break
        rows = [table.row(member) for member in members]
        ledger.trial(sum(row["steps"] for row in rows), rows)
    return ledger


def run_optuna(table: Table, grid: dict, seed: int, budget: int) -> Ledger:
    """A plain Optuna study in one process: TPE and its Hyperband pruner with their defaults, each
    trial reporting its selection score at every validation (the resource: validations)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        # Hyperband puts a trial in a bracket by a hash of the study's name and the trial's number: a
        # named study is replayed the same in every run (an unnamed one gets a random name)
        study_name=f"optuna-{seed}",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.HyperbandPruner(),
    )
    ledger = Ledger(table)
    while not ledger.spent(budget):
        trial = study.ask()
        row = table.row({key: trial.suggest_categorical(key, values) for key, values in grid.items()})
        validations = len(row["val_steps"])
        for v in range(1, validations):
            report = at(row, v)
            trial.report(report[SCORE], v)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                ledger.trial(report["step"], [], tune_trial=False)
                break
        else:
            trial.report(row[SCORE][-1], validations)
            study.tell(trial, final(row)[SCORE])
            ledger.trial(row["steps"], [row], tune_trial=False)
    return ledger


def run_tune_random(table: Table, space, seed: int, budget: int) -> Ledger:
    """Ray Tune's random search (its variant generator, seeded as ``BasicVariantGenerator(random_state=
    seed)`` seeds it; repeats are trained again, as Tune does) with ``ASHAScheduler``'s defaults."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.sample import _BackwardsCompatibleNumpyRng
    from ray.tune.search.variant_generator import generate_variants

    from uml_ray.driver.searcher import tune_space

    rng = _BackwardsCompatibleNumpyRng(seed)
    scheduler = ASHAScheduler(
        time_attr="training_iteration", metric=SCORE, mode="max", max_t=table.validations
    )
    param_space = {"config": tune_space(space)}
    ledger, count = Ledger(table), 0
    while not ledger.spent(budget):
        count += 1
        (_, spec), *_ = generate_variants(param_space, random_state=rng)
        row = table.row(spec["config"])
        steps, result = replay_asha(row, scheduler, f"tune_{count:05d}")
        ledger.trial(steps, [row] if result.get("completed") else [])
    return ledger
