"""Collation of sequence batches: the flat Arrow layout (steps, lengths) to padded tensors and a mask.

``uml_ray.data.format.table_to_numpy(table, 'sequence', dim)`` hands a batch over as
``(steps (sum T, dim), lengths (B,))``; the model wants ``x (B, T_max, dim)`` and a boolean mask
that is True at real steps. Padding is on the right and filled with zeros; the model never
lets it count, whatever it holds.
"""

from __future__ import annotations

import numpy as np
import torch


def pad_sequences(steps: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a flat batch of sequences: ``(x float32 (B, T_max, d), mask bool (B, T_max))``.

    ``steps`` holds every sequence's steps back to back (``sum(lengths)`` rows of ``d`` values);
    ``lengths`` gives each sequence's step count. ``T_max`` is the longest length (0 for a batch
    of empty sequences).
    """
    steps = np.asarray(steps)
    lengths = np.asarray(lengths, dtype=np.int64)
    if steps.ndim != 2:
        raise ValueError(f"steps must have shape (sum T, d), got {steps.shape}")
    if lengths.ndim != 1 or (lengths < 0).any():
        raise ValueError(f"lengths must be a 1-d array of non-negative counts, got {lengths!r}")
    if int(lengths.sum()) != len(steps):
        raise ValueError(f"lengths sum to {int(lengths.sum())} but steps has {len(steps)} rows")
    batch, dim = len(lengths), steps.shape[1]
    longest = int(lengths.max()) if batch else 0
    rows = np.repeat(np.arange(batch), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if batch else np.zeros(0, np.int64)
    positions = np.arange(len(steps)) - np.repeat(starts, lengths)
    x = np.zeros((batch, longest, dim), dtype=np.float32)
    x[rows, positions] = steps
    mask = np.arange(longest)[None, :] < lengths[:, None]
    return torch.from_numpy(x), torch.from_numpy(mask)


def sequence_batch_to_tensors(batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stream's sequence batch ``((steps, lengths), labels)`` as ``(x, mask, labels)`` on ``device``."""
    (steps, lengths), labels = batch
    x, mask = pad_sequences(steps, lengths)
    return x.to(device), mask.to(device), torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
