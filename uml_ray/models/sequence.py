"""Self-supervised UML over unpaired sequences (docs/method.md §2): ONE shared causal transformer.

Every modality enters through its own ``Linear(d_m -> zdim)``, runs through the same causal
Transformer encoder, and leaves through its own ``Linear(zdim -> d_m)`` that predicts the next step.
Masks are boolean ``(B, T)`` tensors, True at real steps; padding never reaches a loss or a pooled
embedding, whatever values it holds.

Plain PyTorch: config values in, module out. No Ray, MLflow or Optuna here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

POS_EMB_CHOICES = ("none", "sinusoidal", "learnable")


def sinusoidal_table(max_len: int, zdim: int) -> torch.Tensor:
    """The fixed ``(max_len, zdim)`` sine/cosine position table of Vaswani et al. (odd zdim allowed)."""
    position = torch.arange(max_len, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, zdim, 2, dtype=torch.float32) * (-math.log(10000.0) / zdim))
    table = torch.zeros(max_len, zdim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: zdim // 2])
    return table


class SharedSequenceModel(nn.Module):
    """Per-modality input/output projections around one shared causal Transformer encoder.

    ``dims`` maps each modality to its step width ``d_m``; any number of modalities. ``zdim`` is the
    transformer width (d_model) and must be divisible by ``heads``; ``pos_emb`` is one of
    ``none`` / ``sinusoidal`` / ``learnable`` and, when used, covers sequences up to ``max_len``.
    """

    def __init__(
        self,
        dims: dict[str, int],
        zdim: int,
        layers: int,
        heads: int,
        dropout: float = 0.1,
        pos_emb: str = "none",
        max_len: int = 512,
    ):
        super().__init__()
        if not dims:
            raise ValueError("SharedSequenceModel needs at least one modality in dims")
        bad_dims = {name: dim for name, dim in dims.items() if dim < 1}
        if bad_dims:
            raise ValueError(f"modality dims must be positive, got {bad_dims}")
        if zdim < 1 or layers < 1 or heads < 1:
            raise ValueError(
                f"zdim, layers and heads must be positive, got zdim={zdim} layers={layers} heads={heads}"
            )
        if zdim % heads:
            divisors = [h for h in range(1, zdim + 1) if zdim % h == 0]
            raise ValueError(
                f"zdim={zdim} is not divisible by heads={heads}; heads must be one of {divisors}"
            )
        if pos_emb not in POS_EMB_CHOICES:
            raise ValueError(f"pos_emb={pos_emb!r} is not one of {list(POS_EMB_CHOICES)}")
        if max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        self.dims = dict(dims)
        self.zdim = zdim
        self.pos_emb = pos_emb
        self.max_len = max_len
        self.inputs = nn.ModuleDict({name: nn.Linear(dim, zdim) for name, dim in dims.items()})
        self.outputs = nn.ModuleDict({name: nn.Linear(zdim, dim) for name, dim in dims.items()})
        layer = nn.TransformerEncoderLayer(
            zdim, heads, dim_feedforward=4 * zdim, dropout=dropout, batch_first=True
        )
        # the nested-tensor fast path drops padded positions in eval mode only, which would make
        # train- and eval-mode outputs differ in shape handling; masks already keep padding out
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        if pos_emb == "learnable":
            self.position = nn.Parameter(torch.randn(max_len, zdim) * 0.02)
        elif pos_emb == "sinusoidal":
            self.register_buffer("position", sinusoidal_table(max_len, zdim), persistent=False)
        else:
            self.position = None

    def _check(self, modality: str, x: torch.Tensor, mask: torch.Tensor) -> None:
        if modality not in self.inputs:
            raise ValueError(f"unknown modality '{modality}'; the model has {sorted(self.inputs)}")
        if x.dim() != 3 or x.shape[-1] != self.dims[modality]:
            raise ValueError(
                f"{modality}: x must have shape (B, T, {self.dims[modality]}), got {tuple(x.shape)}"
            )
        if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(
                f"{modality}: mask must be a bool tensor of shape {tuple(x.shape[:2])}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        if self.position is not None and x.shape[1] > self.max_len:
            raise ValueError(
                f"{modality}: sequences of {x.shape[1]} steps exceed model.max_len={self.max_len}"
            )

    def encode(self, modality: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The shared encoder's output ``(B, T, zdim)``; position t sees steps 0..t only."""
        self._check(modality, x, mask)
        # where, not multiply: padding may hold NaN/inf, and 0 * inf is NaN
        x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        hidden = self.inputs[modality](x)
        steps = x.shape[1]
        if self.position is not None:
            hidden = hidden + self.position[:steps]
        causal = torch.ones(steps, steps, dtype=torch.bool, device=x.device).triu(1)
        # a row without any real step would attend to nothing (NaN); let it attend to its zeros instead
        padding = ~mask & mask.any(dim=1, keepdim=True)
        return self.encoder(hidden, mask=causal, src_key_padding_mask=padding)

    def forward(
        self, modality: str, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prediction, hidden)``: the next-step prediction and the encoder output.

        Shapes ``(B, T, d_m)`` and ``(B, T, zdim)``.
        """
        hidden = self.encode(modality, x, mask)
        return self.outputs[modality](hidden), hidden

    def next_step_loss(self, modality: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked next-step MSE of one modality's batch (see ``next_step_mse``)."""
        prediction, _ = self(modality, x, mask)
        return next_step_mse(prediction, x, mask)

    def pool(self, modality: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mask-aware mean of the shared encoder output over real steps, ``(B, zdim)``; empty rows give 0."""
        hidden = self.encode(modality, x, mask)
        hidden = torch.where(
            mask[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        )
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1).to(hidden.dtype)
        return hidden.sum(dim=1) / counts


def next_step_mse(prediction: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between the prediction at t and the input at t+1, averaged over valid (t, t+1) pairs.

    A pair counts only when both t and t+1 are real steps, so padding never counts. The squared
    error is averaged over the step's ``d`` values, then over all valid pairs of the batch (each
    pair weighs the same, whatever its sequence's length). A batch with no valid pair gives 0.
    """
    pairs = mask[:, :-1] & mask[:, 1:]
    error = (prediction[:, :-1] - x[:, 1:]).pow(2).mean(dim=-1)
    error = torch.where(pairs, error, torch.zeros((), dtype=error.dtype, device=error.device))
    return error.sum() / pairs.sum().clamp(min=1).to(error.dtype)


def target_active(epoch: int, step_k: int) -> bool:
    """Whether the target term is on in ``epoch`` (0-based) under the step_k warm start.

    Epochs ``0 .. step_k - 1`` are auxiliary-only (exactly step_k of them); ``step_k = 0`` and
    ``step_k = -1`` train jointly from the start. The reference trained step_k + 1 auxiliary-only
    epochs (an off-by-one we do not copy).
    """
    if step_k < -1:
        raise ValueError(f"step_k must be -1 or >= 0, got {step_k}")
    return step_k == -1 or epoch >= step_k


def uml_sequence_loss(
    model: SharedSequenceModel,
    batches: dict[str, tuple[torch.Tensor, torch.Tensor]],
    target: str,
    alpha: dict[str, float],
    target_on: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L_x + sum_m alpha_m * L_m`` over independent (never paired) batches ``{modality: (x, mask)}``.

    The alpha convention is the supervised regime's: the target's next-step loss ``L_x`` has
    weight 1 and ``alpha[m]`` weighs each auxiliary modality m (alpha = 1 everywhere reproduces
    the reference, which had no alpha). With ``target_on`` False (step_k warm-up) the target is
    not forwarded at all, so its loss and its gradients are exactly zero. Modalities with alpha 0
    are skipped too, which makes alpha = 0 exactly the unimodal baseline.

    Returns the total and each computed modality's unweighted loss.
    """
    missing = [m for m in batches if m != target and m not in alpha]
    if missing:
        raise ValueError(f"no alpha for auxiliary modalities {missing}; alpha has {sorted(alpha)}")
    total = None
    parts: dict[str, float] = {}
    for name, (x, mask) in batches.items():
        weight = (1.0 if target_on else 0.0) if name == target else alpha[name]
        if weight == 0.0:
            continue
        loss = model.next_step_loss(name, x, mask)
        parts[name] = float(loss.detach())
        total = weight * loss if total is None else total + weight * loss
    if total is None:
        raise ValueError(
            "nothing to train this step: the target term is off (step_k warm-up) and no auxiliary "
            "modality has alpha > 0; give an auxiliary modality a positive alpha or set train.step_k=-1"
        )
    return total, parts


class SequenceObjective(nn.Module):
    """``uml_sequence_loss`` as a module, so a training step is ONE forward call of the wrapped module.

    DistributedDataParallel expects exactly one forward per backward; wrapping this (not the
    model, whose forward serves one modality) keeps that contract. During the step_k warm-up the
    target's projections receive no gradient, so DDP needs ``find_unused_parameters=True`` then.
    """

    def __init__(self, model: SharedSequenceModel, target: str, alpha: dict[str, float]):
        super().__init__()
        self.model = model
        self.target = target
        self.alpha = dict(alpha)

    def forward(
        self, batches: dict[str, tuple[torch.Tensor, torch.Tensor]], target_on: bool
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The step's total loss and each modality's unweighted loss (see ``uml_sequence_loss``)."""
        return uml_sequence_loss(self.model, batches, self.target, self.alpha, target_on)
