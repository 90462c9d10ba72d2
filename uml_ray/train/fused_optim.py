"""AdamW and gradient clipping per member over parameters stacked along a leading member axis.

``torch.optim.AdamW`` takes one lr and one weight decay per parameter group; a fused model
(``uml_ray.models.fused``) needs one per member of every stacked tensor. ``MemberAdamW`` steps
each member exactly as ``torch.optim.AdamW`` would step it alone: with torch's own operations in
torch's order (bit for bit on CPU), or with torch's fused AdamW kernel (bit for bit
``AdamW(fused=True)``), the per-member scalars computed in float64 as torch computes them in Python."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[K]`` values broadcast over a ``[K, ...]`` tensor, in its dtype and on its device."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


class MemberAdamW:
    """AdamW (decoupled decay, bias-corrected) with a learning rate and weight decay per member.

    ``per_member`` (default: on CPU) steps one member's slices at a time, with torch's
    single-tensor operations, or with torch's fused AdamW kernel when ``fused`` (one pass over
    memory instead of ~10; equal to ``torch.optim.AdamW(fused=True)``). Otherwise each operation
    runs once over the whole stack with ``[K]`` scalars (few kernel launches, for GPUs).

    ``params`` are tensors whose dim 0 indexes members (``FusedSharedHead.parameters()``). The
    caller passes the schedule's multiplier to ``step`` (``lr_k = lr[k] * factor``), as
    ``LambdaLR`` scales a group's base lr. ``select`` compacts the state to the members a model
    kept and takes its new parameters.
    """

    def __init__(
        self,
        params,
        lr: Sequence[float],
        weight_decay: Sequence[float],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool = False,
        per_member: bool | None = None,
    ):
        self.params = list(params)
        self.fused = fused
        self.per_member = per_member
        self.lr = torch.tensor(list(lr), dtype=torch.float64)
        self.weight_decay = torch.tensor(list(weight_decay), dtype=torch.float64)
        if len(self.lr) != len(self.weight_decay) or any(p.shape[0] != len(self.lr) for p in self.params):
            raise ValueError("lr, weight_decay and every parameter's dim 0 must have one entry per member")
        self.betas = betas
        self.eps = eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def current_lr(self, factor: float | Sequence[float] = 1.0) -> torch.Tensor:
        """Each member's lr under a schedule multiplier (float64, as LambdaLR's ``base_lr * factor``)."""
        return self.lr * torch.as_tensor(factor, dtype=torch.float64)

    def zero_grad(self) -> None:
        """Drop every gradient (``set_to_none``)."""
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self, factor: float | Sequence[float] = 1.0) -> None:
        """One AdamW step of every member, at lr ``lr[k] * factor`` (``factor`` a float or ``[K]``)."""
        self.steps += 1
        lr = self.current_lr(factor)
        tensors = [
            (p, p.grad, m, v)
            for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq)
            if p.grad is not None
        ]
        if not tensors:
            return
        if self.per_member if self.per_member is not None else tensors[0][0].device.type == "cpu":
            self._step_members(tensors, lr.tolist(), self.weight_decay.tolist())
        else:
            self._step_stacked(tensors, lr)

    def _step_members(self, tensors: list, lrs: list[float], weight_decays: list[float]) -> None:
        # one member at a time: its slices stay in cache through Adam's passes, where passes over
        # the whole stack stream every temporary through memory (7x slower at 16 members on CPU)
        beta1, beta2 = self.betas
        if self.fused:
            step = torch.tensor(float(self.steps), device=tensors[0][0].device)
            for k, (lr, weight_decay) in enumerate(zip(lrs, weight_decays)):
                params, grads, exp_avgs, exp_avg_sqs = ([t[k] for t in column] for column in zip(*tensors))
                torch._fused_adamw_(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    [],
                    [step] * len(params),
                    amsgrad=False,
                    lr=lr,
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=weight_decay,
                    eps=self.eps,
                    maximize=False,
                )
            return
        # torch.optim.AdamW's single-tensor path, operation for operation
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        for k, (lr, weight_decay) in enumerate(zip(lrs, weight_decays)):
            for param, grad, exp_avg, exp_avg_sq in tensors:
                param, grad, exp_avg, exp_avg_sq = param[k], grad[k], exp_avg[k], exp_avg_sq[k]
                if weight_decay != 0:
                    param.mul_(1 - lr * weight_decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
                param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))

    def _step_stacked(self, tensors: list, lr: torch.Tensor) -> None:
        # the same arithmetic over whole stacks with [K] scalars: few large ops (accelerators)
        beta1, beta2 = self.betas
        decay = 1 - lr * self.weight_decay
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        neg_step_size = -(lr / bias_correction1)
        for param, grad, exp_avg, exp_avg_sq in tensors:
            param.mul_(_per_member(decay, param))
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            # addcdiv_(exp_avg, denom, value=-step_size) computes param + (value * exp_avg) / denom
            param.add_((_per_member(neg_step_size, param) * exp_avg).div_(denom))

    def state_dict(self) -> dict:
        """Step count, per-member lr and weight decay, and the moments (cloned), for checkpoints."""
        return {
            "steps": self.steps,
            "lr": self.lr.tolist(),
            "weight_decay": self.weight_decay.tolist(),
            "exp_avg": [t.clone() for t in self.exp_avg],
            "exp_avg_sq": [t.clone() for t in self.exp_avg_sq],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` (the parameters must already have its member count)."""
        self.steps = int(state["steps"])
        self.lr = torch.tensor(state["lr"], dtype=torch.float64)
        self.weight_decay = torch.tensor(state["weight_decay"], dtype=torch.float64)
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            if mine.shape != saved.shape:
                raise ValueError(
                    f"optimizer state of shape {tuple(saved.shape)} does not fit a parameter of "
                    f"shape {tuple(mine.shape)}"
                )
            mine.copy_(saved)

    def select(self, indices: list[int], params) -> None:
        """Keep the state of the members at ``indices``; ``params`` are the model's parameters
        after its own ``select`` (the same tensors, in the same order, with those members only)."""
        self.params = list(params)
        index = torch.as_tensor(indices, dtype=torch.long)
        self.lr, self.weight_decay = self.lr[index], self.weight_decay[index]
        self.exp_avg = [t.index_select(0, index.to(t.device)) for t in self.exp_avg]
        self.exp_avg_sq = [t.index_select(0, index.to(t.device)) for t in self.exp_avg_sq]


@torch.no_grad()
def clip_member_grad_norms(params, max_norms: torch.Tensor) -> torch.Tensor:
    """Per member, ``torch.nn.utils.clip_grad_norm_`` over its slices of ``params``; returns the
    ``[K]`` norms.

    A member whose max norm is 0 is left unclipped. Slices a member does not use alone carry zero
    gradients, so they add nothing to its norm.
    """
    grads = [p.grad for p in params if p.grad is not None]
    members = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(members, -1), 2, dim=1) for g in grads])
    total = torch.linalg.vector_norm(norms, 2, dim=0)
    max_norms = max_norms.to(device=total.device, dtype=total.dtype)
    coef = torch.where(
        max_norms > 0, torch.clamp(max_norms / (total + 1e-6), max=1.0), torch.ones_like(total)
    )
    for grad in grads:
        grad.mul_(_per_member(coef, grad))
    return total
