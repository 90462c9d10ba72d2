"""A demo-case sweep at two sizes (100 and 1,000 configs by default), run as a user runs it: the wall
time, what the console printed (in CI and on a terminal), what MLflow costs per config as the
experiment grows, and how long ``uml-ray best`` takes over all the runs. One run; prints a table.

    python benchmarks/sweep_scale.py [--manifest demo_work/fashion-mnist/manifest.yaml] [--configs 100 1000]
        [--terminal]

Each sweep is ``uml-ray tune configs/fashion_mnist.yaml --space search_spaces/supervised_linear_probe.yaml
--trials N`` in a fresh process with its own SQLite store, stdout and stderr piped (CI, ``ray job
submit`` logs); ``--terminal`` runs the largest again under a pseudo-terminal (the live status
line), counting the lines a user scrolls.

MLflow's cost per config, as the store grows: after each sweep, ``WRITES`` representative trial
records (a run opened with the config's params and tags, one metric batch per validation, closed)
are written through uml-ray's tracker into the sweep's store, beside its N runs: seconds per config
at N=100 against N=1,000 shows whether writes slow down as the experiment fills.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UML_RAY = [sys.executable, "-m", "uml_ray.cli"]
WRITES = 50  # representative trial records timed per store size


def demo_manifest(given: str) -> str:
    """The Fashion-MNIST 4-shot case (built on first use, about 2.5 min; then reused)."""
    if given:
        return given
    manifest = ROOT / "demo_work" / "fashion-mnist" / "manifest.yaml"
    if not manifest.exists():
        subprocess.run(
            [
                *UML_RAY,
                "case",
                "fashion-mnist",
                "--out",
                str(manifest.parent),
                "--shots",
                "4",
                "--split-seed",
                "0",
            ],
            check=True,
        )
    return str(manifest)


def tune_command(manifest: str, workdir: Path, configs: int, name: str) -> list[str]:
    return [
        *UML_RAY,
        "tune",
        str(ROOT / "configs" / "fashion_mnist.yaml"),
        f"data.manifest={manifest}",
        f"tracking.uri=sqlite:///{workdir}/mlflow.db",
        f"tracking.storage_path={workdir}/runs",
        "--space",
        str(ROOT / "search_spaces" / "supervised_linear_probe.yaml"),
        "--trials",
        str(configs),
        "--name",
        name,
    ]


def piped(command: list[str]) -> tuple[float, str, str]:
    """(wall seconds, stdout, stderr) of ``command`` with its output piped, as in CI."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout, done.stderr


def on_terminal(command: list[str]) -> tuple[float, str]:
    """(wall seconds, what a terminal received) of ``command`` with a pseudo-terminal as its stdout and
    stderr."""
    main_fd, child_fd = pty.openpty()
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=child_fd, stderr=child_fd)
    os.close(child_fd)
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(main_fd, 65536)
        except OSError:  # EIO: every holder of the terminal's other end closed it
            break
        if not data:
            break
        chunks.append(data)
    os.close(main_fd)
    code = proc.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited {code} on a terminal")
    return seconds, b"".join(chunks).decode(errors="replace")


def scrolled_lines(text: str) -> list[str]:
    """The lines that stay on screen: a status line redrawn in place with carriage returns counts
    once, as what it last showed."""
    return [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n") if line.strip("\r ")]


def write_cost(workdir: Path, sweep: str) -> float:
    """Seconds per representative trial record written through uml-ray's tracker into the store at
    ``workdir`` (beside the sweep's runs): params, 5 validations' metrics, the end."""
    from uml_ray.tracking.loggers import SweepTracker

    tracker = SweepTracker(f"sqlite:///{workdir}/mlflow.db", "fashion-mnist", "", f"{sweep}-writes")
    tracker.start_sweep({"searcher": "tpe"})
    params = {"train.lr": 0.01, "train.weight_decay": 1e-4, "train.alpha": 0.5, "model.head_init": "text"}
    start = time.perf_counter()
    for i in range(WRITES):
        key = f"w{i:04d}"
        tracker.start_trial(key, params, {"uml_ray.kind": "trial"})
        for step in range(20, 101, 20):
            tracker.log_metrics(key, {"val_acc": 0.8, "val_loss": 0.5, "selection_score": 0.81}, step)
        tracker.end_trial(key, "FINISHED", "finished")
    seconds = (time.perf_counter() - start) / WRITES
    tracker.end_sweep({}, {}, [])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default="")
    parser.add_argument("--configs", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--terminal", action="store_true", help="also run the largest sweep on a terminal")
    args = parser.parse_args()
    manifest = demo_manifest(args.manifest)
    rows = []
    for configs in args.configs:
        with tempfile.TemporaryDirectory() as folder:
            workdir = Path(folder)
            name = f"scale-{configs}"
            seconds, out, err = piped(tune_command(manifest, workdir, configs, name))
            lines = scrolled_lines(out + err)
            summary = json.loads(scrolled_lines(out)[-1])
            best_seconds, _, _ = piped(
                [
                    *UML_RAY,
                    "best",
                    "--experiment",
                    "fashion-mnist",
                    "--tracking-uri",
                    f"sqlite:///{workdir}/mlflow.db",
                    "--output",
                    str(workdir / "best.yaml"),
                ]
            )
            row = {
                "configs": configs,
                "wall_s": seconds,
                "configs_per_min": configs / seconds * 60,
                "console_lines_ci": len(lines),
                "last_lines_ci": scrolled_lines(out)[-4:],
                "trials_recorded": summary.get("trials"),
                "write_s_per_config": write_cost(workdir, name),
                "best_s": best_seconds,
            }
            if args.terminal and configs == max(args.configs):
                _, screen = on_terminal(tune_command(manifest, workdir, configs, f"{name}-tty"))
                row["console_lines_terminal"] = len(scrolled_lines(screen))
                row["last_lines_terminal"] = scrolled_lines(screen)[-4:-1]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\ndemo-case sweeps, {os.cpu_count()} CPUs, {manifest}")
    print(
        f"  {'configs':>7s} {'wall':>8s} {'configs/min':>12s} {'lines (CI)':>10s} "
        f"{'MLflow s/config':>16s} {'best':>7s}"
    )
    for row in rows:
        print(
            f"  {row['configs']:7d} {row['wall_s']:7.1f}s {row['configs_per_min']:12.1f} "
            f"{row['console_lines_ci']:10d} {row['write_s_per_config']:16.4f} {row['best_s']:6.1f}s"
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(
            f"  MLflow write cost per config at {last['configs']} runs vs {first['configs']}: "
            f"{last['write_s_per_config'] / first['write_s_per_config']:.2f}x"
        )


if __name__ == "__main__":
    main()
