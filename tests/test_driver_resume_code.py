"""What a sweep resumed after an upgrade runs: the installed searcher and callback code (Tune's saved
state names their classes, it does not carry their bodies), and a seeded searcher samples the same
configs under the Optuna range pyproject.toml pins. No Ray is started."""

from __future__ import annotations

import ast
import io
import pickle
from pathlib import Path

import pytest
from conftest import write_config

from uml_ray.config import load_config
from uml_ray.driver.plan import build_plan
from uml_ray.search.space import load_space

DRIVER = Path(__file__).resolve().parents[1] / "uml_ray" / "driver"


class _Names(pickle.Unpickler):
    """Unpickles, recording every (module, name) looked up: what a pickle refers to by name."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.names: set[tuple[str, str]] = set()

    def find_class(self, module, name):
        self.names.add((module, name))
        return super().find_class(module, name)


def names_in(data: bytes) -> set[tuple[str, str]]:
    reader = _Names(data)
    reader.load()
    return reader.names


def by_value(names: set[tuple[str, str]]) -> bool:
    """Whether a pickle rebuilds a class from its body (cloudpickle's way with a function's class)."""
    return any(name == "_make_skeleton_class" for _, name in names)


@pytest.fixture(scope="module")
def plan(synthetic_manifest, tmp_path_factory):
    """One plan for the module: building it reaches the tracking store, seconds each time."""
    workdir = tmp_path_factory.mktemp("plan")
    return build_plan(load_config(write_config(workdir / "c.yaml", synthetic_manifest, workdir)))


def space_of(tmp_path: Path, searcher: str = "tpe"):
    path = tmp_path / f"space-{searcher}.yaml"
    path.write_text(
        f"searcher: {searcher}\nparams:\n"
        "  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}\n"
        "  train.alpha.text: {type: uniform, low: 0.1, high: 1.5}\n"
        "  train.batch_size: {type: choice, values: [16, 32]}\n"
    )
    return load_space(path)


def test_a_resumed_sweep_runs_the_installed_searcher_code(plan, tmp_path, monkeypatch):
    """Tune pickles the searcher and the callbacks into tuner.pkl; ``Tuner.restore`` unpickles them in
    the resumed driver. Their classes must be looked up by name there, so a method changed by an
    upgrade (patched here after the sweep saved its state) is the one the resumed sweep runs."""
    from ray import tune

    from uml_ray.driver.bridge import TrackingBridge
    from uml_ray.driver.callback import MlflowBridgeCallback
    from uml_ray.driver.searcher import CheckedSearcher, build_searcher, tune_space
    from uml_ray.driver.trainable import Trial

    space = space_of(tmp_path)
    searcher = build_searcher(space, plan, "fixed", trials=4, fuse=1, concurrency=1)
    bridge = TrackingBridge(plan, "resume", False, {}, resolve=None, fetch_best=None)
    tune.Tuner(
        Trial,
        param_space=tune_space(space),
        tune_config=tune.TuneConfig(metric=space.metric, mode="max", num_samples=-1, search_alg=searcher),
        run_config=tune.RunConfig(
            name="resume", storage_path=str(tmp_path / "runs"), callbacks=[MlflowBridgeCallback(bridge)]
        ),
    )
    path = tmp_path / "runs" / "resume"
    saved = names_in((path / "tuner.pkl").read_bytes())
    assert ("uml_ray.driver.searcher", "CheckedSearcher") in saved
    assert ("uml_ray.driver.callback", "MlflowBridgeCallback") in saved
    assert not by_value(saved)  # no class body of any kind travels with the sweep

    # the sweep runs one trial and saves the searcher's state, as Tune does in the experiment folder
    searcher.set_search_properties(space.metric, "max", tune_space(space))
    first = searcher.suggest("t0")
    searcher.on_trial_complete("t0", result={space.metric: 0.5})
    searcher.save_to_dir(str(path), session_str="s")
    state = names_in(next(path.glob("searcher-state-*.pkl")).read_bytes())
    assert not any(module.startswith("uml_ray") for module, _ in state)  # the state is data, no class of ours

    # an upgrade changes how the searcher hands out configs
    installed = CheckedSearcher.suggest

    def upgraded(self, trial_id):
        config = installed(self, trial_id)
        return {**config, "upgraded": True} if isinstance(config, dict) else config

    monkeypatch.setattr(CheckedSearcher, "suggest", upgraded)
    tuner = tune.Tuner.restore(str(path), trainable=Trial)
    restored = tuner._local_tuner._tune_config.search_alg  # what the resumed sweep will ask
    restored.restore_from_dir(str(path))
    assert type(restored) is CheckedSearcher
    assert restored.handed == searcher.handed  # the saved state came back
    second = restored.suggest("t1")
    assert second["upgraded"] is True  # today's code ran
    assert {k: v for k, v in second.items() if k != "upgraded"} != first  # and the search went on


def test_a_class_defined_in_a_function_would_travel_by_value(plan):
    """What the test above guards against: a searcher class defined inside a function (as the driver
    had one) is pickled with its body, and a sweep resumed after an upgrade ran that old body."""
    from ray import cloudpickle
    from ray.tune.search import Searcher

    from uml_ray.driver.searcher import CheckedSearcher

    def old_style_searcher():
        class CheckedSearcher(Searcher):
            def suggest(self, trial_id):
                return None

        return CheckedSearcher(metric="best_val_acc", mode="max")

    assert by_value(names_in(cloudpickle.dumps(old_style_searcher())))
    module_level = CheckedSearcher(None, plan, "fixed", "best_val_acc", limit=1)
    names = names_in(cloudpickle.dumps(module_level))
    assert ("uml_ray.driver.searcher", "CheckedSearcher") in names and not by_value(names)


def test_nothing_in_the_driver_is_a_class_defined_inside_a_function():
    nested = []
    for path in sorted(DRIVER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                nested += [
                    f"{path.name}: {inner.name} in {node.name}"
                    for inner in ast.walk(node)
                    if isinstance(inner, ast.ClassDef)
                ]
    assert nested == []


# a seeded sweep's first 12 configs (train.seed 0), each completed at once with ``score``: TPE's
# first 10 are its random start (the same as the random searcher's), the last 2 TPE's own
FIRST_CONFIGS = [
    (0.012520653814999465, 1.1012651129213873, 16),
    (0.00703573702872215, 1.0042517582933186, 32),
    (0.08459126528049378, 0.6368181263560887, 16),
    (0.013680095279726922, 1.3958352936097254, 32),
    (0.0010975815419380158, 1.2656677837671133, 32),
    (0.09062263471261954, 1.218821989903413, 32),
    (0.0017240460099242293, 0.9958894298585332, 32),
    (0.011058510725696462, 0.680526715986733, 32),
    (0.008171478915115866, 0.8958075284161079, 32),
    (0.016756813861488494, 0.9637075956246596, 16),
]
TPE_NEXT = [(0.004435157499762175, 1.4858600736373122, 32), (0.006460059622515925, 1.4393625908304157, 32)]
RANDOM_NEXT = [(0.00523619487341915, 0.711844735319078, 16), (0.02155427556544752, 1.0388930174654232, 16)]


def score(config: dict) -> float:
    return config["train.alpha.text"] - abs(config["train.lr"] - 0.01) * 10


def first_configs(searcher, space, count: int) -> list[tuple]:
    from uml_ray.driver.searcher import tune_space

    searcher.set_search_properties(space.metric, "max", tune_space(space))
    handed = []
    for i in range(count):
        config = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", result={space.metric: score(config)})
        handed.append((config["train.lr"], config["train.alpha.text"], config["train.batch_size"]))
    return handed


@pytest.mark.parametrize("kind, expected", [("tpe", TPE_NEXT), ("random", RANDOM_NEXT)])
def test_a_seeded_sweep_samples_the_same_first_configs(plan, tmp_path, kind, expected):
    from uml_ray.driver.searcher import build_searcher

    space = space_of(tmp_path, kind)
    handed = first_configs(build_searcher(space, plan, "fixed", 12, 1, 0), space, 12)
    assert handed == [pytest.approx(config, rel=1e-12) for config in FIRST_CONFIGS + expected]


def test_tpe_options_are_set_not_left_to_optunas_defaults(plan, tmp_path):
    """The options the pinned sampler sets decide what TPE proposes: Optuna 4's default (independent
    TPE, ``multivariate=False``) proposes another 11th config from the same results."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from uml_ray.driver.searcher import CheckedSearcher, build_sampler

    sampler = build_sampler("tpe", seed=0)
    assert (sampler._multivariate, sampler._constant_liar, sampler._n_startup_trials) == (True, True, 10)
    space = space_of(tmp_path)
    independent = OptunaSearch(
        sampler=optuna.samplers.TPESampler(seed=0, multivariate=False, constant_liar=False),
        metric=space.metric,
        mode="max",
    )
    handed = first_configs(CheckedSearcher(independent, plan, "fixed", space.metric, 12), space, 12)
    assert handed[:10] == [pytest.approx(config, rel=1e-12) for config in FIRST_CONFIGS]
    assert handed[10] != pytest.approx(TPE_NEXT[0], rel=1e-6)
