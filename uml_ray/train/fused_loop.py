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

import contextlib
import functools

import torch

from uml_ray.data.streams import BatchStream
from uml_ray.models.fused import FusedSharedHead, fused_loss
from uml_ray.train.common import member_means, setup_worker, tally_members, warmup_cosine
from uml_ray.train.folds import evaluate_folds, fold_means, fold_members, fold_streams
from uml_ray.train.fused_optim import MemberAdamW, clip_member_grad_norms
from uml_ray.train.loop import aux_class_means, build_head, init_head_from_text, to_tensors
from uml_ray.train.plan import DatasetFacts, RunPlan
from uml_ray.train.skeleton import Halving, Members, run_loop

# per-member settings a fused trial can hold; ``train.alpha`` stands for every
# ``train.alpha.<modality>``
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
        tally_members(totals, model.logits(model.target, features), labels)
    totals = ctx.all_reduce(totals)
    model.train()
    return member_means(totals)


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
        model = build_head(cfg, {m: dataset.dims[m] for m in [target] + active}, target, len(classes))
        model.to(ctx.device)
        if cfg.model.head_init == "text" and active:
            key = tuple(active)
            if key not in means:
                means[key] = aux_class_means(
                    train_streams[active[0]], model.projections[active[0]], len(classes), ctx
                )
            init_head_from_text(model, *means[key])
        models.append(model)
    return FusedSharedHead.from_members(models, modalities)


