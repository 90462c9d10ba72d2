"""Fused trials without Ray: K configs as one batched model equal each config trained alone;
the per-member AdamW equals torch's; halving inside a trial; exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import write_config

from uml_ray.config import load_config
from uml_ray.driver.plan import build_plan
from uml_ray.models.fused import FusedSharedHead, fused_loss
from uml_ray.models.supervised import SharedHeadUML, uml_loss
from uml_ray.train.common import warmup_cosine
from uml_ray.train.context import Interrupted, LocalContext
from uml_ray.train.fused_loop import fusion_key, train_fused
from uml_ray.train.fused_optim import MemberAdamW, clip_member_grad_norms
from uml_ray.train.loop import train_supervised

# one of each kind: the unimodal baseline, a text-initialised head, a learnable logit scale with
# clipping, early stopping on patience, and plain members at other lr / wd / alpha
MEMBERS = [
    {"train.lr": 0.01, "train.weight_decay": 0.0, "train.alpha.text": 0.0, "model.head_init": "text"},
    {"train.lr": 0.003, "train.weight_decay": 0.01, "train.alpha.text": 0.5, "model.head_init": "text"},
    {"train.lr": 0.02, "train.weight_decay": 0.1, "train.alpha.text": 1.5, "model.head_init": "random"},
    {
        "train.lr": 0.005,
        "train.weight_decay": 0.001,
        "train.alpha.text": 1.0,
        "model.logit_scale": True,
        "train.grad_clip": 0.5,
    },
    {"train.lr": 0.05, "train.weight_decay": 0.0, "train.alpha.text": 0.7, "train.patience": 1},
]
COMPARED = (
    "val_acc",
    "val_loss",
    "best_val_acc",
    "best_val_loss",
    "best_step",
    "lr",
    "train_loss",
    "train_loss_image",
    "train_loss_text",
    "test_acc",
    "test_loss",
    "stopped_early",
    "completed",
)


@pytest.fixture(scope="module")
def plan(synthetic_manifest, tmp_path_factory):
    """A 120-step run validating every 20 steps, a checkpoint at every 2nd validation."""
    workdir = tmp_path_factory.mktemp("fused")
    cfg = load_config(
        write_config(
            workdir / "c.yaml",
            synthetic_manifest,
            workdir,
            train={"max_steps": 120, "val_every": 20, "checkpoint_every": 2},
        )
    )
    return build_plan(cfg)


def run_alone(plan, overrides: dict) -> LocalContext:
    member_plan = plan.with_params(overrides)
    ctx = LocalContext(member_plan)
    train_supervised(member_plan, ctx)
    return ctx


def run_fused(plan, members, **options) -> LocalContext:
    ctx = LocalContext(plan)
    train_fused(plan, members, ctx, **options)
    return ctx


class CheckpointShapes(LocalContext):
    """Records, at each checkpoint, the member count of the stacked head, projection and moments,
    and the live members."""

    def __init__(self, plan):
        super().__init__(plan)
        self.shapes = []

    def report(self, metrics, state=None, best=None):
        self.shapes.append(
            (
                state["model"]["head"].shape[0],
                state["model"]["projections.image"].shape[0],
                state["optimizer"]["exp_avg"][0].shape[0],
                state["live"],
            )
        )
        super().report(metrics, state, best)


def test_fused_members_equal_their_alone_runs(plan):
    fused = run_fused(plan, MEMBERS)
    by_step = {r["step"]: r for r in fused.reports}
    assert [r["step"] for r in fused.reports] == [20, 40, 60, 80, 100, 120]
    for k, overrides in enumerate(MEMBERS):
        alone = run_alone(plan, overrides)
        for report in alone.reports:  # every validation of the alone run, at the same step
            member = by_step[report["step"]]["members"][k]
            assert member["member"] == k and member["pruned"] == 0 and member["step"] == report["step"]
            assert set(report) | {"member", "pruned"} == set(member), k
            for name in COMPARED:
                if name in report:
                    assert member[name] == pytest.approx(report[name], abs=1e-4), (k, report["step"], name)
        # a member that stopped early keeps its final metrics in every later report
        final = alone.reports[-1]
        assert fused.reports[-1]["members"][k]["step"] == final["step"]
        assert fused.reports[-1]["members"][k]["test_acc"] == pytest.approx(final["test_acc"], abs=1e-4)
        # the best-val product loads into the alone model and holds the same weights
        best = fused.best["members"][k]
        assert best["config"] == alone.best["config"] and best["step"] == alone.best["step"]
        assert set(best["model"]) == set(alone.best["model"])
        for name, weight in alone.best["model"].items():
            torch.testing.assert_close(
                best["model"][name], weight, atol=1e-5, rtol=0, msg=f"member {k} {name}"
            )
    stopped = [m for m in fused.reports[-1]["members"] if m["stopped_early"]]
    assert [m["member"] for m in stopped] == [4]  # patience 1 stops the lr 0.05 member; the others complete
    assert fused.reports[-1]["best_val_acc"] == max(m["best_val_acc"] for m in fused.reports[-1]["members"])
    # the alpha-0 member trains without text: no text loss, no text projection in its product
    assert "train_loss_text" not in fused.reports[-1]["members"][0]


def test_structural_differences_are_refused_and_keyed(plan):
    with pytest.raises(
        ValueError, match=r"member 1 differs from member 0 in structural settings \['train.batch_size'\]"
    ):
        train_fused(
            plan, [{"train.lr": 0.01}, {"train.lr": 0.01, "train.batch_size": 16}], LocalContext(plan)
        )
    flat = plan.cfg.flat()
    assert fusion_key({**flat, "train.lr": 0.5, "train.alpha_default": 0.3}, plan.dataset) == fusion_key(
        flat, plan.dataset
    )
    assert fusion_key({**flat, "train.seed": 1}, plan.dataset) != fusion_key(flat, plan.dataset)
    # the default shared width follows alpha: a unimodal 64-d target keys apart from a 32-d text space
    wide = {**plan.dataset.dims, "image": 64}
    dataset = type("Facts", (), {"target": "image", "auxiliary": ("text",), "dims": wide})()
    assert fusion_key({**flat, "train.alpha_default": 0.0}, dataset) != fusion_key(
        {**flat, "train.alpha_default": 1.0}, dataset
    )


def test_halving_keeps_the_best_members_and_shrinks_the_model(plan):
    members = [
        {"train.lr": lr, "train.alpha.text": alpha} for lr in (0.001, 0.01, 0.03, 0.1) for alpha in (0.0, 1.0)
    ]
    ctx = CheckpointShapes(plan.with_params({"train.checkpoint_every": 1}))
    train_fused(ctx.plan, members, ctx, rungs=[1, 2], reduction_factor=2)
    assert [r["live"] for r in ctx.reports] == [4, 2, 2, 2, 2, 0]
    first, second = ctx.reports[0]["members"], ctx.reports[1]["members"]

    def best(ranked, keep):
        return sorted(
            sorted(ranked, key=lambda m: (-m["best_val_acc"], m["best_val_loss"], m["member"]))[:keep],
            key=lambda m: m["member"],
        )

    kept = [m["member"] for m in best(first, 4)]
    assert [m["member"] for m in first if not m["pruned"]] == kept
    survivors = [m["member"] for m in best([second[k] for k in kept], 2)]
    assert [m["member"] for m in ctx.reports[-1]["members"] if not m["pruned"]] == survivors
    # a pruned member's metrics are final: reported unchanged from its pruning on
    for report in ctx.reports[1:]:
        for k in range(8):
            if k not in kept:
                assert report["members"][k] == first[k]
    assert all(m["completed"] == 1 for m in ctx.reports[-1]["members"] if m["member"] in survivors)
    assert all("test_acc" not in m for m in ctx.reports[-1]["members"] if m["pruned"])
    # the compute shrinks: the stacked tensors (model and optimizer) hold the live members only
    assert ctx.shapes == [(4, 4, 4, kept)] + [(2, 2, 2, survivors)] * 4 + [(0, 0, 0, [])]
    # and the survivors train exactly as they do unpruned
    whole = run_fused(plan, members)
    for k in survivors:
        for name in COMPARED:
            assert ctx.reports[-1]["members"][k][name] == pytest.approx(
                whole.reports[-1]["members"][k][name], rel=1e-5, abs=1e-6
            )


def test_resumed_fused_trial_continues_exactly(plan):
    # checkpoints at validations 2 and 4; killed after the 3rd report, the trial resumes from
    # step 40 with 2 of 4 members live (halved at validation 1) and replays the rest bit for bit
    members = MEMBERS[:4]
    whole = run_fused(plan, members, rungs=[1])
    first = LocalContext(plan, fail_after=3)
    with pytest.raises(Interrupted):
        train_fused(plan, members, first, rungs=[1])
    assert first.saved["step"] == 40 and len(first.saved["live"]) == 2
    second = LocalContext(plan, saved=first.saved)
    train_fused(plan, members, second, rungs=[1])
    assert [r["step"] for r in second.reports] == [60, 80, 100, 120]
    assert second.reports == whole.reports[2:]
    for name, weight in whole.saved["model"].items():
        assert torch.equal(weight, second.saved["model"][name]), name


@pytest.mark.parametrize("mode", [{"fused": False}, {"fused": True}, {"per_member": False}])
def test_member_adamw_equals_torch_adamw_per_member(mode):
    torch.manual_seed(0)
    lrs, wds = [1e-3, 3e-2, 5e-4, 1e-2], [0.0, 0.01, 0.1, 1e-3]
    shapes = [(4, 7, 5), (4, 3)]
    start = [torch.randn(shape) for shape in shapes]
    alone = [[p[k].clone().requires_grad_() for p in start] for k in range(4)]
    optimizers = [
        torch.optim.AdamW(alone[k], lr=lrs[k], weight_decay=wds[k], fused=mode.get("fused", False))
        for k in range(4)
    ]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(2, 12)) for o in optimizers]
    fused = [p.clone() for p in start]
    optimizer = MemberAdamW(fused, lrs, wds, **mode)
    factor = warmup_cosine(2, 12)
    members = [0, 1, 2, 3]
    for step in range(12):
        if step == 6:  # drop members 1 and 3; the rest continue from a saved and reloaded state
            members = [2, 0]
            fused[:] = [p[members] for p in fused]
            optimizer.select(members, fused)
            saved = optimizer.state_dict()
            optimizer = MemberAdamW(fused, [0.0, 0.0], [0.0, 0.0], **mode)
            optimizer.load_state_dict(saved)
        grads = [torch.randn(shape) for shape in shapes]
        for k in members:
            for param, grad in zip(alone[k], grads):
                param.grad = grad[k].clone()
            optimizers[k].step()
            schedules[k].step()
        for param, grad in zip(fused, grads):
            param.grad = grad[members].clone()
        optimizer.step(factor(step))
        for position, k in enumerate(members):
            assert optimizer.current_lr(factor(step + 1))[position].item() == schedules[k].get_last_lr()[0]
            for param, reference in zip(fused, alone[k]):  # bit for bit on CPU, in every mode
                torch.testing.assert_close(param[position], reference.detach(), rtol=0, atol=0)


def test_member_grad_clipping_equals_torch_per_member():
    torch.manual_seed(1)
    grads = [torch.randn(3, 5, 4) * 3, torch.randn(3, 6)]
    params = [torch.zeros_like(g) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    norms = clip_member_grad_norms(params, torch.tensor([1.0, 0.0, 100.0]))
    for k, max_norm in enumerate([1.0, 0.0, 100.0]):
        alone = [torch.zeros_like(g[k]) for g in grads]
        for param, grad in zip(alone, grads):
            param.grad = grad[k].clone()
        expected = torch.nn.utils.clip_grad_norm_(alone, max_norm) if max_norm > 0 else None
        if expected is not None:
            torch.testing.assert_close(norms[k], expected)
        for param, reference in zip(params, alone):
            torch.testing.assert_close(param.grad[k], reference.grad)
    assert norms[0] > 1.0 and torch.linalg.vector_norm(
        torch.cat([p.grad[0].flatten() for p in params])
    ) == pytest.approx(1.0, rel=1e-5)


def test_fused_head_logits_loss_and_products_equal_the_members():
    dims = {"image": 12, "text": 8, "audio": 6}
    members = []
    for k, (modalities, scale) in enumerate(
        [(("image",), False), (("image", "text", "audio"), True), (("image", "audio"), False)]
    ):
        torch.manual_seed(k)
        members.append(
            SharedHeadUML(
                {m: dims[m] for m in modalities}, "image", 5, 8, project_auxiliary=True, logit_scale=scale
            )
        )
    with torch.no_grad():
        members[1].log_scales["text"].fill_(0.3)
    fused = FusedSharedHead.from_members(members, ["image", "text", "audio"])
    batch = {m: torch.randn(7, d) for m, d in dims.items()}
    labels = {m: torch.randint(0, 5, (7,)) for m in dims}
    logits = fused(batch)
    alpha = {"text": torch.tensor([0.0, 0.5, 0.0]), "audio": torch.tensor([0.0, 2.0, 1.0])}
    total, per_member, parts = fused_loss(logits, labels, "image", alpha)
    total.backward()
    for k, model in enumerate(members):
        used = {m: batch[m] for m in model.projections}
        alone = model(used)
        for name, value in alone.items():
            torch.testing.assert_close(logits[name][k], value, rtol=1e-5, atol=1e-6)
        loss, alone_parts = uml_loss(
            alone,
            {m: labels[m] for m in used},
            "image",
            {m: float(alpha[m][k]) for m in used if m != "image"},
        )
        assert per_member[k].item() == pytest.approx(loss.item(), rel=1e-5)
        assert parts["image"][k].item() == pytest.approx(alone_parts["image"], rel=1e-5)
        loss.backward()
        fused_grads = {
            "head.weight": fused.head.grad[k],
            **{f"projections.{m}.weight": fused.projections[m].grad[k] for m in model.projections},
        }
        for name, param in model.named_parameters():
            if name in fused_grads:
                torch.testing.assert_close(fused_grads[name], param.grad, rtol=1e-5, atol=1e-6)
        # the product loads into the alone model as it is
        model.load_state_dict(fused.member_state_dict(k), strict=True)
    # slices a member lacks receive no gradient (member 0 has no text/audio; member 2 no scale)
    assert (
        fused.projections["text"].grad[0].abs().max() == 0 and fused.log_scales.grad[[0, 2]].abs().max() == 0
    )
    # a second backward after recycle_grads writes the same gradients into the same buffers
    # (autograd adopts a buffer only when nothing else refers to it: not even a view of it)
    del fused_grads
    first_grads = {name: param.grad.clone() for name, param in fused.named_parameters()}
    buffers = {name: weight.grad.data_ptr() for name, weight in fused.projections.items()}
    fused.recycle_grads()
    assert all(param.grad is None for param in fused.parameters())
    fused_loss(fused(batch), labels, "image", alpha)[0].backward()
    assert {name: weight.grad.data_ptr() for name, weight in fused.projections.items()} == buffers
    for name, param in fused.named_parameters():
        assert torch.equal(param.grad, first_grads[name]), name
    subset = fused.subset([1])
    torch.testing.assert_close(subset(batch)["text"][0], logits["text"][1].detach(), rtol=1e-5, atol=1e-6)
    fused.select([2, 1])
    assert fused.members == 2 and fused.head.shape[0] == 2 and fused.scale_mask.shape[0] == 2
    assert torch.equal(fused.member_state_dict(0)["head.weight"], members[2].head.weight.detach())
    assert math.isclose(fused.member_state_dict(1)["log_scales.text"].item(), 0.3, rel_tol=1e-6)
