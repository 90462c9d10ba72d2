"""Fused trials: K supervised UML configs trained at once as one batched model on the same batches.

A head-only sweep's configs differ mostly in scalars (lr, weight decay, alpha, head init); each
alone is a few tiny matmuls per step, dominated by overhead. ``train_fused`` trains K of them as
one ``FusedSharedHead`` with a per-member AdamW, drawing every step's batches once. Each member
starts from, steps, validates, stops and is tested exactly as ``train_supervised`` would run its
config alone (same seed, same batches), and successive halving at given rungs drops the worst
members so their compute is freed.

Which configs fuse: members may differ only in ``FUSABLE_KEYS``; ``fusion_key`` groups a sweep's
configs into fusable sets.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from uml_ray.data.streams import BatchStream
from uml_ray.models.fused import FusedSharedHead, fused_loss
from uml_ray.models.supervised import SharedHeadUML
from uml_ray.train.common import (
    new_progress,
    record_validation,
    rng_state,
    set_rng_state,
    setup_worker,
    validation_metrics,
    warmup_cosine,
)
from uml_ray.train.fused_optim import MemberAdamW, clip_member_grad_norms
from uml_ray.train.loop import _aux_class_means, to_tensors
from uml_ray.train.plan import DatasetFacts, RunPlan

# per-member settings a fused trial can hold; ``train.alpha`` stands for every ``train.alpha.<modality>``
FUSABLE_KEYS = (
    "train.lr",
    "train.weight_decay",
    "train.alpha",
    "train.alpha_default",
    "train.grad_clip",
    "train.patience",
    "model.head_init",
    "model.logit_scale",
)


def is_fusable(key: str) -> bool:
    """Whether a dotted config key may differ between the members of one fused trial."""
    return key in FUSABLE_KEYS or key.startswith("train.alpha.")


def resolved_shared_dim(flat_config: dict, dataset: DatasetFacts) -> int:
    """The shared width a config trains with: ``model.shared_dim``, else the first auxiliary
    modality with alpha > 0, else the target (as ``SharedHeadUML`` resolves it)."""
    if flat_config["model.shared_dim"]:
        return int(flat_config["model.shared_dim"])
    default = flat_config["train.alpha_default"]
    active = [m for m in dataset.auxiliary if flat_config.get(f"train.alpha.{m}", default) > 0]
    return dataset.dims[active[0] if active else dataset.target]


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def fusion_key(flat_config: dict, dataset: DatasetFacts) -> tuple:
    """Configs (``Config.flat()``) with equal keys can share one fused trial.

    Every non-fusable key is structural, and so is the resolved shared width: with the default
    ``model.shared_dim=0`` it follows alpha (an alpha-0 config projects into the target's own
    width), so a unimodal baseline fuses with other alpha-0 configs, not with alpha > 0 ones.
    """
    structural = tuple(
        sorted((key, _hashable(value)) for key, value in flat_config.items() if not is_fusable(key))
    )
    return structural + (("shared_dim.resolved", resolved_shared_dim(flat_config, dataset)),)


def _check_fusable(cfgs: list, dataset: DatasetFacts) -> None:
    keys = [fusion_key(c.flat(), dataset) for c in cfgs]
    for k, key in enumerate(keys):
        if key != keys[0]:
            differing = sorted(name for (name, value), (_, other) in zip(key, keys[0]) if value != other)
            raise ValueError(
                f"fused member {k} differs from member 0 in structural settings {differing}; "
                f"only {', '.join(FUSABLE_KEYS)} may differ within a fused trial"
            )


@torch.no_grad()
def evaluate_members(
    model: FusedSharedHead, stream: BatchStream, ctx, batch_size: int = 1024
) -> tuple[list[float], list[float]]:
    """Every member's target accuracy and mean CE over every row of a split, summed over workers."""
    model.eval()
    totals = torch.zeros(model.members, 3, dtype=torch.float64)
    for batch in stream.iter_once(batch_size):
        features, labels = to_tensors(batch, ctx.device)
        logits = model.logits(model.target, features)
        members, rows, classes = logits.shape
        losses = F.cross_entropy(
            logits.reshape(members * rows, classes), labels.repeat(members), reduction="none"
        )
        totals[:, 0] += (logits.argmax(2) == labels).sum(1).double().cpu()
        totals[:, 1] += losses.view(members, rows).sum(1).double().cpu()
        totals[:, 2] += rows
    totals = ctx.all_reduce(totals)
    model.train()
    count = totals[:, 2].clamp(min=1)
    return (totals[:, 0] / count).tolist(), (totals[:, 1] / count).tolist()


