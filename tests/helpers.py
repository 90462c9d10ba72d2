"""Plain helpers shared by several test files (fixtures and config writers live in conftest.py)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path


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
