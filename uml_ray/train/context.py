"""The loop's view of where it runs: ``LoopContext`` and its three implementations.

The training loop (``skeleton.run_loop``) and the regimes it runs (supervised, fine-tuning,
sequence, fused) touch Ray only through a context:

- ``InlineContext``: a one-worker run inside a Ray Tune function trial;
- ``TrainWorkerContext``: one Ray Train worker of a ``TorchTrainer`` (DDP, gloo on CPU, NCCL on GPU);
- ``LocalContext``: no Ray at all — shards read with pyarrow, checkpoints kept in memory (tests, notebooks).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from typing import Protocol

import pyarrow as pa
import torch

from uml_ray.data.streams import TableSource, read_table
from uml_ray.train.checkpoints import BEST, restore_state, write_checkpoint
from uml_ray.train.plan import RunPlan

# a line for the console, carried in the next report: a trial's own prints reach only Ray's logs
NOTICE_KEY = "notice"


class BatchSource(Protocol):
    """The slice of a Ray Data ``DataIterator`` the streams use."""

    def iter_batches(self, batch_size=None, batch_format="pyarrow", **options) -> Iterator[pa.Table]: ...


class LoopContext(Protocol):
    """Everything a loop needs from the process it runs in."""

    rank: int
    world_size: int
    device: torch.device

    def source(self, name: str) -> BatchSource:
        """This worker's view of dataset ``name`` (``modality.split``)."""

    def restore(self) -> dict | None:
        """The latest checkpoint's loop state, or None for a fresh run."""

    def wrap(self, model, find_unused_parameters: bool = False):
        """The model as trained (DDP across workers)."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over workers."""

    def all_gather(self, value) -> list:
        """Every worker's ``value``, in rank order."""

    def report(self, metrics: dict, state: dict | None = None, best: dict | None = None) -> None:
        """Metrics of one validation; a checkpoint too when ``state`` is given."""


def with_notices(metrics: dict, notices: list[str]) -> dict:
    """``metrics`` with the lines held for the console (``NOTICE_KEY``), which are then cleared."""
    if not notices:
        return metrics
    metrics = {**metrics, NOTICE_KEY: "; ".join(notices)}
    notices.clear()
    return metrics


def _device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class _SingleWorker:
    """Collectives of a one-worker run: identities."""

    rank = 0
    world_size = 1

    def wrap(self, model, find_unused_parameters: bool = False):
        return model

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, value) -> list:
        return [value]


class Replay:
    """What a trial has reported, kept across its in-process retries (``driver/retry.py``). A retry
    resumes from the last checkpoint and recomputes the validations after it, which Tune has counted
    already (ASHA's clock is the report count; MLflow has their steps): those are not reported again.
    ``notes`` go with every report after a retry (its count and error, for the driver's line)."""

    def __init__(self):
        self.step = -1
        self.notes: dict = {}


class InlineContext(_SingleWorker):
    """A one-worker run inside a Tune function trial; ``sources`` are built by the runner."""

    def __init__(self, sources: dict, use_gpu: bool, replay: Replay | None = None):
        self.sources = sources
        self.device = _device(use_gpu)
        self.replay = replay or Replay()
        self.notices: list[str] = []

    def source(self, name: str) -> BatchSource:
        return self.sources[name]

    def restore(self) -> dict | None:
        import ray.tune

        checkpoint = ray.tune.get_checkpoint()
        return None if checkpoint is None else restore_state(checkpoint, self.notices)

    def report(self, metrics: dict, state: dict | None = None, best: dict | None = None) -> None:
        import ray.tune

        step = metrics.get("step", self.replay.step + 1)
        if state is None and step <= self.replay.step:
            return
        metrics = with_notices({**metrics, **self.replay.notes}, self.notices)
        if state is None:
            ray.tune.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as folder:
                write_checkpoint(folder, state, best)
                ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))
        self.replay.step = step


class Interrupted(Exception):
    """Raised by a ``LocalContext`` after ``fail_after`` reports: a killed worker, in tests."""


class LocalContext(_SingleWorker):
    """A one-worker run without Ray: shards read with pyarrow, checkpoints and reports kept in memory.

    ``saved`` and ``best`` are a checkpoint's loop state and products to resume from. ``fail_after``
    raises ``Interrupted`` after that many reports, which is how tests simulate a killed worker.
    ``tables`` (dataset name → Arrow table) are served instead of the manifest's rows (the k-fold
    refit's train+val pool).
    """

    def __init__(
        self,
        plan: RunPlan,
        saved: dict | None = None,
        fail_after: int | None = None,
        tables: dict | None = None,
        best: dict | None = None,
    ):
        self.plan = plan
        self.tables = dict(tables or {})
        self.device = torch.device("cpu")
        self.saved = copy.deepcopy(saved)
        self.best = copy.deepcopy(best)
        self.fail_after = fail_after
        self.reports: list[dict] = []

    def source(self, name: str) -> BatchSource:
        if name in self.tables:
            return TableSource(self.tables[name])
        modality, split = name.rsplit(".", 1)
        return TableSource(
            self.plan.shape_table(name, read_table(self.plan.dataset.manifest.uris(modality, split)))
        )

    def restore(self) -> dict | None:
        return None if self.saved is None else copy.deepcopy({**self.saved, BEST: self.best})

    def report(self, metrics: dict, state: dict | None = None, best: dict | None = None) -> None:
        self.reports.append(dict(metrics))
        if state is not None:
            self.saved, self.best = copy.deepcopy(state), copy.deepcopy(best)
        if self.fail_after is not None and len(self.reports) == self.fail_after:
            raise Interrupted


class TrainWorkerContext:
    """One Ray Train worker (DDP over gloo on CPU, NCCL on GPU); in-memory shares come from the
    object store."""

    def __init__(self, plan: RunPlan):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.notices: list[str] = []
        self.plan = plan
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def source(self, name: str) -> BatchSource:
        import ray
        import ray.train

        if name in self.plan.tables:
            return TableSource(self.plan.shape_table(name, ray.get(self.plan.tables[name])))
        if name in self.plan.ray_data_streams(multi_worker=True):
            return ray.train.get_dataset_shard(name)
        return self.plan.parquet_source(name, self.rank, self.world_size)

    def restore(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return None if checkpoint is None else restore_state(checkpoint, self.notices)

    def wrap(self, model, find_unused_parameters: bool = False):
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
        )

    def all_gather(self, value) -> list:
        import torch.distributed as dist

        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        # NCCL reduces GPU tensors only; float64 sums keep accuracy counts exact
        moved = tensor.to(self.device)
        dist.all_reduce(moved)
        return moved.cpu()

    def report(self, metrics: dict, state: dict | None = None, best: dict | None = None) -> None:
        import ray.train

        metrics = with_notices(metrics, self.notices)
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0 and state is not None:
                write_checkpoint(folder, state, best)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)
