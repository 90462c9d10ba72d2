"""K supervised UML heads trained as ONE batched model (fused trials).

A head-only sweep trains many small ``SharedHeadUML`` models on the same batches; one at a time,
each step is a few tiny matmuls dominated by per-op overhead. Stacking the K members' parameters
along a leading member axis turns K steps into one: the target projection of every member is a
single GEMM over the shared input batch, the heads one batched matmul. Members never share a
parameter, so the sum of their losses gives each member exactly its own gradient.

Plain PyTorch: no Ray, MLflow or Optuna here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uml_ray.models.supervised import SharedHeadUML


class _StackedProjection(torch.autograd.Function):
    """``features @ W_k^T`` for every member ``k`` as one GEMM, the weight gradient written into a
    recycled buffer: a fresh gradient of a 100 MB stack costs more in page faults than the GEMM
    that fills it. Same arithmetic as ``F.linear`` and its backward."""

    @staticmethod
    def forward(ctx, features, weight, spare: dict, name: str):
        ctx.save_for_backward(features, weight)
        ctx.spare, ctx.name = spare, name
        members, shared, dim = weight.shape
        return F.linear(features, weight.reshape(members * shared, dim))

    @staticmethod
    def backward(ctx, grad_output):
        features, weight = ctx.saved_tensors
        members, shared, dim = weight.shape
        grad_features = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_features = grad_output.mm(weight.reshape(members * shared, dim))
        if ctx.needs_input_grad[1]:
            grad_weight = ctx.spare.pop(ctx.name, None)
            if grad_weight is None or grad_weight.shape != weight.shape:
                grad_weight = torch.empty_like(weight)
            # autograd adopts this tensor as weight.grad: nothing else may hold it
            torch.mm(grad_output.t(), features, out=grad_weight.view(members * shared, dim))
        return grad_features, grad_weight, None, None


class _GroupedProjection(torch.autograd.Function):
    """``features[g] @ W_k^T`` for the members ``k`` of group ``g`` (``G`` equal consecutive groups of
    members, one batch ``[B, d]`` each) as one batched GEMM, the weight gradient written into a recycled
    buffer as ``_StackedProjection`` does. A member's gradient comes from its own group's rows only."""

    @staticmethod
    def forward(ctx, features, weight, spare: dict, name: str):
        ctx.save_for_backward(features, weight)
        ctx.spare, ctx.name = spare, name
        groups = features.shape[0]
        members, shared, dim = weight.shape
        return torch.bmm(features, weight.view(groups, members // groups * shared, dim).transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_output):
        features, weight = ctx.saved_tensors
        groups = features.shape[0]
        members, shared, dim = weight.shape
        grouped = weight.view(groups, members // groups * shared, dim)
        grad_features = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_features = torch.bmm(grad_output, grouped)
        if ctx.needs_input_grad[1]:
            grad_weight = ctx.spare.pop(ctx.name, None)
            if grad_weight is None or grad_weight.shape != weight.shape:
                grad_weight = torch.empty_like(weight)
            torch.bmm(grad_output.transpose(1, 2), features, out=grad_weight.view_as(grouped))
        return grad_features, grad_weight, None, None


class FusedSharedHead(nn.Module):
    """K ``SharedHeadUML`` members with stacked parameters; logits come out as ``[K, B, C]``.

    Parameters: ``projections[m]`` ``[K, shared, d_m]`` for every projected modality, ``head``
    ``[K, C, shared]``, and ``log_scales`` ``[K, M]`` when any member has a learnable logit scale.
    Every member has the same shared width and the same projected modalities (that is what makes
    them fusable); a member may lack an auxiliary modality (its alpha is 0) or a logit scale:
    those slices stay out of its loss or are masked to scale 1, so they never receive a gradient
    and the member trains exactly as it would alone.
    """

    def __init__(
        self,
        dims: dict[str, int],
        target: str,
        num_classes: int,
        shared_dim: int,
        projected: list[str],
        member_modalities: list[tuple[str, ...]],
        member_logit_scale: list[bool],
    ):
        super().__init__()
        if target not in dims:
            raise ValueError(f"target modality '{target}' not in {sorted(dims)}")
        for name, dim in dims.items():
            if name not in projected and dim != shared_dim:
                raise ValueError(
                    f"modality '{name}' ({dim}-d) enters the {shared_dim}-d shared space unprojected"
                )
        members = len(member_modalities)
        self.target = target
        self.dims = dict(dims)
        self.modalities = list(dims)
        self.shared_dim = shared_dim
        self.member_modalities = [tuple(m) for m in member_modalities]
        self.member_logit_scale = list(member_logit_scale)
        self.projections = nn.ParameterDict(
            {
                name: nn.Parameter(torch.zeros(members, shared_dim, dims[name]))
                for name in self.modalities
                if name in projected
            }
        )
        self.head = nn.Parameter(torch.zeros(members, num_classes, shared_dim))
        if any(member_logit_scale):
            self.log_scales = nn.Parameter(torch.zeros(members, len(self.modalities)))
            # 1 where the member has that scale; 0 keeps the others at exp(0) = 1 with zero gradient
            mask = [
                [float(scaled and name in mods) for name in self.modalities]
                for scaled, mods in zip(member_logit_scale, self.member_modalities)
            ]
            self.register_buffer("scale_mask", torch.tensor(mask))
        else:
            self.log_scales = None
        self._spare_grads: dict[str, torch.Tensor] = {}  # projection gradients to reuse (recycle_grads)

    @property
    def members(self) -> int:
        """Number of members currently stacked."""
        return self.head.shape[0]

    @classmethod
    def from_members(
        cls, models: list[SharedHeadUML], modalities: list[str] | None = None
    ) -> FusedSharedHead:
        """Stack K alone-built models, so that each member starts from exactly its alone init.

        ``modalities`` orders the stacked modalities (default: first appearance, target first).
        Raises ValueError when the members differ in structure (target, shared width, classes, or
        whether a modality is projected).
        """
        first = models[0]
        names = list(modalities) if modalities else []
        for model in models:
            names += [m for m in model.projections if m not in names]
        dims, projected = {}, {}
        for k, model in enumerate(models):
            if (
                model.target != first.target
                or model.shared_dim != first.shared_dim
                or model.head.weight.shape != first.head.weight.shape
            ):
                raise ValueError(
                    f"member {k} differs in target, shared width or classes from member 0; it cannot be fused"
                )
            for name, module in model.projections.items():
                is_projected = isinstance(module, nn.Linear)
                if projected.setdefault(name, is_projected) != is_projected:
                    raise ValueError(
                        f"member {k} {'projects' if is_projected else 'does not project'} modality '{name}' "
                        "unlike another member; it cannot be fused"
                    )
                dims[name] = module.weight.shape[1] if is_projected else first.shared_dim
        fused = cls(
            {name: dims[name] for name in names},
            first.target,
            first.head.weight.shape[0],
            first.shared_dim,
            [name for name in names if projected[name]],
            [tuple(m.projections) for m in models],
            [len(m.log_scales) > 0 for m in models],
        )
        fused.to(first.head.weight.device)
        for k, model in enumerate(models):
            fused.load_member_state_dict(k, model.state_dict())
        return fused

    def logits(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``[K, B, C]`` of every member for one batch ``[B, d]`` of one modality, or for
        ``G`` batches ``[G, B, d]``: the members form ``G`` equal consecutive groups, group ``g`` seeing
        batch ``g`` only (k-fold selection: one group per fold, each on its own training rows)."""
        if features.dim() == 3:
            return self._scaled(modality, self._grouped_logits(modality, features))
        members, classes, shared = self.head.shape
        batch = features.shape[0]
        if modality in self.projections:
            weight = self.projections[modality]
            # one GEMM over the shared input for all members, then one batched matmul per head
            if torch.is_grad_enabled() and weight.requires_grad:
                projected = _StackedProjection.apply(features, weight, self._spare_grads, modality)
            else:
                projected = F.linear(features, weight.reshape(members * shared, -1))
            projected = projected.view(batch, members, shared).transpose(0, 1)
            logits = torch.bmm(projected, self.head.transpose(1, 2))
        else:
            logits = (
                F.linear(features, self.head.reshape(members * classes, shared))
                .view(batch, members, classes)
                .transpose(0, 1)
            )
        return self._scaled(modality, logits)

    def _grouped_logits(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        members, classes, shared = self.head.shape
        groups, batch = features.shape[:2]
        per = members // groups
        if members % groups:
            raise ValueError(f"{members} members do not form {groups} equal groups")
        if modality in self.projections:
            weight = self.projections[modality]
            if torch.is_grad_enabled() and weight.requires_grad:
                projected = _GroupedProjection.apply(features, weight, self._spare_grads, modality)
            else:
                projected = torch.bmm(features, weight.view(groups, per * shared, -1).transpose(1, 2))
            projected = (
                projected.view(groups, batch, per, shared).transpose(1, 2).reshape(members, batch, shared)
            )
            return torch.bmm(projected, self.head.transpose(1, 2))
        logits = torch.bmm(features, self.head.reshape(groups, per * classes, shared).transpose(1, 2))
        return logits.view(groups, batch, per, classes).transpose(1, 2).reshape(members, batch, classes)

    def _scaled(self, modality: str, logits: torch.Tensor) -> torch.Tensor:
        if self.log_scales is not None:
            index = self.modalities.index(modality)
            scale = (self.log_scales[:, index] * self.scale_mask[:, index]).exp()
            logits = logits * scale[:, None, None]
        return logits

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Logits ``[K, B, C]`` for independent batches of several modalities in one forward pass."""
        return {name: self.logits(name, batch) for name, batch in features.items()}

    def recycle_grads(self) -> None:
        """Drop every gradient (as ``zero_grad(set_to_none=True)``), keeping the projections' buffers
        for the next backward to write into."""
        for name, weight in self.projections.items():
            if weight.grad is not None:
                self._spare_grads[name] = weight.grad
        for param in self.parameters():
            param.grad = None

    def member_state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member ``k`` as a ``SharedHeadUML`` state dict (loadable into the model it would be alone)."""
        state = {}
        for name in self.member_modalities[k]:
            if name in self.projections:
                state[f"projections.{name}.weight"] = self.projections[name][k].detach().clone()
        state["head.weight"] = self.head[k].detach().clone()
        if self.member_logit_scale[k]:
            for name in self.member_modalities[k]:
                state[f"log_scales.{name}"] = self.log_scales[k, self.modalities.index(name)].detach().clone()
        return state

    @torch.no_grad()
    def load_member_state_dict(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Put a ``SharedHeadUML`` state dict (as ``member_state_dict`` gives) into member ``k``'s slices."""
        expected = set(self.member_state_dict(k))
        if set(state) != expected:
            raise ValueError(f"member {k} state has keys {sorted(state)}, expected {sorted(expected)}")
        for name in self.member_modalities[k]:
            if name in self.projections:
                self.projections[name][k].copy_(state[f"projections.{name}.weight"])
        self.head[k].copy_(state["head.weight"])
        if self.member_logit_scale[k]:
            for name in self.member_modalities[k]:
                self.log_scales[k, self.modalities.index(name)] = state[f"log_scales.{name}"]

    @torch.no_grad()
    def subset(self, indices: list[int]) -> FusedSharedHead:
        """A new model of copies of the members at ``indices`` (no gradients), e.g. to evaluate a few."""
        members, classes, shared = self.head.shape
        subset = FusedSharedHead(
            self.dims,
            self.target,
            classes,
            shared,
            list(self.projections),
            [self.member_modalities[i] for i in indices],
            [self.member_logit_scale[i] for i in indices],
        )
        subset.to(self.head.device)
        for position, k in enumerate(indices):
            subset.load_member_state_dict(position, self.member_state_dict(k))
        return subset

    @torch.no_grad()
    def select(self, indices: list[int]) -> None:
        """Keep only the members at ``indices`` (in that order): every stacked tensor shrinks, so a
        pruned member costs no more compute. The parameters are new tensors: hand them to the
        optimizer again (``MemberAdamW.select``)."""
        index = torch.as_tensor(indices, dtype=torch.long, device=self.head.device)
        for name in self.projections:
            self.projections[name] = nn.Parameter(self.projections[name].index_select(0, index))
        self.head = nn.Parameter(self.head.index_select(0, index))
        if self.log_scales is not None:
            self.log_scales = nn.Parameter(self.log_scales.index_select(0, index))
        for name, buffer in self.named_buffers():
            setattr(self, name, buffer.index_select(0, index))
        self._spare_grads.clear()
        self.member_modalities = [self.member_modalities[i] for i in indices]
        self.member_logit_scale = [self.member_logit_scale[i] for i in indices]


def fused_loss(
    logits: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    target: str,
    alpha: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Per member ``CE(target) + sum_m alpha[m][k] * CE(m)``.

    Returns (sum over members, per-member totals, per-modality CEs).

    ``logits[m]`` is ``[K, B_m, C]``, ``labels[m]`` ``[B_m]`` (the same batch for every member) or
    ``[G, B_m]`` (``G`` equal consecutive groups of members, a batch each: ``FusedSharedHead.logits``),
    ``alpha[m]`` ``[K]``. Members share no parameter, so backpropagating the sum gives each member
    the gradient of its own loss. The totals and CEs (``[K]`` each) are detached.
    """
    members = logits[target].shape[0]

    def member_labels(name: str) -> torch.Tensor:
        given = labels[name]
        if given.dim() == 1:
            return given.repeat(members)
        return given.repeat_interleave(members // given.shape[0], dim=0).reshape(-1)

    def cross_entropy(name: str) -> torch.Tensor:
        rows = logits[name].shape[1]
        losses = F.cross_entropy(
            logits[name].reshape(members * rows, -1), member_labels(name), reduction="none"
        )
        return losses.view(members, rows).mean(1)

    member_totals = cross_entropy(target)
    parts = {target: member_totals.detach()}
    for name in logits:
        if name == target:
            continue
        loss = cross_entropy(name)
        parts[name] = loss.detach()
        member_totals = member_totals + alpha[name] * loss
    return member_totals.sum(), member_totals.detach(), parts
