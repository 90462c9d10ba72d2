"""How one training run is placed on Ray: in the trial process, or across Ray Train workers.

The driver runs every run — a single ``uml-ray train`` too — as a Ray Tune function trial
(``run_trial``). A one-worker run trains right there in the trial process (``InlineContext``: a
bare Tune trial costs seconds, a TorchTrainer tens of seconds); a multi-worker run builds a
``TorchTrainer`` whose workers run the very same loop (``TrainWorkerContext``), reporting back
to Tune through ``TuneReportCallback``. In-memory shares reach both from the object store; datasets
too large for memory stream by pyarrow (each worker its own row range) or through Ray Data.
"""

from __future__ import annotations

from uml_ray.data.ray_streams import build_streamed_datasets
from uml_ray.data.streams import TableSource
from uml_ray.train.context import InlineContext, Replay, TrainWorkerContext
from uml_ray.train.plan import RunPlan
from uml_ray.uri import absolute, join_uri


def loop_for(regime: str):
    """The training loop of a regime."""
    if regime == "sequence":
        from uml_ray.train.sequence_loop import train_sequence

        return train_sequence
    from uml_ray.train.loop import train_supervised

    return train_supervised


def use_inline(cfg) -> bool:
    """Whether a run trains in the trial process rather than through a TorchTrainer."""
    return cfg.resources.trainer == "inline" or (
        cfg.resources.trainer == "auto" and cfg.resources.num_workers == 1
    )


def _worker_entry(loop_config: dict) -> None:
    """Ray Train worker function: the regime's loop with a TrainWorkerContext."""
    plan = loop_config["plan"]
    loop_for(plan.cfg.model.regime)(plan, TrainWorkerContext(plan))


def _streamed(plan: RunPlan, names: list[str]) -> dict:
    """Ray Data datasets of the streamed shares ``names``."""
    cfg = plan.cfg
    streams = {name: spec for name, spec in plan.streams.items() if name in names}
    return build_streamed_datasets(
        plan.dataset.manifest, streams, cfg.data.aux_per_class, cfg.data.aux_class_mean, cfg.train.seed
    )


def _inline_context(plan: RunPlan, replay: Replay | None = None) -> InlineContext:
    """A one-process run's sources: in-memory shares from the object store, streamed ones by pyarrow
    or Ray Data as ``RunPlan.ray_data_streams`` says; ``replay``: what the trial reported before a retry."""
    import ray

    sources = {name: TableSource(plan.shape_table(name, ray.get(ref))) for name, ref in plan.tables.items()}
    through_ray_data = plan.ray_data_streams(multi_worker=False)
    sources.update(
        {
            name: plan.parquet_source(name)
            for name, spec in plan.streams.items()
            if not spec.cached and name not in through_ray_data
        }
    )
    if through_ray_data:
        sources.update({name: ds.iterator() for name, ds in _streamed(plan, through_ray_data).items()})
    return InlineContext(sources, plan.cfg.resources.gpus_per_worker > 0, replay)


def run_fused_trial(
    plan: RunPlan, members: list[dict], rungs: list[int], reduction_factor: int, replay: Replay | None = None
) -> None:
    """A Ray Tune function trial training ``members`` (dotted overrides of ``plan``) as one fused
    model, in the trial process."""
    from uml_ray.train.fused_loop import train_fused

    # members share every structural setting (data.*, train.seed): the first one's plan shapes the tables
    train_fused(plan, members, _inline_context(plan.with_params(members[0]), replay), rungs, reduction_factor)


def run_trial(plan: RunPlan, replay: Replay | None = None) -> None:
    """A Ray Tune function trial: one run of ``plan`` (its sampled params already applied);
    ``replay``: what a trial trained in its process reported before a retry."""
    import ray
    import ray.tune

    cfg = plan.cfg
    loop = loop_for(cfg.model.regime)
    use_gpu = cfg.resources.gpus_per_worker > 0
    if use_inline(cfg):
        loop(plan, _inline_context(plan, replay))
        return

    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    context = ray.tune.get_context()
    # in-memory shares reach every worker whole from the object store (each keeps its rank's
    # id-sorted slice, so a resumed run sees the same rows); large ones are read by each worker's
    # own pyarrow reader (its row range), or split by Ray Data (RunPlan.ray_data_streams)
    streamed = _streamed(plan, plan.ray_data_streams(multi_worker=True))
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"plan": plan},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.resources.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": cfg.resources.cpus_per_worker,
                **({"GPU": cfg.resources.gpus_per_worker} if use_gpu else {}),
            },
        ),
        datasets=streamed or None,
        dataset_config=DataConfig(datasets_to_split=list(streamed)),
        run_config=RunConfig(
            # a retried trial reuses this name, so Ray Train resumes from its latest checkpoint
            name=f"train-{context.get_trial_id()}",
            storage_path=join_uri(absolute(cfg.tracking.storage_path), context.get_experiment_name()),
            callbacks=[TuneReportCallback()],
            # resume needs the latest checkpoint only; the best-val weights travel inside it
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
        ),
    )
    trainer.fit()
