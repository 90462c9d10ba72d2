"""How one training run is placed on Ray: in the trial process, or across Ray Train workers.

The search drives every run — a single ``uml-ray train`` too — as a Ray Tune function trial
(``run_trial``). A one-worker run trains right there in the trial process (``InlineContext``: a
bare Tune trial costs seconds, a TorchTrainer tens of seconds); a multi-worker run builds a
``TorchTrainer`` whose workers run the very same loop (``TrainWorkerContext``), reporting back
to Tune through ``TuneReportCallback``. Checkpoints carry the full loop state either way.
"""

from __future__ import annotations

import os
import tempfile
import torch

from uml_ray.config import apply_overrides, config_from_dict
from uml_ray.data.format import Manifest, ModalitySpec, is_remote, join_uri
from uml_ray.data.streams import StreamSpec, build_datasets

STATE_FILE = "state.pt"
BEST_FILE = "best.pt"


def write_checkpoint(folder: str, state: dict, best: dict) -> None:
    """The full loop state (resume) and the best-val weights (the run's product) in one folder."""
    torch.save(state, os.path.join(folder, STATE_FILE))
    torch.save(best, os.path.join(folder, BEST_FILE))


def read_state(folder: str) -> dict:
    """Loop state saved by ``write_checkpoint``."""
    return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=False)


class InlineContext:
    """The loop's view of a one-worker run inside a Tune function trial."""

    rank = 0
    world_size = 1

    def __init__(self, datasets: dict, use_gpu: bool):
        self.datasets = datasets
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def iterator(self, name: str):
        return self.datasets[name].iterator()

    def restore(self) -> dict | None:
        import ray.tune

        checkpoint = ray.tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return read_state(folder)

    def wrap(self, model, find_unused_parameters: bool = False):
        return model

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, value) -> list:
        return [value]

    def report(self, metrics: dict, state: dict, best: dict) -> None:
        import ray.tune

        with tempfile.TemporaryDirectory() as folder:
            write_checkpoint(folder, state, best)
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))


class TrainWorkerContext:
    """The loop's view of one Ray Train worker (DDP over gloo on CPU, NCCL on GPU)."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def iterator(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def restore(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return read_state(folder)

    def wrap(self, model, find_unused_parameters: bool = False):
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)

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

    def report(self, metrics: dict, state: dict, best: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                write_checkpoint(folder, state, best)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)


def storage_root(storage_path: str) -> str:
    """Absolute storage root: object-store URIs as they are, local folders resolved."""
    return storage_path if is_remote(storage_path) else os.path.abspath(storage_path)


def _loop_for(regime: str):
    if regime == "sequence":
        from uml_ray.train.sequence_loop import train_sequence

        return train_sequence
    from uml_ray.train.loop import train_supervised

    return train_supervised


def _worker_entry(loop_config: dict) -> None:
    """Ray Train worker function: the regime's loop with a TrainWorkerContext."""
    loop = _loop_for(loop_config["config"]["model"]["regime"])
    plan = {name: StreamSpec(**spec) for name, spec in loop_config["plan"].items()}
    loop(loop_config["config"], plan, loop_config["dataset_info"], TrainWorkerContext())


def manifest_from_info(info: dict) -> Manifest:
    """Rebuild the Manifest carried (as plain data) to a trial."""
    modalities = {name: ModalitySpec(**spec) for name, spec in info["manifest"]["modalities"].items()}
    return Manifest(info["manifest"]["name"], info["manifest"]["classes"], info["manifest"]["target"], modalities)


def use_inline(cfg) -> bool:
    """Whether a run trains in the trial process rather than through a TorchTrainer."""
    return cfg.resources.trainer == "inline" or (cfg.resources.trainer == "auto" and cfg.resources.num_workers == 1)


def run_trial(params: dict, base: dict, plan: dict, dataset_info: dict) -> None:
    """A Ray Tune function trial: the base config with this trial's sampled params, trained once."""
    import ray.tune

    cfg = apply_overrides(config_from_dict(base), params)
    config = cfg.to_dict()
    manifest = manifest_from_info(dataset_info)
    specs = {name: StreamSpec(**spec) for name, spec in plan.items()}
    datasets = build_datasets(manifest, specs, cfg.data.aux_per_class, cfg.data.aux_class_mean, cfg.train.seed)
    loop = _loop_for(cfg.model.regime)
    use_gpu = cfg.resources.gpus_per_worker > 0
    if use_inline(cfg):
        loop(config, specs, dataset_info, InlineContext(datasets, use_gpu))
        return

    import ray.train
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    context = ray.tune.get_context()
    # cached datasets reach every worker whole (each keeps its rank's id-sorted slice, so a
    # resumed run sees the same rows); large ones are split by Ray Data's streaming_split
    to_split = [name for name, spec in specs.items() if not spec.cached]
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"config": config, "plan": plan, "dataset_info": dataset_info},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.resources.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.resources.cpus_per_worker, **({"GPU": cfg.resources.gpus_per_worker} if use_gpu else {})},
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=to_split),
        run_config=RunConfig(
            # a retried trial reuses this name, so Ray Train resumes from its latest checkpoint
            name=f"train-{context.get_trial_id()}",
            storage_path=join_uri(storage_root(base["tracking"]["storage_path"]), context.get_experiment_name()),
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
        ),
    )
    trainer.fit()
