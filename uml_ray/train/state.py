"""What a loop carries besides weights: the RNG states and each member's progress record in a
checkpoint, and when a member has diverged.

A member *diverges* when, at a validation, its mean train loss since the last one is non-finite
or above ``DIVERGENCE_FACTOR`` times the one it had at its first validation (at least 1), or its
val loss is non-finite (``diverges``). It ends there, untested: its last metrics carry
``DIVERGED_KEY`` = 1 with the step and the loss (``diverged_step``, ``diverged_loss``), which the
driver records as the outcome ``diverged`` and tells the searcher as a failure; a fused trial's
other members go on. Checked at validations only: a per-step check would cost a host sync every
step (the fused regime keeps its losses on the device).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

# what a diverged member's final metrics hold: the flag, the validation step it was found at, the loss
DIVERGED_KEY = "diverged"
DIVERGED_STEP_KEY = "diverged_step"
DIVERGED_LOSS_KEY = "diverged_loss"
# a train loss this many times the first validation's (or than 1, when that was below 1) has exploded:
# far past any sane run's noise, however the loss is scaled (cross-entropy, a sequence's MSE)
DIVERGENCE_FACTOR = 1e4


def rng_state() -> dict:
    """Every RNG the loop may touch (CUDA's too: dropout on GPU), for checkpoints."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def new_progress() -> dict:
    """One member's bookkeeping in checkpoints: step, validations, best-val point, validations
    without gain."""
    return {
        "step": 0,
        "validations": 0,
        "best_val_acc": -1.0,
        "best_val_loss": math.inf,
        "best_step": 0,
        "bad_validations": 0,
        "first_train_loss": None,
    }


def diverges(train_loss: float, first_train_loss: float | None) -> bool:
    """Whether a mean train loss is non-finite or exploded: above ``DIVERGENCE_FACTOR`` times the one
    of the first validation (``first_train_loss``), or than 1 when that was below 1."""
    reference = max(first_train_loss or 0.0, 1.0)
    return not math.isfinite(train_loss) or train_loss > DIVERGENCE_FACTOR * reference
