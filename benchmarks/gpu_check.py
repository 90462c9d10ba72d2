"""The Python half of ``benchmarks/gpu_check.sh``: figures read off finished runs, and the in-process ones.

Subcommands (each prints ``label: value unit`` lines and appends them to ``--results``, a TSV the
shell script's summary table is printed from):

- ``rate RUN_PATH``: fine-tuning images/s of a finished ``uml-ray train`` run, read from its Tune
  trial's ``result.json`` (one row per validation, with ``time_total_s``): the steps between the
  first and the last-but-one validation over their wall time, so start-up, the first step's
  allocations and the final test pass are left out;
- ``backend SESSION_DIR``: the torch.distributed backend a Ray Train worker set up, found in the Ray
  session's logs (Ray Train logs ``using nccl|gloo``; with ``TORCH_CPP_LOG_LEVEL=INFO`` torch logs
  ``ProcessGroupNCCL`` lines as well);
- ``extract``: EfficientNet-Lite0 extraction images/s in process and through Ray Data, with the
  functions of ``benchmarks/extract_throughput.py``;
- ``sweep``: fused head-only sweep configs/min on one device (``--device cpu|gpu``), with
  ``uml_sweep`` of ``benchmarks/sweep_throughput.py``;
- ``summary``: the table of every recorded figure.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Ray Train's "using <backend>" (its DEBUG line), torch's own ProcessGroupNCCL lines, NCCL's INFO lines
BACKEND_PATTERN = re.compile(r"using (nccl|gloo)\b|ProcessGroupNCCL|NCCL INFO|ProcessGroupGloo")


def record(results: str, label: str, value, unit: str = "") -> None:
    """Print one labelled figure and append it to the results TSV."""
    shown = f"{value:.1f}" if isinstance(value, float) else str(value)
    print(f"{label}: {shown} {unit}".rstrip(), flush=True)
    with open(results, "a") as handle:
        handle.write(f"{label}\t{shown}\t{unit}\n")


def load_benchmark(name: str):
    """A module of ``benchmarks/`` (not a package) by file name."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trial_reports(run_path: str) -> list[dict]:
    """The rows of a run's Tune ``result.json``: one per validation (the run is a single trial)."""
    files = glob.glob(os.path.join(run_path, "_trial_*", "result.json")) or glob.glob(
        os.path.join(run_path, "*", "result.json")
    )
    if not files:
        raise SystemExit(f"no result.json under {run_path}: did the run report?")
    rows = [json.loads(line) for line in Path(sorted(files)[0]).read_text().splitlines() if line.strip()]
    return [row for row in rows if "step" in row and "time_total_s" in row]


def run_rate(args) -> None:
    """Fine-tuning images/s between the first and the last-but-one validation of a finished run."""
    rows = trial_reports(args.run_path)
    # the last validation also runs the test pass: leave it out when there are enough rows
    last = rows[-2] if len(rows) >= 3 else rows[-1]
    first = rows[0]
    steps = last["step"] - first["step"]
    seconds = last["time_total_s"] - first["time_total_s"]
    if steps <= 0 or seconds <= 0:
        raise SystemExit(f"{args.run_path}: {len(rows)} validation(s), too few to time steps between them")
    images = steps * args.batch * args.grad_accum * args.workers
    record(args.results, f"{args.label} images/s", images / seconds, f"img/s ({steps} steps timed)")
    record(args.results, f"{args.label} start-up to first validation", float(first["time_total_s"]), "s")
    for key in ("best_val_acc", "test_acc"):
        if key in rows[-1]:
            print(f"{args.label} {key}: {rows[-1][key]:.3f}")


def run_backend(args) -> None:
    """The process-group backend lines of a Ray session's logs; exit 1 when ``--expect`` is not among them."""
    seen, found = set(), []
    for path in sorted(glob.glob(os.path.join(args.session_dir, "logs", "**", "*"), recursive=True)):
        if not os.path.isfile(path):
            continue
        with open(path, errors="replace") as handle:
            for line in handle:
                match = BACKEND_PATTERN.search(line)
                if not match:
                    continue
                # Ray Train's logs are JSON lines: show the message alone
                text = line.strip()
                if text.startswith("{"):
                    try:
                        text = json.loads(text).get("message", text)
                    except json.JSONDecodeError:
                        pass
                text = text[:200]
                if text not in seen:
                    seen.add(text)
                    found.append((os.path.relpath(path, args.session_dir), text))
    for where, text in found[: args.show]:
        print(f"  {where}: {text}")
    backends = {m.group(1) for _, text in found if (m := re.search(r"using (nccl|gloo)\b", text))}
    if any("ProcessGroupNCCL" in text or "NCCL INFO" in text for _, text in found):
        backends.add("nccl")
    value = ",".join(sorted(backends)) or "not found in the logs"
    record(args.results, f"{args.label} process-group backend", value)
    if args.expect and args.expect not in backends:
        sys.exit(1)


