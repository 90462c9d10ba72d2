"""Training-step throughput of K fused supervised UML members vs K separate models, measured in one run.

One step of a head-only config: a 1280-d target batch and a 384-d text batch (batch 32, 10
classes) through its projection and shared head, the UML loss, backward, AdamW with the warm-up
+ cosine schedule. "separate" steps K ``SharedHeadUML`` models one after another, each with its
own torch AdamW + LambdaLR (what K configs in one process do; "torch" is AdamW's default kernel,
as ``train_supervised`` uses it, "fused-kernel" ``AdamW(fused=True)``); "fused" steps one
``FusedSharedHead`` of K members with ``MemberAdamW`` as ``train_fused`` does. Figures are
config-steps per CPU second (K per fused step; CPU time, so other load on a shared machine does
not count) on one torch thread, and the ratios.

    python benchmarks/fused_step.py [--members 1 16 64] [--seconds 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from uml_ray.models.fused import FusedSharedHead, fused_loss
from uml_ray.models.supervised import SharedHeadUML, uml_loss
from uml_ray.train.common import warmup_cosine
from uml_ray.train.fused_optim import MemberAdamW

DIMS = {"image": 1280, "text": 384}
CLASSES, BATCH, MAX_STEPS = 10, 32, 10_000


def batches(count: int) -> list[tuple[dict, dict]]:
    """Fixed random batches, cycled (the data path is not what this measures)."""
    return [
        (
            {m: torch.randn(BATCH, d) for m, d in DIMS.items()},
            {m: torch.randint(0, CLASSES, (BATCH,)) for m in DIMS},
        )
        for _ in range(count)
    ]


def members(count: int) -> list[SharedHeadUML]:
    """``count`` alone models, each with its own seed."""
    models = []
    for k in range(count):
        torch.manual_seed(k)
        models.append(SharedHeadUML(DIMS, "image", CLASSES))
    return models


def time_steps(step, seconds: float) -> float:
    """Steps per CPU second of ``step(i)`` over about ``seconds`` of CPU time (after 3 warm-up steps)."""
    for i in range(3):
        step(i)
    done, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        step(done)
        done += 1
    return done / (time.process_time() - start)


def separate_rate(count: int, data: list, seconds: float, fused_kernel: bool) -> float:
    """Config-steps per CPU second of ``count`` models stepped one after another."""
    models = members(count)
    lrs = [1e-3 * (1 + k % 7) for k in range(count)]
    optimizers = [
        torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01, fused=fused_kernel)
        for m, lr in zip(models, lrs)
    ]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, warmup_cosine(20, MAX_STEPS)) for o in optimizers]

    def step(i: int) -> None:
        features, labels = data[i % len(data)]
        for model, optimizer, schedule in zip(models, optimizers, schedules):
            loss, _ = uml_loss(model(features), labels, "image", {"text": 0.5})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()

    return count * time_steps(step, seconds)


def fused_rate(count: int, data: list, seconds: float) -> float:
    """Config-steps per CPU second of ``count`` members fused into one model."""
    model = FusedSharedHead.from_members(members(count))
    lrs = [1e-3 * (1 + k % 7) for k in range(count)]
    optimizer = MemberAdamW(model.parameters(), lrs, [0.01] * count, fused=True)
    factor = warmup_cosine(20, MAX_STEPS)
    alpha = {"text": torch.full((count,), 0.5)}

    def step(i: int) -> None:
        features, labels = data[i % len(data)]
        loss, _, _ = fused_loss(model(features), labels, "image", alpha)
        model.recycle_grads()
        loss.backward()
        optimizer.step(factor(i))

    return count * time_steps(step, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as the training loops do
    data = batches(8)
    print(
        f"{'K':>4} {'separate torch':>15} {'separate fused-kernel':>22} {'fused':>9} "
        f"{'fused/torch':>12} {'fused/fused-kernel':>19}   (config-steps per CPU second)"
    )
    for count in args.members:
        separate = separate_rate(count, data, args.seconds, fused_kernel=False)
        separate_kernel = separate_rate(count, data, args.seconds, fused_kernel=True)
        fused = fused_rate(count, data, args.seconds)
        print(
            f"{count:>4} {separate:>15.1f} {separate_kernel:>22.1f} {fused:>9.1f} "
            f"{fused / separate:>11.2f}x {fused / separate_kernel:>18.2f}x"
        )


if __name__ == "__main__":
    main()