def _build_members(
    cfgs: list,
    actives: list[list[str]],
    dataset: DatasetFacts,
    train_streams: dict,
    ctx,
    modalities: list[str],
) -> FusedSharedHead:
    """Each member built exactly as ``train_supervised`` builds it alone, then stacked."""
    target, classes = dataset.target, dataset.classes
    means = {}  # members with the same active modalities start from the same (seeded) projection
    models = []
    for cfg, active in zip(cfgs, actives):
        torch.manual_seed(cfg.train.seed)
        dims = {m: dataset.dims[m] for m in [target] + active}
        model = SharedHeadUML(
            dims,
            target,
            len(classes),
            cfg.model.shared_dim,
            cfg.model.project_auxiliary,
            cfg.model.logit_scale,
            cfg.model.project_target,
        )
        model.to(ctx.device)
        if cfg.model.head_init == "text" and active:
            key = tuple(active)
            if key not in means:
                means[key] = _aux_class_means(
                    train_streams[active[0]], model.projections[active[0]], len(classes), ctx
                )
            sums, counts = means[key]
            present = counts > 0
            model.init_head_from_class_means(
                (sums[present] / counts[present, None]).float(), torch.arange(len(classes))[present]
            )
        models.append(model)
    return FusedSharedHead.from_members(models, modalities)


class _MemberView:
    """One member as ``record_validation`` sees a model: its alone state dict."""

    def __init__(self, model: FusedSharedHead, position: int):
        self.model, self.position = model, position

    def state_dict(self) -> dict:
        return self.model.member_state_dict(self.position)


class _Means:
    """A member's train-loss means in the shape ``validation_metrics`` takes a ``Tally``."""

    def __init__(self, means: dict[str, float]):
        self._means = means

    def means(self) -> dict[str, float]:
        return self._means


def halve(live: list[int], progress: list[dict], reduction_factor: int) -> list[int]:
    """Successive halving: the best ``ceil(len(live) / reduction_factor)`` members by best val
    accuracy (ties to lower best val loss, then lower member index), in their current order."""
    keep = math.ceil(len(live) / reduction_factor)
    ranked = sorted(live, key=lambda k: (-progress[k]["best_val_acc"], progress[k]["best_val_loss"], k))
    survivors = set(ranked[:keep])
    return [k for k in live if k in survivors]