def run_extract(args) -> None:
    """Extraction images/s: a warm in-process encoder, and ``extract_features`` through Ray Data."""
    import ray
    import torch

    from uml_ray.cluster import start_local_ray
    from uml_ray.data.sources import load_fashion_mnist

    bench = load_benchmark("extract_throughput")
    images, labels = load_fashion_mnist("test")
    images, labels = 255 - images[: args.images], labels[: args.images]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"extraction: {len(images)} images at {args.size} px, batch {args.batch_size}, encoder on {device}")
    local = bench.in_process(images, args.size, args.batch_size)
    record(args.results, f"extraction in-process ({device})", local, "img/s")
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        record(args.results, "extraction in-process torch.cuda.max_memory_allocated", peak, "MiB")
    start_local_ray(args.num_cpus or None)
    try:
        one_batch = bench.through_ray_data(
            images[: args.batch_size], labels[: args.batch_size], args.size, args.batch_size
        )
        full = bench.through_ray_data(images, labels, args.size, args.batch_size)
    finally:
        ray.shutdown()
    record(args.results, "extraction Ray Data end to end", len(images) / full, "img/s")
    if full > one_batch:
        steady = (len(images) - args.batch_size) / (full - one_batch)
        record(args.results, "extraction Ray Data steady state", steady, "img/s")
    else:  # too few images: the extra batches took less than the two runs' start-up differed by
        record(args.results, "extraction Ray Data steady state", f"n/a ({len(images)} images are too few)")


def run_sweep(args) -> None:
    """Configs/min of a fused head-only sweep (TPE, ``--fuse`` configs per trial) on one device."""
    import ray

    from uml_ray.cluster import start_local_ray
    from uml_ray.config import load_config
    from uml_ray.driver.plan import build_plan
    from uml_ray.search.space import load_space

    bench = load_benchmark("sweep_throughput")
    with tempfile.TemporaryDirectory(dir=args.work) as workdir:
        overrides = [
            f"data.manifest={args.manifest}",
            f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            f"tracking.storage_path={workdir}/runs",
            f"train.max_steps={args.max_steps}",
            f"train.val_every={max(1, args.max_steps // 4)}",
            f"train.warmup_steps={max(1, args.max_steps // 10)}",
            f"resources.gpus_per_worker={1 if args.device == 'gpu' else 0}",
        ]
        cfg = load_config(ROOT / "configs" / "fashion_mnist.yaml", overrides)
        space = load_space(str(ROOT / "search_spaces" / "supervised_linear_probe.yaml"))
        plan = build_plan(cfg, space)
        start_local_ray(args.num_cpus or None)  # started before the clock: the figure is the sweep's
        try:
            seconds, best = bench.uml_sweep(plan, space, args.configs, args.fuse, f"gpu-check-{args.device}")
        finally:
            ray.shutdown()
    print(f"sweep on {args.device}: {args.configs} configs in {seconds:.1f} s, best val acc {best:.3f}")
    record(
        args.results,
        f"fused sweep configs/min ({args.device}, K={args.fuse})",
        args.configs / seconds * 60,
        "configs/min",
    )


def run_summary(args) -> None:
    """Every recorded figure as one table."""
    rows = [line.split("\t") for line in Path(args.results).read_text().splitlines() if line.strip()]
    width = max([len(label) for label, *_ in rows] + [6])
    value_width = max([len(value) for _, value, _ in rows] + [5])
    print(f"{'figure':<{width}}  {'value':>{value_width}}  unit")
    print(f"{'-' * width}  {'-' * value_width}  ----")
    for label, value, unit in rows:
        print(f"{label:<{width}}  {value:>{value_width}}  {unit}".rstrip())


def main(argv: list[str] | None = None) -> None:
    """Parse the subcommand and run it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", required=True, help="TSV the figures are appended to")
    commands = parser.add_subparsers(dest="command", required=True)

    rate = commands.add_parser("rate", help="fine-tuning images/s of a finished run")
    rate.add_argument("run_path")
    rate.add_argument("--label", required=True)
    rate.add_argument("--batch", type=int, required=True)
    rate.add_argument("--grad-accum", type=int, default=1)
    rate.add_argument("--workers", type=int, default=1)
    rate.set_defaults(func=run_rate)

    backend = commands.add_parser("backend", help="the process-group backend in a Ray session's logs")
    backend.add_argument("session_dir")
    backend.add_argument("--label", required=True)
    backend.add_argument("--expect", default="", help="exit 1 unless this backend is found")
    backend.add_argument("--show", type=int, default=4, help="log lines to print")
    backend.set_defaults(func=run_backend)

    extract = commands.add_parser("extract", help="extraction images/s")
    extract.add_argument("--images", type=int, required=True)
    extract.add_argument("--size", type=int, required=True)
    extract.add_argument("--batch-size", type=int, required=True)
    extract.add_argument("--num-cpus", type=int, default=0)
    extract.set_defaults(func=run_extract)

    sweep = commands.add_parser("sweep", help="fused sweep configs/min on one device")
    sweep.add_argument("--manifest", required=True)
    sweep.add_argument("--device", choices=["cpu", "gpu"], required=True)
    sweep.add_argument("--configs", type=int, required=True)
    sweep.add_argument("--fuse", type=int, default=16)
    sweep.add_argument("--max-steps", type=int, required=True)
    sweep.add_argument("--num-cpus", type=int, default=0)
    sweep.add_argument("--work", required=True, help="folder for the sweep's MLflow store and runs")
    sweep.set_defaults(func=run_sweep)

    summary = commands.add_parser("summary", help="the table of recorded figures")
    summary.set_defaults(func=run_summary)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
