"""The science commands: statistics with known answers, the arms a comparison derives, target
sub-sampling, the refusals of both commands, and `compare` / `study conversion` on the synthetic
generator, where the answer is known: an informative auxiliary helps (an interval above 0),
pure noise does not (an interval around 0), and an informative auxiliary is worth more target
samples than one that repeats what the target sees.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_config

from uml_ray.cli import main
from uml_ray.errors import ConfigError
from uml_ray.science import stats

# the synthetic target: aligned spaces (the auxiliary observed through X's own mixing, as CLIP's
# towers are), 10 target train rows per class to draw few-shot splits from, X's noise hiding
# part of the class structure
TARGET = {"aux_shared_mixing": True, "dims_aux": (32,), "n_train": 50, "noise_x": 1.0}
# a target row with its scatter around the class mean halved: it pins the class down as tightly as
# 1 / 0.5**2 = 4 target rows would, and the classifier it teaches is X's own
INFORMATIVE = {"noise_aux": 0.5, "aux_spread": 0.5}
REDUNDANT = {"noise_aux": 1.0}  # distributed exactly as X: an auxiliary row is one more target row
NOISE = {"aux_pure_noise": True}
SPACE = (
    "searcher: grid\nparams:\n  train.lr: {type: choice, values: [0.03, 0.1]}\n"
    "  train.alpha.text: {type: choice, values: [0.0, 0.5, 1.0]}\n"
)
SCHEDULE = {"max_steps": 80, "val_every": 20, "warmup_steps": 10}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Manifests of the synthetic cases; the target rows are the same draw in every case."""
    from uml_ray.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("science")
    found = {
        name: write_synthetic(str(root / name), seed=0, **TARGET, **aux)
        for name, aux in (("informative", INFORMATIVE), ("redundant", REDUNDANT), ("noise", NOISE))
    }
    found["sequence"] = write_synthetic(
        str(root / "sequence"), seed=0, kind="sequence", n_aux=20, n_test=20, n_val=20
    )
    return found


def _setup(tmp_path: Path, manifest: str, space: str = SPACE, **sections) -> tuple[str, str]:
    sections.setdefault("model", {"project_target": False})
    sections["train"] = {**SCHEDULE, **sections.get("train", {})}
    config = write_config(tmp_path / "config.yaml", manifest, tmp_path, **sections)
    (tmp_path / "space.yaml").write_text(space)
    return str(config), str(tmp_path / "space.yaml")