def train_fused(
    plan: RunPlan, members: list[dict], ctx, rungs: list[int] | None = None, reduction_factor: int = 2
) -> dict:
    """Train K configs (``plan.cfg`` with each member's dotted overrides) as one fused model; returns the final metrics.

    Reports at each validation ``{"step", "best_val_acc" (over members), "live", "members": [one
    dict per member with train_supervised's metric names plus "member" and "pruned"]}``; a
    member's dict is fresh when its ``step`` equals the report's, else it is that member's final
    one (stopped on patience, completed, or pruned). Checkpoints (every ``train.checkpoint_every``
    validations and at the end) carry the full loop state and ``best = {"members": {k: the best-val
    product train_supervised writes}}``. ``rungs`` are validation counts at which successive
    halving keeps the best ``ceil(live / reduction_factor)`` members.
    """
    member_plans = [plan.with_params(overrides) for overrides in members]
    cfgs = [p.cfg for p in member_plans]
    _check_fusable(cfgs, plan.dataset)
    cfg = cfgs[0]  # every structural setting is the same in all members
    dataset = plan.dataset
    target, auxiliary = dataset.target, list(dataset.auxiliary)
    alphas = [p.alpha() for p in member_plans]
    actives = [[m for m in auxiliary if a[m] > 0.0] for a in alphas]
    used = [m for m in auxiliary if any(m in active for active in actives)]
    # the batches are drawn once for all members: an auxiliary stream when any member trains on it
    stream_plan = member_plans[0].with_params(
        {f"train.alpha.{m}": 1.0 if m in used else 0.0 for m in auxiliary}
    )
    _, train_streams, stream = setup_worker(stream_plan, ctx)
    val_stream = stream(target, "val", cfg.train.batch_size)
    test_stream = stream(target, "test", cfg.train.batch_size)

    model = _build_members(cfgs, actives, dataset, train_streams, ctx, [target] + used)
    # torch's fused AdamW kernel: one pass over memory per member instead of ~10 (2.5x faster on CPU),
    # equal to torch.optim.AdamW to float rounding
    optimizer = MemberAdamW(
        model.parameters(), [c.train.lr for c in cfgs], [c.train.weight_decay for c in cfgs], fused=True
    )
    schedule = warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps)
    all_alpha = {m: torch.tensor([a[m] for a in alphas], device=ctx.device) for m in used}
    all_clip = torch.tensor([c.train.grad_clip for c in cfgs], device=ctx.device)
    count = len(members)
    live, pruned, step, validations = list(range(count)), set(), 0, 0
    progress = [new_progress() for _ in range(count)]
    best_weights = [model.member_state_dict(k) for k in range(count)]
    results: list[dict] = [{} for _ in range(count)]
    state = ctx.restore()
    if state is not None:
        if state["members"] != members:
            raise ValueError(
                "the checkpoint was written by a fused trial with other members; it cannot resume this one"
            )
        live, pruned, step, validations = (
            state["live"],
            set(state["pruned"]),
            state["step"],
            state["validations"],
        )
        progress, best_weights, results = state["progress"], state["best_weights"], state["results"]
        model.select(live)
        optimizer.select(live, model.parameters())
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for name, position in state["streams"].items():
            train_streams[name].load_state_dict(position)
        set_rng_state(state["rng"])

    def compacted():
        index = torch.tensor(live, dtype=torch.long, device=ctx.device)
        return (
            {m: values[index] for m, values in all_alpha.items()},
            all_clip[index],
            any(cfgs[k].train.grad_clip > 0 for k in live),
            ctx.wrap(model),
        )

    alpha, clip, clipping, trained = compacted()
    model.train()
    # per-member loss sums stay on the device: no host sync per step
    losses = {
        name: torch.zeros(len(live), dtype=torch.float64, device=ctx.device)
        for name in ["total"] + list(train_streams)
    }
    since = 0
    metrics: dict = {}
    while step < cfg.train.max_steps and live:
        features, labels = {}, {}
        for name, batches in train_streams.items():
            features[name], labels[name] = to_tensors(batches.next(), ctx.device)
        loss, totals, parts = fused_loss(trained(features), labels, target, alpha)
        model.recycle_grads()
        loss.backward()
        if clipping:
            clip_member_grad_norms(model.parameters(), clip)
        optimizer.step(schedule(step))
        step += 1
        since += 1
        losses["total"] += totals.double()
        for name, value in parts.items():
            losses[name] += value.double()

        last = step == cfg.train.max_steps
        if step % cfg.train.val_every and not last:
            continue
        validations += 1
        val_acc, val_loss = evaluate_members(model, val_stream, ctx)
        lrs = optimizer.current_lr(schedule(step)).tolist()
        sums = {name: values.tolist() for name, values in losses.items()}
        finished, stopped = [], set()
        for position, k in enumerate(live):
            progress[k]["step"] = step
            best_weights[k], stop = record_validation(
                progress[k],
                val_acc[position],
                val_loss[position],
                _MemberView(model, position),
                best_weights[k],
                cfgs[k].train.patience,
            )
            means = {
                "train_loss": sums["total"][position] / since,
                **{f"train_loss_{m}": sums[m][position] / since for m in [target] + actives[k]},
            }
            results[k] = {
                "member": k,
                "pruned": 0,
                **validation_metrics(
                    progress[k],
                    lrs[position],
                    val_acc[position],
                    val_loss[position],
                    _Means(means),
                    epoch=train_streams[target].epoch,
                ),
            }
            if stop or last:
                finished.append(k)
                if stop:
                    stopped.add(k)
        if finished:
            # each member's score is its own best-val point, as alone
            tester = model.subset([live.index(k) for k in finished])
            for position, k in enumerate(finished):
                tester.load_member_state_dict(position, best_weights[k])
            test_acc, test_loss = evaluate_members(tester, test_stream, ctx)
            for position, k in enumerate(finished):
                results[k].update(
                    test_acc=test_acc[position],
                    test_loss=test_loss[position],
                    stopped_early=int(k in stopped),
                    completed=1,
                )
        remaining = [k for k in live if k not in finished]
        if rungs and validations in rungs and remaining:
            survivors = halve(remaining, progress, reduction_factor)
            for k in remaining:
                if k not in survivors:
                    results[k]["pruned"] = 1
                    pruned.add(k)
            remaining = survivors
        if remaining != live:
            positions = [live.index(k) for k in remaining]
            model.select(positions)
            optimizer.select(positions, model.parameters())
            live = remaining
            alpha, clip, clipping, trained = compacted()
        losses = {name: torch.zeros(len(live), dtype=torch.float64, device=ctx.device) for name in losses}
        since = 0

        metrics = {
            "step": step,
            "best_val_acc": max(p["best_val_acc"] for p in progress),
            "live": len(live),
            "members": [dict(r) for r in results],
        }
        if not live or last or validations % cfg.train.checkpoint_every == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "streams": {name: s.state_dict() for name, s in train_streams.items()},
                "members": members,
                "live": list(live),
                "pruned": sorted(pruned),
                "step": step,
                "validations": validations,
                "progress": copy.deepcopy(progress),
                "best_weights": best_weights,
                "results": copy.deepcopy(results),
                "rng": rng_state(),
                "config": plan.cfg.to_dict(),
            }
            summary = dataset.summary()
            best = {
                "members": {
                    k: {
                        "model": best_weights[k],
                        "config": cfgs[k].to_dict(),
                        "dataset": summary,
                        "val_acc": progress[k]["best_val_acc"],
                        "step": progress[k]["best_step"],
                    }
                    for k in range(count)
                }
            }
            ctx.report(metrics, state, best)
        else:
            ctx.report(metrics)
    return metrics