class Fused:
    """The fused regime on one worker: K configs (``plan.cfg`` with each member's dotted overrides)
    as one ``FusedSharedHead`` with a per-member AdamW, drawing every step's batches once.

    With ``train.select_folds=k`` every config trains as k fold members side by side
    (``train/folds.py``): the model stacks ``k × K`` members, fold-major, and the loop still sees
    K configs, each validated, stopped, pruned and tested on its fold members' pooled numbers."""

    layout = Members

    def __init__(self, plan: RunPlan, members: list[dict], ctx, closing: contextlib.ExitStack):
        member_plans = [plan.with_params(overrides) for overrides in members]
        self.configs = cfgs = [p.cfg for p in member_plans]
        _check_fusable(cfgs, plan.dataset)
        cfg = cfgs[0]  # every structural setting is the same in all members
        dataset = plan.dataset
        self.members, self.ctx = members, ctx
        self.target, auxiliary = dataset.target, list(dataset.auxiliary)
        alphas = [p.alpha() for p in member_plans]
        self.actives = [[m for m in auxiliary if a[m] > 0.0] for a in alphas]
        used = [m for m in auxiliary if any(m in active for active in self.actives)]
        # the batches are drawn once for all members: an auxiliary stream when any member trains on it
        stream_plan = member_plans[0].with_params(
            {f"train.alpha.{m}": 1.0 if m in used else 0.0 for m in auxiliary}
        )
        _, self.streams, stream = setup_worker(stream_plan, ctx, closing)
        self.val_stream = stream(self.target, "val", cfg.train.batch_size)
        self.test_stream = stream(self.target, "test", cfg.train.batch_size)
        self.folds = max(cfg.train.select_folds, 1)
        if self.folds > 1:  # the target's train+val pool in k folds: each fold group its own batches
            self.streams[self.target], self.val_folds, self.val_rows = fold_streams(
                plan.with_params(members[0]), ctx, closing, cfg.train.batch_size
            )

        model = _build_members(cfgs, self.actives, dataset, self.streams, ctx, [self.target] + used)
        # a config's fold members start alike (fold-major: member f * K + c is config c on fold f)
        self.model = model if self.folds == 1 else model.subset(list(range(len(cfgs))) * self.folds)
        # torch's fused AdamW kernel: one pass over memory per member instead of ~10 (2.5x faster
        # on CPU), equal to torch.optim.AdamW to float rounding
        self.optimizer = MemberAdamW(
            self.model.parameters(),
            [c.train.lr for c in cfgs] * self.folds,
            [c.train.weight_decay for c in cfgs] * self.folds,
            fused=True,
        )
        self.schedule = warmup_cosine(cfg.train.warmup_steps, cfg.train.max_steps)
        self.all_alpha = {m: torch.tensor([a[m] for a in alphas], device=ctx.device) for m in used}
        self.all_clip = torch.tensor([c.train.grad_clip for c in cfgs], device=ctx.device)
        self.live = list(range(len(members)))
        self.compact()
        self.model.train()

    def compact(self) -> None:
        """The live members' settings, the model as stepped, and their loss sums, zeroed."""
        # per stacked member: its config's settings (fold-major: the live configs once per fold)
        index = torch.tensor(self.live * self.folds, dtype=torch.long, device=self.ctx.device)
        self.alpha = {m: values[index] for m, values in self.all_alpha.items()}
        self.clip = self.all_clip[index]
        self.clipping = any(self.configs[k].train.grad_clip > 0 for k in self.live)
        self.trained = self.ctx.wrap(self.model)
        # per-member loss sums stay on the device: no host sync per step
        self.losses = {
            name: torch.zeros(len(self.live) * self.folds, dtype=torch.float64, device=self.ctx.device)
            for name in ["total"] + list(self.streams)
        }
        self.since = 0

    def initialise(self) -> None:
        """Nothing more: every member's head was initialised when it was built."""

    def step(self, step: int) -> None:
        """One step of every live member on the same batches."""
        features, labels = {}, {}
        for name, batches in self.streams.items():
            features[name], labels[name] = to_tensors(batches.next(), self.ctx.device)
        loss, totals, parts = fused_loss(self.trained(features), labels, self.target, self.alpha)
        self.model.recycle_grads()
        loss.backward()
        if self.clipping:
            clip_member_grad_norms(self.model.parameters(), self.clip)
        self.optimizer.step(self.schedule(step))
        self.since += 1
        self.losses["total"] += totals.double()
        for name, value in parts.items():
            self.losses[name] += value.double()

    def validate(self) -> tuple[list[float], list[float]]:
        """Every live member's val accuracy and CE (with folds: each config's, pooled over its folds)."""
        if self.folds > 1:
            return evaluate_folds(self.model, self.val_folds, self.ctx)
        return evaluate_members(self.model, self.val_stream, self.ctx)

    def train_metrics(self, step: int) -> list[dict]:
        """Per live member: its index, lr and train-loss means (its active modalities only)."""
        lrs = self.optimizer.current_lr(self.schedule(step)).tolist()
        sums = {name: values.tolist() for name, values in self.losses.items()}
        if self.folds > 1:  # a config's train losses: the mean of its fold members'
            lrs = lrs[: len(self.live)]
            sums = {name: fold_means(values, self.folds) for name, values in sums.items()}
        epoch = self.streams[self.target].epoch
        metrics = [
            {
                "member": k,
                "pruned": 0,
                "epoch": epoch,
                "lr": lrs[position],
                "train_loss": sums["total"][position] / self.since,
                **{
                    f"train_loss_{m}": sums[m][position] / self.since for m in [self.target] + self.actives[k]
                },
            }
            for position, k in enumerate(self.live)
        ]
        self.losses = {name: torch.zeros_like(values) for name, values in self.losses.items()}
        self.since = 0
        return metrics

    def weights(self, position: int) -> dict | list[dict]:
        """One live member's weights, as its config trained alone holds them; with folds, the list
        of its fold members' (fold 0 first)."""
        if self.folds > 1:
            members = fold_members([position], self.folds, len(self.live))
            return [self.model.member_state_dict(m) for m in members]
        return self.model.member_state_dict(position)

    def test(self, positions: list[int], weights: list) -> list[dict]:
        """Test accuracy and CE of the members at ``positions`` with ``weights``, in one batched pass;
        with folds, the mean over each config's fold members, and each fold's accuracy."""
        if self.folds > 1:
            weights = [folds[f] for f in range(self.folds) for folds in weights]  # fold-major
            positions = fold_members(positions, self.folds, len(self.live))
        tester = self.model.subset(positions)
        for position, member_weights in enumerate(weights):
            tester.load_member_state_dict(position, member_weights)
        test_acc, test_loss = evaluate_members(tester, self.test_stream, self.ctx)
        if self.folds == 1:
            return [{"test_acc": acc, "test_loss": loss} for acc, loss in zip(test_acc, test_loss)]
        configs = len(test_acc) // self.folds
        return [
            {
                "test_acc": mean_acc,
                "test_loss": mean_loss,
                **{f"test_acc_fold{f}": test_acc[f * configs + c] for f in range(self.folds)},
            }
            for c, (mean_acc, mean_loss) in enumerate(
                zip(fold_means(test_acc, self.folds), fold_means(test_loss, self.folds))
            )
        ]

    def select(self, positions: list[int]) -> None:
        """Shrink the model and optimizer to the members at ``positions``: their compute is freed."""
        members = fold_members(positions, self.folds, len(self.live))
        self.model.select(members)
        self.optimizer.select(members, self.model.parameters())
        self.live = [self.live[p] for p in positions]
        self.compact()

    def state_dict(self) -> dict:
        """The stacked model and optimizer of the live members, and the members' overrides."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "members": self.members,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume the live members of ``state``; refused when it was written for other members."""
        if state["members"] != self.members:
            raise ValueError(
                "the checkpoint was written by a fused trial with other members; it cannot resume this one"
            )
        self.select(state["live"])  # the model holds every member here: positions are member indices
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def train_fused(
    plan: RunPlan, members: list[dict], ctx, rungs: list[int] | None = None, reduction_factor: int = 2
) -> dict:
    """Train K configs (``plan.cfg`` with each member's dotted overrides) as one fused model;
    returns the final metrics.

    Reports at each validation ``{"step", "best_val_acc" (over members), "live", "members": [one
    dict per member with train_supervised's metric names plus "member" and "pruned"]}``; a
    member's dict is fresh when its ``step`` equals the report's, else it is that member's final
    one (stopped on patience, completed, or pruned). Checkpoints (every ``train.checkpoint_every``
    validations and at the end) carry the full loop state and ``best = {"members": {k: the best-val
    product train_supervised writes}}``. ``rungs`` are validation counts at which successive
    halving keeps the best ``ceil(live / reduction_factor)`` members.
    """
    halving = Halving(rungs, reduction_factor) if rungs else None
    return run_loop(plan, ctx, functools.partial(Fused, plan, members, ctx), halving)