def _last_json(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


# --- statistics, known answers -------------------------------------------------------------


def test_paired_summary_of_three_seeds_by_hand():
    summary = stats.paired_summary([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    # mean 2, sd 1, t(0.975, 2 df) = 4.302653: 2 ± 4.302653 / sqrt(3)
    assert summary.mean == pytest.approx(2.0) and summary.sd == pytest.approx(1.0)
    assert (summary.t_low, summary.t_high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    assert not summary.excludes_zero()
    # every resample's mean lies in [1, 3], and each end has probability 1/27 > 2.5%
    assert (summary.boot_low, summary.boot_high) == (1.0, 3.0)
    # 3 of 3 positive: 2 / 2**3 for both exact tests
    assert (summary.wins, summary.losses, summary.sign_p, summary.wilcoxon_p) == (3, 0, 0.25, 0.25)


def test_exact_tests_and_interval_by_hand():
    # ranks 1..7, the 7 negative: W- = 7; 19 of the 128 sign patterns give W <= 7
    assert stats.wilcoxon_p([1, 2, 3, 4, 5, 6, -7]) == pytest.approx(2 * 19 / 128)
    assert stats.sign_test([1, 2, 3, 4, 5, 6, -7]) == (6, 1, pytest.approx(2 * 8 / 128))
    assert stats.sign_test([0.1] * 5)[2] == pytest.approx(2 / 32)
    assert stats.sign_test([0, 0, 0]) == (0, 0, 1.0) and stats.wilcoxon_p([0, 0]) == 1.0
    # ties are dropped: the same p as without the zero
    assert stats.wilcoxon_p([0, 1, 2, 3]) == stats.wilcoxon_p([1, 2, 3])
    low, high = stats.t_interval([0.1, 0.1, 0.1, 0.1])
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
    with pytest.raises(ValueError):
        stats.t_interval([0.5])


def test_monotone_curve_and_equivalent_counts():
    assert stats.isotonic_increasing([1, 3, 2, 4]).tolist() == [1, 2.5, 2.5, 4]
    assert stats.isotonic_increasing([3, 2, 1]).tolist() == [2, 2, 2]
    counts, curve = [1, 2, 4, 8], [0.5, 0.6, 0.7, 0.8]
    assert stats.equivalent_count(counts, curve, 0.65) == pytest.approx(2**1.5)  # halfway in log2
    assert stats.equivalent_count(counts, curve, 0.7) == pytest.approx(4.0)
    assert (
        stats.equivalent_count(counts, curve, 0.3) == 1.0
        and stats.equivalent_count(counts, curve, 0.95) == 8.0
    )
    # on a flat stretch the smallest count that reaches the accuracy
    assert stats.equivalent_count([1, 2, 4], [0.5, 0.6, 0.6], 0.6) == pytest.approx(2.0)


def test_conversion_ratio_by_hand():
    unimodal = [[0.5, 0.6, 0.7, 0.8]] * 3
    found = stats.conversion([1, 2, 4, 8], unimodal, 1, [2, 4], [[0.6, 0.7]] * 3)
    # UML with 2 auxiliary samples matches 2 target samples (gain 1), with 4 it matches 4 (gain 3)
    assert found.gains == pytest.approx([1.0, 3.0]) and found.ratios == pytest.approx([0.5, 0.75])
    assert found.ratio == pytest.approx((2 * 1 + 4 * 3) / (2**2 + 4**2))  # slope through the origin
    assert found.capped == [False, False]
    # no gain below the budget's own point, a lower bound past the curve's end
    below = stats.conversion([1, 2, 4, 8], unimodal, 2, [2, 4], [[0.55, 0.9]] * 3)
    assert below.gains == pytest.approx([0.0, 6.0]) and below.capped == [False, True]
    # identical seeds: every bootstrap draw is the same study
    intervals = stats.bootstrap_conversion([1, 2, 4, 8], unimodal, 1, [2, 4], [[0.6, 0.7]] * 3, samples=200)
    assert intervals["ratio"] == pytest.approx((0.7, 0.7)) and intervals["gains"][1] == pytest.approx(
        (3.0, 3.0)
    )
    with pytest.raises(ValueError, match="budget"):
        stats.conversion([1, 2, 4], unimodal, 3, [2], [[0.6]] * 3)


def test_bootstrap_resamples_seeds_jointly():
    # seed 0 gains a lot, seed 1 nothing: the interval spans both, the point is their mean study
    unimodal = [[0.5, 0.6, 0.7], [0.5, 0.6, 0.7]]
    uml = [[0.7], [0.5]]
    found = stats.conversion([1, 2, 4], unimodal, 1, [1], uml)
    intervals = stats.bootstrap_conversion([1, 2, 4], unimodal, 1, [1], uml, samples=500)
    assert found.ratio == pytest.approx(1.0)  # mean UML 0.6 = the curve at 2 target samples
    assert intervals["ratio"][0] == pytest.approx(0.0) and intervals["ratio"][1] == pytest.approx(3.0)


# --- arms, target rows, refusals (no Ray) ----------------------------------------------------


def test_arms_share_the_space_less_what_alpha_zero_ignores(tmp_path):
    from uml_ray.config import load_config
    from uml_ray.data.synth import write_synthetic
    from uml_ray.driver.plan import build_plan
    from uml_ray.science.compare import compare_arms
    from uml_ray.search.space import load_space

    manifest = write_synthetic(str(tmp_path / "two"), seed=0, dims_aux=(16, 24), n_aux=50)
    space_text = (
        "params:\n  train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-1}\n"
        "  train.weight_decay: {type: loguniform, low: 1.0e-4, high: 100}\n"
        "  train.alpha.text: {type: uniform, low: 0, high: 1.5}\n"
        "  train.alpha.aux2: {type: uniform, low: 0, high: 1.5}\n"
        "  model.head_init: {type: choice, values: [random, text]}\n"
    )
    config, space_path = _setup(tmp_path, manifest, space_text, model={}, train={"alpha": {"aux2": 0.5}})
    space = load_space(space_path)
    arms = {arm.name: arm for arm in compare_arms(build_plan(load_config(config), space), space, ["aux2"])}
    assert list(arms) == ["uml", "without-aux2", "unimodal"]
    # one architecture for all: the shared width of the UML arm (text's 16 dims), not alpha's default
    assert all(arm.overrides["model.shared_dim"] == 16 for arm in arms.values())
    assert arms["uml"].space is space
    assert arms["without-aux2"].space.keys() == [
        "train.lr",
        "train.weight_decay",
        "train.alpha.text",
        "model.head_init",
    ]
    assert (
        arms["without-aux2"].overrides["data.auxiliary"] == ["text"]
        and arms["without-aux2"].overrides["train.alpha"] == {}
    )
    # the baseline searches the same regularisation, nothing that only acts through an auxiliary modality
    assert arms["unimodal"].space.keys() == ["train.lr", "train.weight_decay"]
    assert (
        arms["unimodal"].overrides["train.alpha_default"] == 0.0
        and arms["unimodal"].overrides["train.alpha"] == {}
    )


def test_sequence_baseline_trains_jointly_from_the_start(tmp_path, datasets):
    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan
    from uml_ray.science.compare import compare_arms
    from uml_ray.search.space import load_space

    manifest = datasets["sequence"]
    space_text = (
        "recipe: sequence\nparams:\n  train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
        "  train.step_k: {type: choice, values: [-1, 1, 2]}\n"
        "  train.alpha.text: {type: uniform, low: 0, high: 1.5}\n"
    )
    config, space_path = _setup(
        tmp_path, manifest, space_text, model={"regime": "sequence", "zdim": 8, "heads": 2, "layers": 1}
    )
    space = load_space(space_path)
    arms = compare_arms(build_plan(load_config(config), space), space, [])
    uml, unimodal = arms
    assert "model.shared_dim" not in uml.overrides
    assert unimodal.space.keys() == ["train.lr"] and unimodal.overrides["train.step_k"] == -1
    # the baseline's config is valid: step_k > 0 with every alpha 0 would be refused
    build_plan(load_config(config, [f"{k}={json.dumps(v)}" for k, v in unimodal.overrides.items()]))


def test_target_rows_per_class_are_a_nested_seeded_draw(tmp_path, datasets):
    from uml_ray.config import load_config
    from uml_ray.data.format import ID, LABEL
    from uml_ray.data.streams import read_table
    from uml_ray.driver.plan import build_plan

    config, _ = _setup(tmp_path, datasets["informative"])
    full = read_table(build_plan(load_config(config)).dataset.manifest.uris("image", "train"))

    def rows(k: int, seed: int, split: str = "train"):
        plan = build_plan(load_config(config, [f"data.target_per_class={k}", f"train.seed={seed}"]))
        return plan.shape_table(f"image.{split}", read_table(plan.dataset.manifest.uris("image", split)))

    two, four = rows(2, 0), rows(4, 0)
    assert np.bincount(two.column(LABEL).to_numpy()).tolist() == [2] * 5
    assert np.bincount(four.column(LABEL).to_numpy()).tolist() == [4] * 5
    assert set(two.column(ID).to_pylist()) < set(four.column(ID).to_pylist())  # nested: k rows among the 2k
    assert set(rows(2, 1).column(ID).to_pylist()) != set(
        two.column(ID).to_pylist()
    )  # another seed, another split
    assert len(rows(2, 0, "val")) == 100 and len(rows(-1, 0)) == len(full) == 50
    with pytest.raises(ConfigError, match="class 'class_0' has only 10 train row"):
        build_plan(load_config(config, ["data.target_per_class=11"]))


def test_weight_decay_range_is_wide_enough_for_fair_baselines():
    from uml_ray.config import load_config

    assert load_config(None, ["train.weight_decay=100"]).train.weight_decay == 100.0
    with pytest.raises(ConfigError, match="<= 100"):
        load_config(None, ["train.weight_decay=101"])


SEQUENCE_SPACE = "recipe: sequence\nparams:\n  train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
NO_ALPHA_SPACE = "searcher: grid\nparams:\n  train.lr: {type: choice, values: [0.03, 0.1]}\n"
SEEDED_SPACE = SPACE.replace("searcher: grid\n", "searcher: grid\nseeds: [0, 1]\n")
SEED_IN_SPACE = NO_ALPHA_SPACE.replace("params:\n", "params:\n  train.seed: {type: choice, values: [0, 1]}\n")
NX_IN_SPACE = SPACE + "  data.aux_per_class: {type: choice, values: [1, 2]}\n"


def bad(command: str, flags: str, message: str, space: str = SPACE, **sections) -> tuple:
    """A refused study: (command, flags, config sections, space, what the one line must say)."""
    return command, flags.split(), sections, space, message


BAD = {
    "one seed": bad("compare", "--seeds 1", "at least 2 seeds"),
    "seeds not numbers": bad("compare", "--seeds a,b", "expected a count like 3"),
    "seed twice": bad("compare", "--seeds 1,1", "distinct integers"),
    "no trials": bad("compare", "--seeds 3 --trials 0", "--trials must be >= 1"),
    "confidence": bad("compare", "--seeds 3 --confidence 95", "--confidence must be in"),
    "negative fuse": bad("compare", "--seeds 3 --fuse -1", "--fuse must be >= 0"),
    "unknown dropped modality": bad(
        "compare", "--seeds 3 --drop-modality audio", "not an auxiliary modality"
    ),
    "dropping the only modality": bad("compare", "--seeds 3 --drop-modality text", "only auxiliary modality"),
    "pattern without seed": bad(
        "compare", "--seeds 3 --manifest-per-seed work/split/manifest.yaml", "has no {seed}"
    ),
    "pattern with other braces": bad(
        "compare", "--seeds 3 --manifest-per-seed w/{seed}/{shots}.yaml", "only {seed}"
    ),
    "missing per-seed manifest": bad(
        "compare",
        "--seeds 3 --manifest-per-seed /nonexistent/{seed}/manifest.yaml",
        "/nonexistent/0/manifest.yaml",
    ),
    "space searches the seed": bad("compare", "--seeds 3", "set by the study itself", SEED_IN_SPACE),
    "space repeats seeds": bad("compare", "--seeds 3", "remove 'seeds'", SEEDED_SPACE),
    "both arms unimodal": bad(
        "compare", "--seeds 3", "UML arm would be the unimodal", NO_ALPHA_SPACE, train={"alpha_default": 0.0}
    ),
    "bad study name": bad("compare", "--seeds 3 --name a/b", "cannot be a folder name"),
    "project_target off, widths differ": bad(
        "compare", "--seeds 3", "model.project_target=false", model={"project_target": False, "shared_dim": 8}
    ),
    "nx one point": bad("conversion", "--seeds 3 --nx 2 --ny 1", "at least 2 target counts"),
    "nx twice": bad("conversion", "--seeds 3 --nx 1,1 --ny 1", "distinct integers >= 1"),
    "nx not numbers": bad("conversion", "--seeds 3 --nx 1,two --ny 1", "expected comma-separated integers"),
    "ny zero": bad("conversion", "--seeds 3 --nx 1,2 --ny 0", "distinct integers >= 1"),
    "budget off the grid": bad(
        "conversion", "--seeds 3 --nx 1,2,4 --ny 1 --target-budget 3", "must be one of --nx"
    ),
    "budget at the top": bad(
        "conversion", "--seeds 3 --nx 1,2,4 --ny 1 --target-budget 4", "is the largest --nx"
    ),
    "nx above the pool": bad("conversion", "--seeds 3 --nx 1,20 --ny 1", "data.target_per_class=20"),
    "ny above the pool": bad("conversion", "--seeds 3 --nx 1,2 --ny 500", "--ny 500: class"),
    "space searches nx": bad(
        "conversion", "--seeds 3 --nx 1,2 --ny 1", "set by the study itself", NX_IN_SPACE
    ),
    "sequence regime": bad(
        "conversion",
        "--seeds 3 --nx 1,2 --ny 1",
        "needs model.regime=supervised",
        SEQUENCE_SPACE,
        model={"regime": "sequence", "zdim": 8, "heads": 2},
    ),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for every refusal (creating its schema costs a second; no case writes a run)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line(case, tmp_path, datasets, store, capsys):
    command, flags, sections, space, message = BAD[case]
    manifest = datasets[
        "sequence" if sections.get("model", {}).get("regime") == "sequence" else "informative"
    ]
    config, space_path = _setup(tmp_path, manifest, space, tracking={"uri": store}, **sections)
    argv = (
        (["compare"] if command == "compare" else ["study", "conversion"])
        + [config, "--space", space_path]
        + flags
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"uml-ray {argv[0]}: error:") and message in err, err


# --- on the synthetic generator (real Ray, real MLflow) -------------------------------------


@pytest.mark.slow
def test_compare_finds_the_informative_auxiliary_and_records_the_study(
    ray_session, datasets, tmp_path, capsys
):
    from mlflow.tracking import MlflowClient

    config, space = _setup(tmp_path, datasets["informative"])
    # each seed draws its own 2-shot split of the 10-per-class pool and trains with its own seed
    assert (
        main(
            ["compare", config, "data.target_per_class=2", "--space", space, "--seeds", "3", "--name", "cmp"]
        )
        == 0
    )
    result = _last_json(capsys.readouterr().out)
    print(json.dumps(result))
    low, high = result["t_ci"]
    assert result["delta"] > 0.05 and low > 0, result  # UML helps, and the interval excludes 0
    assert result["bootstrap_ci"][0] > 0

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    study = client.get_run(result["run_id"])
    assert study.data.tags["uml_ray.kind"] == "compare" and study.info.status == "FINISHED"
    assert study.data.metrics["uml_minus_unimodal.mean"] == pytest.approx(result["delta"])
    children = client.search_runs(
        [study.info.experiment_id], f"tags.`mlflow.parentRunId` = '{study.info.run_id}'"
    )
    # a grid with one manifest: one sweep per arm, every seed its own cells
    assert sorted(r.data.tags["uml_ray.sweep"] for r in children) == ["cmp-uml", "cmp-unimodal"]
    assert all(r.data.tags["uml_ray.kind"] == "sweep" for r in children)
    folder = client.download_artifacts(study.info.run_id, "", str(tmp_path / "artifacts"))
    assert {"compare.csv", "compare.json", "compare.png"} <= {p.name for p in Path(folder).iterdir()}
    with open(Path(folder) / "compare.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["seed"]) for r in rows] == [0, 1, 2]
    deltas = [float(r["uml_test_acc"]) - float(r["unimodal_test_acc"]) for r in rows]
    assert np.mean(deltas) == pytest.approx(result["delta"])
    # the baseline never trained an auxiliary modality: its selected configs carry no alpha
    assert all("alpha" not in r["unimodal_config"] for r in rows)


@pytest.mark.slow
def test_compare_with_a_pure_noise_auxiliary_finds_nothing(ray_session, datasets, tmp_path, capsys):
    config, space = _setup(tmp_path, datasets["noise"])
    assert (
        main(
            [
                "compare",
                config,
                "data.target_per_class=2",
                "--space",
                space,
                "--seeds",
                "3",
                "--name",
                "cmp-noise",
            ]
        )
        == 0
    )
    result = _last_json(capsys.readouterr().out)
    print(json.dumps(result))
    low, high = result["t_ci"]
    assert low <= 0 <= high and abs(result["delta"]) < 0.05, result


@pytest.mark.slow
def test_an_informative_auxiliary_converts_to_more_target_samples(ray_session, datasets, tmp_path, capsys):
    ratios = {}
    for case in ("informative", "redundant"):
        folder = tmp_path / case
        folder.mkdir()
        config, space = _setup(folder, datasets[case])
        assert (
            main(
                [
                    "study",
                    "conversion",
                    config,
                    "--space",
                    space,
                    "--seeds",
                    "3",
                    "--nx",
                    "1,2,4",
                    "--ny",
                    "1",
                    "--name",
                    f"conv-{case}",
                ]
            )
            == 0
        )
        result = _last_json(capsys.readouterr().out)
        print(case, json.dumps(result))
        ratios[case] = result["ratio"]
        assert len(result["curve"]) == 3 and result["curve"] == sorted(result["curve"])
    # a redundant row is at most one more target row; the informative one is worth more
    assert ratios["informative"] > ratios["redundant"] and ratios["informative"] > 1.0, ratios


def test_fused_cells_train_on_their_own_target_rows_and_seed(ray_session, datasets, tmp_path):
    """The cells a study adds to a grid are structural settings: each fused trial must shape its
    tables with its members' data.target_per_class and train.seed, exactly as the config trained
    alone does (not with the base config's: all rows, seed 0)."""
    from uml_ray.config import load_config
    from uml_ray.driver import sweep
    from uml_ray.driver.plan import build_plan
    from uml_ray.search.space import load_space
    from uml_ray.train.context import LocalContext
    from uml_ray.train.loop import train_supervised

    cells = (
        "searcher: grid\nparams:\n  train.lr: {type: choice, values: [0.1]}\n"
        "  data.target_per_class: {type: choice, values: [1, 2]}\n"
        "  train.seed: {type: choice, values: [1, 2]}\n"
    )
    config, space_path = _setup(tmp_path, datasets["informative"], cells, train={"max_steps": 40})
    space = load_space(space_path)
    plan = build_plan(load_config(config), space)
    fused = {
        (r["config"]["data.target_per_class"], r["config"]["train.seed"]): (
            r["metrics"]["best_val_acc"],
            r["metrics"]["test_acc"],
        )
        for r in sweep.run(plan, space, name="fused", fuse=16).results
    }
    alone = {}
    for k, seed in fused:
        alone_plan = plan.with_params({"train.lr": 0.1, "data.target_per_class": k, "train.seed": seed})
        metrics = train_supervised(alone_plan, LocalContext(alone_plan))
        alone[(k, seed)] = (metrics["best_val_acc"], metrics["test_acc"])
    print(fused, alone)
    assert set(fused) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for cell in alone:
        assert fused[cell] == pytest.approx(alone[cell], abs=1e-3), cell
    assert len(set(alone.values())) == 4  # every cell trained on other rows


# --- two auxiliary modalities on the real case ----------------------------------------------


@pytest.mark.skipif(
    not Path("/usr/share/wordnet/data.noun").exists(), reason="needs the Debian package wordnet-base"
)
def test_separate_text_modalities_partition_the_joint_text_by_source():
    from uml_ray.encoders.cases import case_text_sources, case_texts

    sources = case_text_sources(("templates", "wordnet"))
    pairs = case_texts(("templates", "wordnet"))
    # the cached rows text-000000... follow case_texts' order: glosses first, then templates
    assert len(sources) == len(pairs) and sources == sorted(sources, key=["wordnet", "templates"].index)
    assert sources.count("wordnet") == len(case_texts(("wordnet",))) and sources.count("templates") == len(
        case_texts(("templates",))
    )
    assert [p for p, s in zip(pairs, sources) if s == "templates"] == case_texts(("templates",))


def test_separate_text_modalities_are_refused_for_the_finetune_case(tmp_path, capsys):
    assert (
        main(
            [
                "case",
                "fashion-mnist",
                "--out",
                str(tmp_path / "c"),
                "--shots",
                "1",
                "--regime",
                "finetune",
                "--text-modalities",
                "separate",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--text-modalities separate is for the feature case" in err
