"""Plain helpers shared by several test files (fixtures and config writers live in conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config


def checkpointed_config(workdir: Path, manifest: str, max_steps: int = 600, **sections) -> Path:
    """A run config (``workdir``/c.yaml) validating every 20 steps with a checkpoint at every 2nd
    validation (step 40, 80, ...), ``max_steps`` steps in all."""
    schedule = {"max_steps": max_steps, "val_every": 20, "checkpoint_every": 2}
    return write_config(workdir / "c.yaml", manifest, workdir, train=schedule, **sections)


def interrupted_and_resumed(plan, train, fail_after: int) -> tuple:
    """``train(plan, context)`` on a ``LocalContext`` that raises after ``fail_after`` reports (a killed
    worker), then again on one that resumes from the last checkpoint the first saved: returns both."""
    from uml_ray.train.context import Interrupted, LocalContext

    first = LocalContext(plan, fail_after=fail_after)
    with pytest.raises(Interrupted):
        train(plan, first)
    second = LocalContext(plan, saved=first.saved, best=first.best)
    train(plan, second)
    return first, second


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each of ``pids``; one that already exited is passed over."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def best_config(workdir: Path, sweep: str, output: Path) -> int:
    """``uml-ray best`` for ``sweep`` of experiment 'tests' in ``workdir``'s SQLite store, written to
    ``output``; returns the exit code."""
    from uml_ray.cli import main

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    return main(
        [
            "best",
            "--experiment",
            "tests",
            "--tracking-uri",
            tracking_uri,
            "--sweep",
            sweep,
            "--output",
            str(output),
        ]
    )


def fashion_mnist_case(capsys, out: Path, cache_dir: Path, **flags) -> dict:
    """``uml-ray case fashion-mnist`` into ``out`` for a tiny case (6 train images a class, 20 test
    images, 32 px, encoded features cached in ``cache_dir``) with ``flags`` (``shots=2`` is
    ``--shots 2``); asserts it succeeded and returns its JSON summary."""
    from uml_ray.cli import main

    tiny = {"train_pool": 6, "test_size": 20, "image_size": 32, "cache_dir": cache_dir, **flags}
    options = [part for name, value in tiny.items() for part in (f"--{name.replace('_', '-')}", str(value))]
    assert main(["case", "fashion-mnist", "--out", str(out), *options]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def uml_ray(env, cwd, *args, timeout=300) -> subprocess.CompletedProcess:
    """``uml-ray ARGS`` in a fresh subprocess with ``env`` (its Ray workers inherit it), from ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "uml_ray.cli", *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def drain(searcher, trials: int, metric_of, metric: str = "best_val_acc") -> list:
    """Ask ``searcher`` for up to ``trials`` trials, completing each at once with ``metric_of(config)``
    as ``metric`` (a fused trial: each member's)."""
    from ray.tune.search import Searcher

    handed = []
    for i in range(trials):
        config = searcher.suggest(f"t{i}")
        if config is None or config == Searcher.FINISHED:
            break
        handed.append(config)
        if "members" in config:
            result = {
                "members": [{metric: metric_of(m)} for m in config["members"]],
                metric: 0.0,
            }
        else:
            result = {metric: metric_of(config)}
        searcher.on_trial_complete(f"t{i}", result=result)
    return handed
